# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The ``preference_prompt_completion`` format: preference pairs with a known prompt/completion boundary.

Levanter's ``preference_chat`` renders each transcript whole and trains the ``{% generation %}`` spans, so it
cannot tell the prompt from the completion, cannot cut an over-long pair the way the SimPO reference trainer
does, and counts in ``|y|`` only what the template marks. This format renders the shared prompt on its own and
each full transcript, so it knows where the prompt ends, and its cache builder makes every per-pair decision
once (``levanter.data.simpo.pair_build``):

- ``completion_tokens``, what ``|y|`` counts (``final_turn``: the reference trainer's; ``generation``:
  Levanter's chat mask);
- the truncation budgets (``levanter.data.simpo.truncation``);
- the checks and the drops.

The cache holds the cut pairs in Levanter's preference fields, the trained positions as the
``*_assistant_masks``, so Levanter's own ``PreferencePairDataset`` serves them; ``pair_info`` records each
row's prompt boundary, lengths, status and cuts (``PAIR_INFO``). The format subclasses
``PreferenceChatLmDatasetFormat``, so ``PreferenceLmDataConfig`` accepts it; ``slice_strategy`` and ``pack``
keep their required values and are not used.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import numpy as np

from levanter.data._preprocessor import BatchProcessor
from levanter.data.text.formats import LmDatasetFormatBase
from levanter.data.text.preference import PreferenceChatLmDatasetFormat
from levanter.tokenizers import MarinTokenizer, chat_template_has_generation_block

from .chat_render import ChatRenderer, RowRendering
from .pair_build import STATUS_ERROR, CompletionTokens, PairPolicy, build_pair, cache_exemplar, cache_record
from .rows import PreferenceRowError, describe_row, parse_preference_row, special_token_pattern
from .truncation import TruncationBudget, TruncationMode


@LmDatasetFormatBase.register_subclass("preference_prompt_completion")
@dataclasses.dataclass(frozen=True)
class PromptCompletionPreferenceFormat(PreferenceChatLmDatasetFormat):
    """Preference transcripts whose shared turns are the prompt and whose final assistant turns are the
    completions, with the reference trainer's ``|y|`` and truncation (see the module docstring)."""

    completion_tokens: CompletionTokens = "final_turn"
    """What ``|y|`` counts. ``final_turn`` (the SimPO reference trainer): every token the chat template renders
    for the final assistant turn (its header, content and end-of-turn) plus the tokenizer's EOS when the turn
    does not already end with it. ``generation`` (Levanter's chat masks): the final turn's
    ``{% generation %}`` span only, as the template marks it."""
    max_length: int | None = None
    """Total token budget of a sequence (the reference's ``max_length``), applied when the cache is built; None
    cuts nothing, and a pair longer than the training sequence then stops the run."""
    max_prompt_length: int | None = None
    """Prompt budget when a pair is over ``max_length`` (the reference's ``max_prompt_length``); None is half of
    ``max_length``."""
    truncation_mode: TruncationMode = "keep_end"
    """Which part of an over-budget prompt stays: its end (the reference's default) or its start."""

    def __post_init__(self):
        if self.completion_tokens not in ("final_turn", "generation"):
            raise ValueError(f"completion_tokens must be 'final_turn' or 'generation', got {self.completion_tokens!r}")
        if self.truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"truncation_mode must be 'keep_end' or 'keep_start', got {self.truncation_mode!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be at least 1, got {self.max_prompt_length}")
        self.budget()  # max_prompt_length must leave the completions a token

    def budget(self) -> TruncationBudget | None:
        """The cut budgets, or None when ``max_length`` is unset (nothing is cut)."""
        if self.max_length is None:
            return None
        max_prompt_length = self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2
        return TruncationBudget(self.max_length, max_prompt_length, self.truncation_mode)

    def build_preprocessor(
        self, tokenizer: MarinTokenizer, *, enforce_eos: bool = True, enforce_bos: bool = True
    ) -> BatchProcessor[dict, dict]:
        del enforce_eos, enforce_bos  # checked per pair against the |y| definition in use
        return PromptCompletionProcessor(tokenizer, self)


