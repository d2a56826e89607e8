# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""From one rendered preference row to the pair SimPO trains on: ``|y|``, checks, cuts and drops.

The cache builder (``PromptCompletionProcessor``) calls ``build_pair`` once per row, so every decision is made
once, when the cache is built, and the cache holds exactly what trains:

1. ``pair_sides``: both sequences and their trained positions under the ``|y|`` definition;
2. ``sequence_problem``: exactly one BOS, at position 0, and a completion that ends with EOS or an end-of-turn
   token found nowhere else in it; a violation is a malformed row (the run stops and names it);
3. ``cut_pair``: the reference trainer's budgets (``levanter.data.simpo.truncation``);
4. drops, counted by reason: a completion left without a trained token, or two completions that train on the
   same tokens after the cut.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np

from .rows import PreferenceRowError, RowDrop
from .truncation import CutPair, PairSide, TruncationBudget, cut_pair

CompletionTokens = Literal["final_turn", "generation"]

# what each cache row records besides its tokens, one int32 each, in this order
PAIR_INFO = (
    "prompt_length",
    "chosen_length",
    "rejected_length",
    "chosen_trained",
    "rejected_trained",
    "status",
    "prompt_cut",
    "completions_cut",
)
STATUS_ERROR = -1
"""``status`` of a malformed row (its message is in the ``error`` field); otherwise a ``RowDrop`` value."""


@dataclasses.dataclass(frozen=True)
class PairPolicy:
    """What ``|y|`` counts, the budgets, and the tokens the checks know."""

    completion_tokens: CompletionTokens
    budget: TruncationBudget | None
    """None: nothing is cut, and a pair longer than the training sequence stops the run at start."""
    bos_id: int | None
    eos_id: int | None
    terminators: frozenset[int]
    """Tokens that may end a completion: EOS and the template's end-of-turn token (tokenizers list it as special)."""

    @staticmethod
    def terminators_of(all_special_ids, *, bos_id, eos_id, pad_id) -> frozenset[int]:
        # GPT-2-style tokenizers use one token as both BOS and EOS
        not_terminators = {bos_id, pad_id, None} - {eos_id}
        return frozenset((set(all_special_ids) | {eos_id}) - not_terminators)


def pair_sides(
    prompt_length: int,
    chosen: tuple[list[int], list[int]],
    rejected: tuple[list[int], list[int]],
    completion_tokens: CompletionTokens,
    *,
    eos_id: int | None,
) -> tuple[PairSide, PairSide]:
    """The chosen and rejected sequences (``(input_ids, generation mask)`` each) with their trained positions
    under a ``|y|`` definition, before any cut.

    ``final_turn`` appends EOS to a completion that does not end with it, as the reference trainer does, and
    trains the whole final turn; ``generation`` trains the final turn's ``{% generation %}`` span. Either way
    earlier assistant turns are prompt (Levanter's chat format trains them too).
    """

    def side(ids: list[int], generation_mask: list[int]) -> PairSide:
        tokens = np.asarray(ids, dtype=np.int32)
        completion = np.arange(len(tokens)) >= prompt_length
        if completion_tokens == "generation":
            return PairSide(tokens, completion & (np.asarray(generation_mask) != 0), prompt_length)
        if eos_id is not None and tokens[-1] != eos_id:
            tokens = np.append(tokens, np.int32(eos_id))
            completion = np.append(completion, True)
        return PairSide(tokens, completion, prompt_length)

    return side(*chosen), side(*rejected)


def sequence_problem(side: PairSide, policy: PairPolicy, decode: Callable[[list[int]], str]) -> str | None:
    """What is wrong with a sequence's BOS or its completion's end, if anything."""

    def snippet(tokens: np.ndarray) -> str:
        return repr(decode(tokens.tolist()))

    tokens = side.tokens
    if policy.bos_id is not None:
        bos_positions = np.flatnonzero(tokens == policy.bos_id)
        if policy.bos_id == policy.eos_id and bos_positions.size and bos_positions[-1] == len(tokens) - 1:
            bos_positions = bos_positions[:-1]  # that one is the completion's EOS
        if bos_positions.tolist() != [0]:
            return (
                f"it has BOS at positions {bos_positions[:8].tolist()}, where exactly one, at position 0, is "
                f"expected (does the chat template write bos_token more than once, or not at all?). It starts "
                f"{snippet(tokens[:24])}"
            )
    trained = np.flatnonzero(side.trained)
    if trained.size == 0:
        return None  # dropped, and counted, as a pair without trained tokens
    # the last contiguous trained span: the final completion
    gaps = np.flatnonzero(np.diff(trained) > 1)
    completion = tokens[trained[gaps[-1] + 1 if gaps.size else 0] : trained[-1] + 1]
    end = len(completion)
    while end > 0 and int(completion[end - 1]) in policy.terminators:
        end -= 1
    if end == len(completion):
        return (
            f"its completion ends with {snippet(completion[-1:])}, not EOS or an end-of-turn token, so the "
            f"model would never learn to stop. It ends {snippet(completion[-24:])}"
        )
    for token in set(completion[end:].tolist()):
        count = int(np.sum(completion == token))
        if count > 1:
            return (
                f"its completion holds {snippet(np.array([token]))} {count} times, where exactly one, at "
                f"its end, is expected. It ends {snippet(completion[-24:])}"
            )
    return None


