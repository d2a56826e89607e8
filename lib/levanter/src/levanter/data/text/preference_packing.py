# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Layouts that put several preference pairs in one sequence, so fewer of the trained positions are padding.

Two layouts, both keeping every completion's average log-prob exact:

- **packed pairs** (``packed_pair_dataset``): Levanter's ``PreferencePairDataset`` with
  ``max_segments_per_example > 1``. Row ``i`` of the chosen side holds the chosen sequences of pairs
  ``k = 0..n-1`` and the same row of the rejected side their rejected sequences, with the same segment ids, so
  segment-aware attention keeps pairs apart and the loss reduces per segment (``levanter.main.simpo_packing``).
- **shared prompt** (``PrefixSharedPairDataset``): one sequence per pair holds ``prompt, chosen, rejected``;
  both completions attend to the prompt, the rejected completion never to the chosen one, and positions restart
  after the prompt, so the prompt is run through the model once instead of twice. Several pairs are packed per
  row the same way.
"""

import dataclasses
import math
from typing import Literal, Sequence

import equinox as eqx
import haliax as hax
import numpy as np
from haliax import Axis, NamedArray

from levanter.data.dataset import AsyncDataset
from levanter.data.text.preference import (
    PreferenceChatLmDatasetFormat,
    PreferencePairDataset,
    ProcessedPreferenceChatDict,
)
from levanter.store.cache import TreeCache

# roles of the positions of a shared-prompt row
PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1


def packed_pair_dataset(
    format: PreferenceChatLmDatasetFormat,
    Pos: Axis,
    cache: TreeCache[ProcessedPreferenceChatDict],
    *,
    max_pairs_per_row: int,
) -> PreferencePairDataset:
    """Up to ``max_pairs_per_row`` consecutive pairs per row, each side packed with Levanter's greedy packer.

    Segment ids are the pairs' global indices (-1 on padding), identical on the two sides, so segment ``k`` of
    the chosen row and segment ``k`` of the rejected row are one pair.
    """
    if max_pairs_per_row < 1:
        raise ValueError(f"max_pairs_per_row must be at least 1, got {max_pairs_per_row}")
    return PreferencePairDataset(
        cache,
        Pos,
        max_segments_per_example=max_pairs_per_row,
        mask_user_turns=format.mask_user_turns,
        slice_strategy=format.slice_strategy,
    )


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


def _prompt_length(
    chosen: np.ndarray, chosen_trained: np.ndarray, rejected: np.ndarray, rejected_trained: np.ndarray
) -> int:
    n = min(len(chosen), len(rejected))
    differs = np.flatnonzero(chosen[:n] != rejected[:n])
    common = int(differs[0]) if differs.size else n
    for trained in (chosen_trained, rejected_trained):
        first = np.flatnonzero(trained)
        if first.size:
            common = min(common, int(first[0]))
    return common


def _row_sides(row: ProcessedPreferenceChatDict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    fields = ("input_ids", "assistant_masks")
    return tuple(  # type: ignore[return-value]
        np.asarray(row[f"{side}_{field}"]) for side in ("chosen", "rejected") for field in fields
    )


def shared_prompt_length(row: ProcessedPreferenceChatDict) -> int:
    """Tokens both sides start with and that neither trains on: the prompt computed once."""
    return _prompt_length(*_row_sides(row))


def shared_layout_of_sides(
    chosen: np.ndarray, chosen_trained: np.ndarray, rejected: np.ndarray, rejected_trained: np.ndarray
) -> SharedPairLayout:
    """``prompt, chosen suffix, rejected suffix`` of one pair's two token sequences and trained masks, with
    positions restarting after the prompt."""
    chosen, rejected = np.asarray(chosen), np.asarray(rejected)
    p = _prompt_length(chosen, chosen_trained, rejected, rejected_trained)
    if p == 0:
        # the first rejected token is predicted from the last prompt token; without one there is nothing to share
        raise ValueError("A pair whose two sides share no untrained prefix cannot share its prompt.")
    c_len, r_len = len(chosen) - p, len(rejected) - p
    return SharedPairLayout(
        tokens=np.concatenate([chosen[:p], chosen[p:], rejected[p:]]).astype(np.int32),
        roles=np.concatenate(
            [np.full(p, PROMPT), np.full(c_len, CHOSEN), np.full(r_len, REJECTED)]
        ).astype(np.int32),
        pos_ids=np.concatenate([np.arange(p), np.arange(p, p + c_len), np.arange(p, p + r_len)]).astype(np.int32),
        trained=np.concatenate([np.asarray(chosen_trained), np.asarray(rejected_trained)[p:]]).astype(np.float32),
        prompt_length=p,
    )


def shared_pair_layout(row: ProcessedPreferenceChatDict) -> SharedPairLayout:
    """``shared_layout_of_sides`` of a raw ``preference_chat`` cache row."""
    return shared_layout_of_sides(*_row_sides(row))


def pack_pair_sides(
    chosen: Sequence[tuple[np.ndarray, np.ndarray]], rejected: Sequence[tuple[np.ndarray, np.ndarray]], Pos: Axis
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One packed row pair from ``(tokens, trained)`` sequences: per side ``(tokens, loss_weight, segment_ids)``.

    Pair ``k`` is segment ``k`` on both sides (-1 on padding); the weight at ``t`` is the trained mask of token
    ``t + 1`` of the same pair, so a pair's last position never predicts the next pair's first token. Positions
    are not restarted per pair: with rotary embeddings attention only sees relative offsets, which segment
    masking keeps within a pair, so the loss is unchanged; absolute position embeddings (GPT-2) see shifted
    positions for every pair after the first.
    """

    def side(seqs: Sequence[tuple[np.ndarray, np.ndarray]]):
        tokens = np.zeros(Pos.size, np.int32)
        weight = np.zeros(Pos.size, np.float32)
        segments = np.full(Pos.size, -1, np.int32)
        start = 0
        for k, (t, trained) in enumerate(seqs):
            end = start + len(t)
            if end > Pos.size:
                raise ValueError(f"{len(seqs)} packed sequences take more than {Pos.size} tokens")
            tokens[start:end] = t
            weight[start : end - 1] = np.asarray(trained[1:], np.float32)
            segments[start:end] = k
            start = end
        return tokens, weight, segments

    return side(chosen), side(rejected)


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
        n, end = len(x), start + len(x)
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


