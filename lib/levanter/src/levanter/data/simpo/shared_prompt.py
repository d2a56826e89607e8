# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Shared-prompt rows: each pair laid out once as ``prompt, chosen, rejected``, several pairs a row.

Both completions attend to the prompt, the rejected completion never to the chosen one, and positions restart
after the prompt, so the prompt runs through the model once instead of twice. The pairs come from the same
cache the other layouts read, and the prompt boundary is the one the cache builder stored.
"""

import dataclasses
from collections.abc import Sequence

import equinox as eqx
import numpy as np

import haliax as hax
from haliax import Axis, NamedArray

from .cache import CachedPairs
from .packing import PairGroupDataset, first_fit_decreasing

# roles of the positions of a shared-prompt row
PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1


class PrefixSharedPairs(eqx.Module):
    """Rows of pairs laid out as ``prompt, chosen, rejected``; every field has the row's position axis.

    ``chosen_weight[t]`` / ``rejected_weight[t]`` weight the prediction made at position ``t`` of the token at
    ``t + 1``, except that this prediction uses the hidden state at ``predictor[t]``: for the last chosen token
    that is the last prompt token, which is what predicts the first rejected token in the unshared layout.
    """

    tokens: NamedArray
    pos_ids: NamedArray
    pair_ids: NamedArray
    """Index of the pair within its row (0, 1, ...), -1 on padding."""
    roles: NamedArray
    chosen_weight: NamedArray
    rejected_weight: NamedArray
    predictor: NamedArray


@dataclasses.dataclass(frozen=True)
class SharedPairLayout:
    """One pair in the shared layout, before packing: tokens and per-token roles and trained masks."""

    tokens: np.ndarray
    roles: np.ndarray
    pos_ids: np.ndarray
    trained: np.ndarray
    prompt_length: int

    def __len__(self) -> int:
        return len(self.tokens)


def shared_layout(row: dict[str, np.ndarray], prompt_length: int) -> SharedPairLayout:
    """``prompt, chosen completion, rejected completion`` of a cached pair, positions restarting after the
    prompt. Both sides start with the same ``prompt_length`` tokens, none of them trained."""
    chosen, rejected = row["chosen_input_ids"], row["rejected_input_ids"]
    p = prompt_length
    c_len, r_len = len(chosen) - p, len(rejected) - p
    return SharedPairLayout(
        tokens=np.concatenate([chosen, rejected[p:]]).astype(np.int32),
        roles=np.concatenate([np.full(p, PROMPT), np.full(c_len, CHOSEN), np.full(r_len, REJECTED)]).astype(np.int32),
        pos_ids=np.concatenate([np.arange(p + c_len), np.arange(p, p + r_len)]).astype(np.int32),
        trained=np.concatenate([row["chosen_assistant_masks"], row["rejected_assistant_masks"][p:]]).astype(
            np.float32
        ),
        prompt_length=p,
    )


def pack_shared_rows(layouts: Sequence[SharedPairLayout], Pos: Axis) -> dict[str, np.ndarray]:
    """One row of ``PrefixSharedPairs`` fields (numpy) from pairs that fit together in ``Pos``."""
    L = Pos.size
    total = sum(len(x) for x in layouts)
    if total > L:
        raise ValueError(f"{len(layouts)} shared-prompt pairs take {total} tokens, more than {L}")
    out = {
        "tokens": np.zeros(L, np.int32),
        "pos_ids": np.zeros(L, np.int32),
        "pair_ids": np.full(L, -1, np.int32),
        "roles": np.full(L, PADDING, np.int32),
        "chosen_weight": np.zeros(L, np.float32),
        "rejected_weight": np.zeros(L, np.float32),
        "predictor": np.arange(L, dtype=np.int32),
    }
    start = 0
    for k, x in enumerate(layouts):
        end = start + len(x)
        out["tokens"][start:end] = x.tokens
        out["pos_ids"][start:end] = x.pos_ids
        out["pair_ids"][start:end] = k
        out["roles"][start:end] = x.roles
        # the prediction at t is of token t + 1: shift the trained mask left, within this pair only
        for role, name in ((CHOSEN, "chosen_weight"), (REJECTED, "rejected_weight")):
            target = np.where(x.roles == role, x.trained, 0.0)
            out[name][start : end - 1] = target[1:]
        first_rejected = np.flatnonzero(x.roles == REJECTED)
        if first_rejected.size:
            # the last chosen token's slot predicts the first rejected token, from the last prompt token's state
            out["predictor"][start + first_rejected[0] - 1] = start + x.prompt_length - 1
        start = end
    return out


class SharedPromptPairDataset(PairGroupDataset[PrefixSharedPairs]):
    """The pairs at cache rows ``kept``, up to ``max_pairs_per_row`` a row, grouped by ``first_fit_decreasing``
    from the lengths the cache builder recorded."""

    def __init__(self, pairs: CachedPairs, kept: np.ndarray, Pos: Axis, max_pairs_per_row: int):
        lengths = (pairs.column("chosen_length") + pairs.column("rejected_length") - pairs.column("prompt_length"))[
            kept
        ]
        over = np.flatnonzero(lengths > Pos.size)
        if over.size:
            raise ValueError(
                f"{pairs.split} row {kept[over[0]]} takes {lengths[over[0]]} tokens as prompt, chosen, rejected, "
                f"more than the sequence length {Pos.size} ({over.size} such pairs); with pair_layout shared_prompt "
                "set train_seq_len (and the model's max_seq_len) above the data format's max_length"
            )
        super().__init__(pairs, [kept[g] for g in first_fit_decreasing(lengths, Pos.size, max_pairs_per_row)], Pos)
        self.prompt_length = pairs.column("prompt_length")

    def row(self, rows: np.ndarray, cached: Sequence[dict[str, np.ndarray]]) -> PrefixSharedPairs:
        layouts = [shared_layout(row, int(self.prompt_length[r])) for r, row in zip(rows, cached)]
        fields = pack_shared_rows(layouts, self.Pos)
        return PrefixSharedPairs(**{k: hax.named(v, self.Pos) for k, v in fields.items()})
