# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""What an HF export needs so a client serves the trained chat model as it was trained: the chat template the
preference data was rendered with, and generation stopping at that template's end-of-turn token as well as EOS
(a Llama-3 chat model ends its turns with ``<|eot_id|>``, not ``<|end_of_text|>``)."""

import logging
from collections.abc import Iterable

from levanter.data.simpo.splits import component_format
from levanter.data.text.preference import PreferenceLmDataConfig
from levanter.tokenizers import MarinTokenizer

logger = logging.getLogger(__name__)

# rendered as the assistant's content to find where the template closes the turn
_MARKER = "simpo export marker"


def training_chat_template(data: PreferenceLmDataConfig, tokenizer: MarinTokenizer) -> str | None:
    """The chat template the preference components render with: the formats' own, else the tokenizer's."""
    templates = {
        getattr(component_format(name, c), "chat_template", None) or tokenizer.chat_template
        for name, c in data.components.items()
    }
    templates.discard(None)
    if len(templates) > 1:
        logger.warning(
            "The preference components use %d different chat templates; the HF export keeps the tokenizer's",
            len(templates),
        )
        return tokenizer.chat_template
    return next(iter(templates), None)


def end_of_turn_token_ids(tokenizer: MarinTokenizer) -> list[int]:
    """The special tokens the tokenizer's chat template writes after an assistant message's content."""
    if tokenizer.chat_template is None:
        return []
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _MARKER}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(rendered).__name__}, not the text")
    if _MARKER not in rendered:
        logger.warning("The chat template does not render the assistant's content; no end-of-turn token found")
        return []
    after_content = rendered[rendered.rindex(_MARKER) + len(_MARKER) :]
    special = set(tokenizer.all_special_ids)
    return [t for t in dict.fromkeys(tokenizer.encode(after_content, add_special_tokens=False)) if t in special]


def generation_eos_token_ids(tokenizer: MarinTokenizer, explicit: Iterable[int] | None) -> list[int] | None:
    """``explicit`` when set; otherwise the template's end-of-turn tokens and EOS (None if there are neither)."""
    if explicit is not None:
        return list(explicit)
    ids = [*end_of_turn_token_ids(tokenizer)]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids)) or None


def export_tokenizer(data: PreferenceLmDataConfig, tokenizer: MarinTokenizer) -> MarinTokenizer:
    """The tokenizer to save with HF exports: the training one, carrying the chat template training used."""
    template = training_chat_template(data, tokenizer)
    if template is None or template == tokenizer.chat_template:
        return tokenizer
    return tokenizer.with_chat_template(template)