def _trained_tokens(side: PairSide) -> np.ndarray:
    return side.tokens[side.trained]


def pair_drop(pair: CutPair) -> RowDrop:
    """Why a checked and cut pair cannot teach a preference, if it cannot."""
    if not pair.chosen.trained.any() or not pair.rejected.trained.any():
        return RowDrop.NO_TRAINED_TOKENS
    if np.array_equal(_trained_tokens(pair.chosen), _trained_tokens(pair.rejected)):
        return RowDrop.IDENTICAL_AFTER_CUT
    return RowDrop.NONE


def _info(status: int, pair: CutPair | None = None) -> np.ndarray:
    info = dict.fromkeys(PAIR_INFO, 0)
    info["status"] = status
    if pair is not None:
        info |= {
            "prompt_length": pair.chosen.prompt_length,
            "chosen_length": len(pair.chosen.tokens),
            "rejected_length": len(pair.rejected.tokens),
            "chosen_trained": int(pair.chosen.trained.sum()),
            "rejected_trained": int(pair.rejected.trained.sum()),
            "prompt_cut": int(pair.prompt_cut),
            "completions_cut": int(pair.completions_cut),
        }
    return np.asarray([info[k] for k in PAIR_INFO], dtype=np.int32)


# the sequence of a row that does not train: one untrained token, because Marin's tokenize drops records whose
# token field is empty, which would shift every later row and lose the row's drop or error
_PLACEHOLDER = np.zeros((1,), dtype=np.int32)


def cache_record(status: int, pair: CutPair | None = None, error: str = "") -> dict[str, np.ndarray]:
    """One cache row: Levanter's preference fields (``*_assistant_masks`` holding the trained positions, which
    ``PreferencePairDataset`` turns into loss weights), ``pair_info`` (``PAIR_INFO``) and ``error``. A row that
    does not train keeps its place with a one-token placeholder and nothing trained, so cache row ``i`` is source
    row ``i``; the datasets leave it out."""
    sides = {"chosen": pair.chosen, "rejected": pair.rejected} if pair is not None and status == 0 else {}
    record: dict[str, np.ndarray] = {}
    for name in ("chosen", "rejected"):
        side = sides.get(name)
        record[f"{name}_input_ids"] = side.tokens.astype(np.int32) if side is not None else _PLACEHOLDER
        record[f"{name}_assistant_masks"] = side.trained.astype(np.int32) if side is not None else _PLACEHOLDER
    record["pair_info"] = _info(status, pair)
    record["error"] = np.frombuffer(error.encode("utf-8"), dtype=np.uint8).copy()
    return record


def build_pair(
    prompt_length: int,
    chosen: tuple[list[int], list[int]],
    rejected: tuple[list[int], list[int]],
    policy: PairPolicy,
    decode: Callable[[list[int]], str],
) -> dict[str, np.ndarray]:
    """The cache row of a rendered pair; raises ``PreferenceRowError`` on a malformed one."""
    sides = pair_sides(prompt_length, chosen, rejected, policy.completion_tokens, eos_id=policy.eos_id)
    for name, side in zip(("chosen", "rejected"), sides):
        problem = sequence_problem(side, policy, decode)
        if problem is not None:
            raise PreferenceRowError(f"{name} sequence: {problem}")
    if policy.budget is None:
        pair = CutPair(*sides, prompt_cut=False, completions_cut=False)
    else:
        pair = cut_pair(*sides, policy.budget, bos_id=policy.bos_id)
    return cache_record(int(pair_drop(pair)), pair)


def cache_exemplar() -> Mapping[str, np.ndarray]:
    return cache_record(0)
