# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The ``preference_prompt_completion`` format: preference pairs with a known prompt/completion boundary.

Levanter's ``preference_chat`` renders each transcript whole and trains the ``{% generation %}`` spans, so it
cannot tell the prompt from the completion, cannot cut an over-long pair the way the SimPO reference trainer
does, and counts in ``|y|`` only what the template marks. This format renders the shared prompt on its own and
each full transcript, stores where the prompt ends, and leaves two choices to example-building time (they need
no re-tokenization):

- ``completion_tokens``, what ``|y|`` counts (``final_turn``: the reference trainer's; ``generation``:
  Levanter's chat mask), see ``pair_sides``;
- the truncation budgets, see ``levanter.data.text.preference_truncation``.

It subclasses ``PreferenceChatLmDatasetFormat``, so ``PreferenceLmDataConfig`` accepts it; ``slice_strategy``
and ``pack`` keep their required values and are not used.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jinja2
import numpy as np

from levanter.data._preprocessor import BatchProcessor
from levanter.tokenizers import MarinTokenizer

from .formats import LmDatasetFormatBase
from .preference import PreferenceChatLmDatasetFormat
from .preference_rows import PreferenceRowError, describe_row, parse_preference_row
from .preference_truncation import PairSide, TruncationBudget, TruncationMode

CompletionTokens = Literal["final_turn", "generation"]


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
    """Total token budget of a sequence (the reference's ``max_length``); None uses the training sequence length."""
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
        if self.max_length is not None:
            self.budget(self.max_length)  # max_prompt_length must leave the completions a token

    def budget(self, seq_len: int) -> TruncationBudget:
        """The budgets for sequences of ``seq_len`` positions."""
        max_length = self.max_length if self.max_length is not None else seq_len
        if max_length > seq_len:
            raise ValueError(f"max_length {max_length} is longer than the training sequence length {seq_len}")
        max_prompt_length = self.max_prompt_length if self.max_prompt_length is not None else max_length // 2
        return TruncationBudget(max_length, max_prompt_length, self.truncation_mode)

    def build_preprocessor(
        self, tokenizer: MarinTokenizer, *, enforce_eos: bool = True, enforce_bos: bool = True
    ) -> BatchProcessor[dict, dict]:
        del enforce_eos, enforce_bos  # checked per row by the data-set scan, against the |y| definition in use
        return PromptCompletionProcessor(
            tokenizer,
            chosen_field=self.chosen_field,
            rejected_field=self.rejected_field,
            chat_template=self.chat_template,
            system_prompt_field=self.system_prompt,
            chat_template_kwargs_field=self.chat_template_kwargs,
        )


class PromptCompletionProcessor(BatchProcessor[dict, dict]):
    """Renders each row's prompt alone and its two full transcripts, one cache row per source row.

    Stores Levanter's preference fields (``{side}_input_ids``, ``{side}_assistant_masks`` from the
    ``{% generation %}`` spans) plus ``prompt_length`` and ``drop`` (a ``RowDrop`` code), each as a 1-element
    array, and ``error``, the UTF-8 message of a malformed row (empty otherwise). Never skips a row, so cache
    row ``i`` is source row ``i`` and the scan can name it.
    """

    def __init__(
        self,
        tokenizer: MarinTokenizer,
        *,
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        chat_template: str | None = None,
        system_prompt_field: str | None = None,
        chat_template_kwargs_field: str | None = "chat_template_kwargs",
    ):
        self.chat_template = chat_template or tokenizer.chat_template
        if self.chat_template is None:
            raise ValueError(
                f"Tokenizer {tokenizer.name_or_path} has no chat template and the data format sets none; set "
                "chat_template in the preference format"
            )
        self.tokenizer = tokenizer
        self.chosen_field = chosen_field
        self.rejected_field = rejected_field
        self.system_prompt_field = system_prompt_field
        self.chat_template_kwargs_field = chat_template_kwargs_field

    def _template_kwargs(self, row: Mapping[str, Any]) -> dict[str, Any]:
        field = self.chat_template_kwargs_field
        if field is None or row.get(field) is None:
            return {}
        kwargs = row[field]
        if not isinstance(kwargs, Mapping):
            raise PreferenceRowError(f"{describe_row(row)}: {field!r} must be a mapping")
        forbidden = {"tokenize", "return_assistant_tokens_mask", "return_dict", "chat_template"} & set(kwargs)
        if forbidden:
            raise PreferenceRowError(f"{describe_row(row)}: {field!r} may not set {sorted(forbidden)}")
        return {k: v for k, v in kwargs.items() if k != "add_generation_prompt"}

    def _render(self, conversation: list[dict], kwargs: dict) -> tuple[list[int], list[int]]:
        out = self.tokenizer.apply_chat_template_with_masks([conversation], chat_template=self.chat_template, **kwargs)
        return out["input_ids"][0], out["assistant_masks"][0]

    def _process(self, source: Mapping[str, Any]) -> dict[str, np.ndarray]:
        row = parse_preference_row(
            source,
            chosen_field=self.chosen_field,
            rejected_field=self.rejected_field,
            system_prompt_field=self.system_prompt_field,
        )
        kwargs = self._template_kwargs(source)
        try:
            prompt, _ = self._render(row.prompt, kwargs)
            chosen_ids, chosen_mask = self._render([*row.prompt, row.chosen], kwargs)
            rejected_ids, rejected_mask = self._render([*row.prompt, row.rejected], kwargs)
        except jinja2.TemplateError as e:
            raise PreferenceRowError(f"{describe_row(source)}: the chat template fails on it: {e}") from None
        for field, ids in ((self.chosen_field, chosen_ids), (self.rejected_field, rejected_ids)):
            # the boundary is only known if the prompt tokenizes the same alone and inside the transcript
            if ids[: len(prompt)] != prompt or len(ids) == len(prompt):
                raise PreferenceRowError(
                    f"{describe_row(source)}: the chat template's tokens for the prompt alone are not a proper prefix "
                    f"of its tokens for the {field!r} transcript, so the completion's first token is unknown"
                )
        return {
            "chosen_input_ids": np.asarray(chosen_ids, dtype=np.int32),
            "chosen_assistant_masks": np.asarray(chosen_mask, dtype=np.int32),
            "rejected_input_ids": np.asarray(rejected_ids, dtype=np.int32),
            "rejected_assistant_masks": np.asarray(rejected_mask, dtype=np.int32),
            "prompt_length": np.asarray([len(prompt)], dtype=np.int32),
            "drop": np.asarray([row.drop], dtype=np.int32),
            "error": np.zeros((0,), dtype=np.uint8),
        }

    def __call__(self, batch: Sequence[dict]) -> Sequence[dict]:
        out = []
        for source in batch:
            try:
                out.append(self._process(source))
            except PreferenceRowError as e:
                # kept as a row, so the data-set scan can name the source row index when it fails the run
                out.append({**self.output_exemplar, "error": np.frombuffer(str(e).encode("utf-8"), dtype=np.uint8)})
        return out

    @property
    def output_exemplar(self):
        exemplar = {
            name: np.zeros((0,), dtype=np.int32)
            for name in (
                "chosen_input_ids",
                "chosen_assistant_masks",
                "rejected_input_ids",
                "rejected_assistant_masks",
                "prompt_length",
                "drop",
            )
        }
        return {**exemplar, "error": np.zeros((0,), dtype=np.uint8)}

    @property
    def num_cpus(self) -> int:
        return 1

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "format": "preference_prompt_completion",
            "tokenizer": self.tokenizer.name_or_path,
            "vocab_size": self.tokenizer.vocab_size,
            "chat_template": self.chat_template,
            "chosen_field": self.chosen_field,
            "rejected_field": self.rejected_field,
            "system_prompt_field": self.system_prompt_field,
            "chat_template_kwargs_field": self.chat_template_kwargs_field,
        }


def pair_sides(
    row: Mapping[str, np.ndarray], completion_tokens: CompletionTokens, *, eos_id: int | None
) -> tuple[PairSide, PairSide]:
    """The chosen and rejected sequences of a cached row, with their trained positions under a ``|y|``
    definition, before any cut.

    ``final_turn`` appends EOS to a completion that does not end with it, as the reference trainer does, and
    trains the whole final turn; ``generation`` trains the final turn's ``{% generation %}`` span. Either way
    earlier assistant turns are prompt (Levanter's chat format trains them too).
    """
    prompt_length = int(row["prompt_length"][0])

    def side(prefix: str) -> PairSide:
        tokens = np.asarray(row[f"{prefix}_input_ids"], dtype=np.int32)
        completion = np.arange(len(tokens)) >= prompt_length
        if completion_tokens == "generation":
            return PairSide(tokens, completion & (np.asarray(row[f"{prefix}_assistant_masks"]) != 0), prompt_length)
        if eos_id is not None and tokens[-1] != eos_id:
            tokens = np.append(tokens, np.int32(eos_id))
            completion = np.append(completion, True)
        return PairSide(tokens, completion, prompt_length)

    return side("chosen"), side("rejected")