def greedy_pack(lengths: Sequence[int] | Sequence[Sequence[int]], max_length: int, max_per_row: int) -> list[range]:
    """Consecutive items per row, a new row when the next would not fit (the order Levanter's packer keeps).

    An item's length may be a tuple (chosen and rejected lengths of a packed pair): every component must fit."""
    sizes = np.asarray(lengths, dtype=np.int64).reshape(len(lengths), -1)
    rows: list[range] = []
    start, used = 0, np.zeros(sizes.shape[1], np.int64)
    for i, n in enumerate(sizes):
        if np.any(n > max_length):
            raise ValueError(f"item {i} has {n.max()} tokens, more than the row length {max_length}")
        if i > start and (np.any(used + n > max_length) or i - start >= max_per_row):
            rows.append(range(start, i))
            start, used = i, np.zeros_like(used)
        used = used + n
    if len(lengths) > start:
        rows.append(range(start, len(lengths)))
    return rows


class PrefixSharedPairDataset(AsyncDataset[PrefixSharedPairs]):
    """Shared-prompt rows of up to ``max_pairs_per_row`` consecutive cached pairs each."""

    def __init__(self, cache: TreeCache[ProcessedPreferenceChatDict], Pos: Axis, *, max_pairs_per_row: int = 1):
        super().__init__()
        self.cache, self.Pos = cache, Pos
        self.max_pairs_per_row = max_pairs_per_row
        rows = cache.get_batch_sync(slice(0, len(cache)))
        lengths = [len(shared_pair_layout(r)) for r in rows]
        self._rows = greedy_pack(lengths, Pos.size, max_pairs_per_row)

    async def async_len(self) -> int:
        return len(self._rows)

    def is_finite(self) -> bool:
        return True

    async def get_batch(self, indices: Sequence[int]) -> Sequence[PrefixSharedPairs]:
        out = []
        for i in indices:
            r = self._rows[i]
            pairs = await self.cache.get_batch(list(r))
            fields = pack_shared_rows([shared_pair_layout(p) for p in pairs], self.Pos)
            out.append(PrefixSharedPairs(**{k: hax.named(v, self.Pos) for k, v in fields.items()}))
        return out


@dataclasses.dataclass(frozen=True)
class PaddingReport:
    """Share of the positions a layout sends through the model that are real tokens."""

    layout: str
    rows: int
    positions: int
    real_tokens: int

    @property
    def real_fraction(self) -> float:
        return self.real_tokens / self.positions if self.positions else math.nan


def padding_report(
    format: PreferenceChatLmDatasetFormat,
    cache: TreeCache[ProcessedPreferenceChatDict],
    Pos: Axis,
    layout: Literal["padded", "packed", "shared"],
    *,
    max_pairs_per_row: int = 1,
) -> PaddingReport:
    """Rows, positions and real tokens of the batches a layout builds from a cache, counted on the datasets the
    trainer uses: ``padded`` is Levanter's ``PreferencePairDataset`` (two rows per pair), ``packed`` the same with
    ``max_pairs_per_row`` pairs per row pair, ``shared`` one shared-prompt row per ``max_pairs_per_row`` pairs."""
    rows = cache.get_batch_sync(slice(0, len(cache)))
    if layout == "shared":
        dataset: AsyncDataset = PrefixSharedPairDataset(cache, Pos, max_pairs_per_row=max_pairs_per_row)
        n_rows = len(dataset.as_sync_dataset())
        real = sum(len(shared_pair_layout(r)) for r in rows)
        return PaddingReport(layout, n_rows, n_rows * Pos.size, real)
    per_row = 1 if layout == "padded" else max_pairs_per_row
    n_rows = 2 * len(packed_pair_dataset(format, Pos, cache, max_pairs_per_row=per_row).as_sync_dataset())
    real = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    return PaddingReport(layout, n_rows, n_rows * Pos.size, real)
