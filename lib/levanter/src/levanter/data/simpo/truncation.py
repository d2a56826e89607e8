# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Cutting over-long preference pairs in the SimPO reference trainer's order, so every pair trains.

princeton-nlp/SimPO's ``tokenize_row`` (inherited from TRL's DPO trainer) keeps a total budget ``max_length``
and a prompt budget ``max_prompt_length``. With ``longer`` the longer of the two completions:

1. if ``prompt + longer > max_length``, the prompt is cut to ``max_prompt_length`` tokens, keeping its end
   (``keep_end``) or its start (``keep_start``);
2. if ``prompt + longer`` is still over ``max_length``, both completions are cut to their first
   ``max_length - max_prompt_length`` tokens.

Both steps decide on the longer completion, so a short chosen answer is cut when the rejected one is long.
One deliberate difference: ``keep_end`` keeps the sequence's BOS token and the last ``max_prompt_length - 1``
prompt tokens, where the reference drops BOS with the rest of the prompt's start.
"""

import dataclasses
from typing import Literal

import numpy as np

TruncationMode = Literal["keep_end", "keep_start"]


@dataclasses.dataclass(frozen=True)
class TruncationBudget:
    max_length: int
    max_prompt_length: int
    mode: TruncationMode = "keep_end"

    def __post_init__(self):
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"max_prompt_length must be in [1, max_length), got {self.max_prompt_length} with max_length "
                f"{self.max_length}: the completions need at least one token of the budget"
            )
        if self.mode not in ("keep_end", "keep_start"):
            raise ValueError(f"truncation_mode must be 'keep_end' or 'keep_start', got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class PairSide:
    """One side of a pair: its whole sequence, where the prompt ends, and which positions are trained."""

    tokens: np.ndarray
    trained: np.ndarray
    prompt_length: int

    @property
    def completion_length(self) -> int:
        return len(self.tokens) - self.prompt_length

    def keep(self, prompt_positions: np.ndarray, completion_length: int) -> "PairSide":
        positions = np.concatenate(
            [prompt_positions, np.arange(self.prompt_length, self.prompt_length + completion_length)]
        )
        return PairSide(self.tokens[positions], self.trained[positions], len(prompt_positions))


@dataclasses.dataclass(frozen=True)
class CutPair:
    chosen: PairSide
    rejected: PairSide
    prompt_cut: bool
    completions_cut: bool


def _kept_prompt(side: PairSide, budget: TruncationBudget, bos_id: int | None) -> np.ndarray:
    length, keep = side.prompt_length, budget.max_prompt_length
    if length <= keep:
        return np.arange(length)
    if budget.mode == "keep_start":
        return np.arange(keep)
    if bos_id is not None and side.tokens[0] == bos_id:
        return np.concatenate([[0], np.arange(length - keep + 1, length)])
    return np.arange(length - keep, length)


def cut_pair(chosen: PairSide, rejected: PairSide, budget: TruncationBudget, *, bos_id: int | None) -> CutPair:
    longer = max(chosen.completion_length, rejected.completion_length)

    def cut_prompt(side: PairSide) -> PairSide:
        if side.prompt_length + longer <= budget.max_length:
            return side
        return side.keep(_kept_prompt(side, budget, bos_id), side.completion_length)

    def cut_completion(side: PairSide) -> PairSide:
        if side.prompt_length + longer <= budget.max_length:
            return side
        kept = min(side.completion_length, budget.max_length - budget.max_prompt_length)
        return side.keep(np.arange(side.prompt_length), kept)

    new_chosen, new_rejected = cut_completion(cut_prompt(chosen)), cut_completion(cut_prompt(rejected))
    return CutPair(
        chosen=new_chosen,
        rejected=new_rejected,
        prompt_cut=any(n.prompt_length < o.prompt_length for n, o in ((new_chosen, chosen), (new_rejected, rejected))),
        completions_cut=any(
            n.completion_length < o.completion_length for n, o in ((new_chosen, chosen), (new_rejected, rejected))
        ),
    )
