# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Several pairs a row: which pairs share a row (first-fit decreasing), and the ``packed`` layout's rows.

Levanter's prepacking puts consecutive cache rows together and closes a row at the first pair that does not fit:
about 73% of the positions hold real tokens at 2048 on UltraFeedback-like lengths. First-fit decreasing over a
window of consecutive pairs fills about 92% (``packed``: a pair's chosen and rejected sequences go in the same row
pair, so both rows must have room) and 98% (``shared_prompt``: one row). The plan depends only on the pairs'
lengths, which the cache builder stored, so every start of a run makes the same rows: the data order and resume
stay exact; the rows are then shuffled like any other dataset.
"""

import abc
from collections.abc import Sequence
from typing import TypeVar

import jax
import numpy as np

import haliax as hax
from haliax import Axis
from levanter.data.dataset import AsyncDataset
from levanter.data.text.preference import DpoExample
from levanter.layers.attention import AttentionMask
from levanter.models.lm_model import LmExample

from .cache import CachedPairs

T = TypeVar("T")

PACKING_WINDOW = 1024
"""Consecutive pairs packed together; longer windows fill rows a little better (92% at 1,024 pairs, 87% at 64)."""


def first_fit_decreasing(
    lengths: np.ndarray, capacity: int, max_items: int, window: int = PACKING_WINDOW
) -> list[np.ndarray]:
    """Groups of indices into ``lengths`` that fit ``capacity`` together, at most ``max_items`` a group.

    ``lengths`` is ``(n,)``, or ``(n, d)`` for items that fill ``d`` rows at once (each dimension must fit).
    Within each window of ``window`` consecutive items, the longest item goes first into the first group with
    room; each group lists its items in their original order, and the groups come in the order of their first item.
    """
    sizes = np.asarray(lengths, dtype=np.int64).reshape(len(lengths), -1)
    if np.any(sizes > capacity):
        raise ValueError(f"item {int(np.argmax(np.any(sizes > capacity, axis=1)))} is longer than {capacity}")
    groups: list[np.ndarray] = []
    for start in range(0, len(sizes), window):
        stop = min(start + window, len(sizes))
        order = start + np.argsort(-sizes[start:stop].max(axis=1), kind="stable")
        room = np.empty((stop - start, sizes.shape[1]), dtype=np.int64)
        count = np.zeros(stop - start, dtype=np.int64)
        members: list[list[int]] = []
        for i in order:
            open_ = len(members)
            fits = np.all(room[:open_] >= sizes[i], axis=1) & (count[:open_] < max_items)
            g = int(np.argmax(fits)) if fits.any() else open_
            if g == open_:
                room[g] = capacity
                members.append([])
            room[g] -= sizes[i]
            count[g] += 1
            members[g].append(int(i))
        # rows in the order of their first pair, not of their longest: a windowed shuffle of rows made longest
        # first would put rows of alike lengths in the same batches
        groups.extend(sorted((np.sort(np.array(m, dtype=np.int64)) for m in members), key=lambda g: int(g[0])))
    return groups


def packed_side(tokens: Sequence[np.ndarray], trained: Sequence[np.ndarray], Pos: Axis) -> LmExample:
    """One row of pairs' sequences of one side: pair ``k`` is attention segment ``k``; the weight at ``t`` is
    whether token ``t + 1`` of the same pair trains (a pair's first token, BOS, never does)."""
    L = Pos.size
    ids, segments, weight = np.zeros(L, np.int32), np.full(L, -1, np.int32), np.zeros(L, np.float32)
    start = 0
    for k, (t, m) in enumerate(zip(tokens, trained)):
        end = start + len(t)
        ids[start:end], segments[start:end] = t, k
        weight[start : end - 1] = m[1:]
        start = end
    return LmExample(
        tokens=hax.named(ids, Pos),
        loss_weight=hax.named(weight, Pos),
        attn_mask=AttentionMask.causal().with_segment_ids(hax.named(segments, Pos)),
    )


class PairGroupDataset(AsyncDataset[T]):
    """Rows of pairs, row ``i`` holding the cache rows ``groups[i]``: a batch's pairs are read in one request and
    each row is made (``row``) and left on the host, as Levanter's ``PreferencePairDataset`` leaves its examples
    until the loader shards them."""

    def __init__(self, pairs: CachedPairs, groups: list[np.ndarray], Pos: Axis):
        super().__init__()
        self.view, self.groups, self.Pos = pairs.pair_fields_view(), groups, Pos

    async def async_len(self) -> int:
        return len(self.groups)

    def is_finite(self) -> bool:
        return True

    @abc.abstractmethod
    def row(self, rows: np.ndarray, cached: Sequence[dict[str, np.ndarray]]) -> T:
        """One row from its pairs' cache rows and their cached fields."""

    async def get_batch(self, indices: Sequence[int]) -> Sequence[T]:
        wanted = [self.groups[i] for i in indices]
        cached = await self.view.get_batch([int(r) for rows in wanted for r in rows])
        host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        out, start = [], 0
        for rows in wanted:
            out.append(jax.device_put(self.row(rows, cached[start : start + len(rows)]), host))
            start += len(rows)
        return out


class PackedPairDataset(PairGroupDataset[DpoExample]):
    """Levanter ``DpoExample`` rows: the group's chosen sequences one after another in the chosen row, its rejected
    sequences in the rejected row, each pair its own attention segment."""

    def row(self, rows: np.ndarray, cached: Sequence[dict[str, np.ndarray]]) -> DpoExample:
        chosen, rejected = (
            packed_side([r[f"{s}_input_ids"] for r in cached], [r[f"{s}_assistant_masks"] for r in cached], self.Pos)
            for s in ("chosen", "rejected")
        )
        return DpoExample(chosen=chosen, rejected=rejected)