class PromptCompletionProcessor(BatchProcessor[dict, dict]):
    """Renders each row's prompt alone and its two full transcripts (``ChatRenderer``: the template compiled once,
    a batch's texts encoded together), then builds the pair with ``build_pair``: one cache row per source row, so
    cache row ``i`` is source row ``i``.

    A malformed row is kept as a row with status ``STATUS_ERROR`` and its message, so the data set can name the
    source row index when it stops the run; rows that cannot train keep their place with their ``RowDrop``.
    """

    def __init__(self, tokenizer: MarinTokenizer, format: PromptCompletionPreferenceFormat):
        self.chat_template = format.chat_template or tokenizer.chat_template
        if self.chat_template is None:
            raise ValueError(
                f"Tokenizer {tokenizer.name_or_path} has no chat template and the data format sets none; set "
                "chat_template in the preference format"
            )
        if format.completion_tokens == "generation" and not chat_template_has_generation_block(self.chat_template):
            raise ValueError(
                "completion_tokens: generation trains the chat template's {% generation %} span, and the template "
                "has none; mark the assistant turn with {% generation %} or use completion_tokens: final_turn"
            )
        self.tokenizer = tokenizer
        self.format = format
        self.renderer = ChatRenderer(tokenizer, self.chat_template)
        self.policy = PairPolicy(
            completion_tokens=format.completion_tokens,
            budget=format.budget(),
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
            terminators=PairPolicy.terminators_of(
                tokenizer.all_special_ids,
                bos_id=tokenizer.bos_token_id,
                eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id,
            ),
        )
        special = tokenizer.convert_ids_to_tokens(list(tokenizer.all_special_ids))
        self.special_tokens = special_token_pattern([*special, tokenizer.bos_token, tokenizer.eos_token])

    def _template_kwargs(self, row: Mapping[str, Any]) -> dict[str, Any]:
        field = self.format.chat_template_kwargs
        if field is None or row.get(field) is None:
            return {}
        kwargs = row[field]
        if not isinstance(kwargs, Mapping):
            raise PreferenceRowError(f"{describe_row(row)}: {field!r} must be a mapping")
        forbidden = {"tokenize", "return_assistant_tokens_mask", "return_dict", "chat_template"} & set(kwargs)
        if forbidden:
            raise PreferenceRowError(f"{describe_row(row)}: {field!r} may not set {sorted(forbidden)}")
        return {k: v for k, v in kwargs.items() if k != "add_generation_prompt"}

    def _pair(self, source: Mapping[str, Any], rendering: RowRendering) -> dict[str, np.ndarray]:
        prompt, chosen, rejected = rendering
        for field, (ids, _) in ((self.format.chosen_field, chosen), (self.format.rejected_field, rejected)):
            # the boundary is only known if the prompt tokenizes the same alone and inside the transcript
            if ids[: len(prompt)] != prompt or len(ids) == len(prompt):
                raise PreferenceRowError(
                    f"the chat template's tokens for the prompt alone are not a proper prefix of its tokens for the "
                    f"{field!r} transcript, so the completion's first token is unknown"
                )
        return build_pair(len(prompt), chosen, rejected, self.policy, self.tokenizer.decode)

    def __call__(self, batch: Sequence[dict]) -> Sequence[dict]:
        out: list[dict | None] = [None] * len(batch)
        parsed: list[tuple[Any, dict]] = []
        to_render: list[int] = []
        for i, source in enumerate(batch):
            try:
                row = parse_preference_row(
                    source,
                    chosen_field=self.format.chosen_field,
                    rejected_field=self.format.rejected_field,
                    system_prompt_field=self.format.system_prompt,
                    special_tokens=self.special_tokens,
                )
                kwargs = self._template_kwargs(source)
            except PreferenceRowError as e:
                out[i] = cache_record(STATUS_ERROR, error=str(e))
                continue
            if row.drop:
                out[i] = cache_record(int(row.drop))
                continue
            parsed.append((row, kwargs))
            to_render.append(i)
        renderings = self.renderer.render_rows(
            [(r.prompt, [*r.prompt, r.chosen], [*r.prompt, r.rejected], kwargs) for r, kwargs in parsed]
        )
        for i, rendering in zip(to_render, renderings):
            source = batch[i]
            try:
                if isinstance(rendering, jinja2.TemplateError):
                    raise PreferenceRowError(f"the chat template fails on it: {rendering}")
                out[i] = self._pair(source, rendering)
            except PreferenceRowError as e:
                out[i] = cache_record(STATUS_ERROR, error=f"{describe_row(source)}: {e}")
        return out  # type: ignore[return-value]

    @property
    def output_exemplar(self):
        return cache_exemplar()

    @property
    def num_cpus(self) -> int:
        return 1

    @property
    def metadata(self) -> dict[str, Any]:
        budget = self.policy.budget
        return {
            "format": "preference_prompt_completion",
            "tokenizer": self.tokenizer.name_or_path,
            "vocab_size": self.tokenizer.vocab_size,
            "chat_template": self.chat_template,
            "chosen_field": self.format.chosen_field,
            "rejected_field": self.format.rejected_field,
            "system_prompt_field": self.format.system_prompt,
            "chat_template_kwargs_field": self.format.chat_template_kwargs,
            "completion_tokens": self.format.completion_tokens,
            "max_length": budget.max_length if budget else None,
            "max_prompt_length": budget.max_prompt_length if budget else None,
            "truncation_mode": budget.mode if budget else None,
        }
