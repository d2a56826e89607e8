# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Levanter's ``apply_chat_template_with_masks`` for a preference row's three conversations, done once a batch.

The SimPO cache builder needs each row's prompt alone and both transcripts. Levanter compiles the jinja template on
every call and encodes one text at a time; here the template is compiled once, a batch's transcripts are encoded in
one ``encode_batch`` call, and the prompt alone is not encoded again when the transcript already proves its tokens:
Hugging Face tokenizers cut the text at added tokens before normalizing and tokenizing each piece on its own, so
when the prompt's text is a prefix of the transcript's and ends with a whole added token (one without
lstrip/rstrip/single_word, matched before normalization) that the transcript's encoding holds at exactly that
place, the prompt alone encodes to the transcript's tokens up to it. Llama-3's template ends every turn with such
a token (``<|eot_id|>``). Any other case encodes the prompt alone, as before; the boundary check on both
transcripts stays in the caller.

Rendering, sentinel stripping and the generation mask are Levanter's own functions, so the ids and masks are
exactly what ``apply_chat_template_with_masks`` returns (``test_preference_chat_render.py``).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jinja2

from levanter.tokenizers import (
    HfMarinTokenizer,
    MarinTokenizer,
    _assistant_mask_from_generation_spans,
    _chat_template_messages,
    _GenerationSentinelExtension,
    _make_jinja_env,
    _strip_sentinels,
)

Rendering = tuple[list[int], list[int]]
"""``(input_ids, assistant_masks)`` of one conversation."""
RowRendering = tuple[list[int], Rendering, Rendering]
"""A row's prompt ids (alone) and its chosen and rejected renderings."""


class ChatRenderer:
    """One compiled chat template and a tokenizer: a batch of rows in, their ``RowRendering`` out."""

    def __init__(self, tokenizer: MarinTokenizer, chat_template: str):
        if not isinstance(tokenizer, HfMarinTokenizer):
            raise TypeError(f"the preference cache builder needs a Hugging Face tokenizer, got {type(tokenizer)}")
        self.tokenizer = tokenizer
        self.template = _make_jinja_env([_GenerationSentinelExtension]).from_string(chat_template)
        added = tokenizer._tokenizer.get_added_tokens_decoder()
        # tokens that cut the text the same way in any text they end (see the module docstring)
        plain_matching = not any(t.lstrip or t.rstrip or t.single_word for t in added.values())
        self.cut_tokens = {i: t.content for i, t in added.items() if not t.normalized} if plain_matching else {}

    def _text(self, conversation: list[dict], kwargs: Mapping[str, Any]):
        rendered = self.template.render(
            messages=_chat_template_messages(conversation, include_indices=False),
            add_generation_prompt=False,
            bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "",
            **kwargs,
        )
        return _strip_sentinels(rendered, len(conversation))

    def _encode(self, texts: list[str]):
        return self.tokenizer._tokenizer.encode_batch(texts, add_special_tokens=False)

    def _prompt_ids_from(self, prompt: str, text: str, ids: list[int], encoding) -> list[int] | None:
        """The prompt's ids alone, read off a transcript's ``ids`` and encoding when they prove them; else None."""
        n = len(prompt)
        if not self.cut_tokens or n == 0 or not text.startswith(prompt):
            return None
        k = encoding.char_to_token(n - 1)
        if k is None:
            return None
        content = self.cut_tokens.get(ids[k])
        if content is None or encoding.token_to_chars(k) != (n - len(content), n) or not prompt.endswith(content):
            return None
        return ids[: k + 1]

    def render_rows(
        self, rows: Sequence[tuple[list[dict], list[dict], list[dict], Mapping[str, Any]]]
    ) -> list[RowRendering | jinja2.TemplateError]:
        """Per ``(prompt, chosen, rejected, template kwargs)`` row: its renderings, or the template's error on it."""
        texts: list = []
        for prompt, chosen, rejected, kwargs in rows:
            try:
                texts.append([self._text(c, kwargs) for c in (prompt, chosen, rejected)])
            except jinja2.TemplateError as e:
                texts.append(e)
        rendered = [t for t in texts if not isinstance(t, jinja2.TemplateError)]
        stripped = [s for _, *transcripts in rendered for s in transcripts]
        encodings = self._encode([s.text for s in stripped])
        transcripts: list[Rendering] = []
        for s, encoding in zip(stripped, encodings):
            ids = encoding.ids
            transcripts.append((ids, _assistant_mask_from_generation_spans(encoding, len(ids), s.generation_spans)))
        proven = [
            self._prompt_ids_from(p.text, c.text, transcripts[2 * i][0], encodings[2 * i])
            for i, (p, c, _) in enumerate(rendered)
        ]
        unproven = [i for i, ids in enumerate(proven) if ids is None]
        encoded_alone: dict[int, list[int]] = {}
        if unproven:
            for i, encoding in zip(unproven, self._encode([rendered[i][0].text for i in unproven])):
                encoded_alone[i] = encoding.ids
        prompts = [ids if ids is not None else encoded_alone[i] for i, ids in enumerate(proven)]

        done = iter(range(len(rendered)))
        out: list[RowRendering | jinja2.TemplateError] = []
        for t in texts:
            if isinstance(t, jinja2.TemplateError):
                out.append(t)
            else:
                i = next(done)
                out.append((prompts[i], transcripts[2 * i], transcripts[2 * i + 1]))
        return out
