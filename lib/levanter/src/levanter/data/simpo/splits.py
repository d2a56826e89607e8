# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""SimPO's training and held-out pairs from a ``PreferenceLmDataConfig``: per component, the cached pairs laid
out in rows by the pair layout, the held-out split, the shuffle, and the weighted mixture of the components."""

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import cast

import jax.random as jrandom
import numpy as np
from jaxtyping import PRNGKeyArray

from haliax import Axis
from levanter.data.dataset import AsyncDataset
from levanter.data.mixture import MixtureDataset, rescale_mixture_schedule_for_batch_schedule
from levanter.data.text.datasets import (
    BlockShuffleConfig,
    DatasetComponent,
    DatasetComponentBase,
    UrlDatasetSourceConfig,
)
from levanter.data.text.formats import LmDatasetFormatBase
from levanter.data.text.preference import PreferenceLmDataConfig, PreferencePairDataset
from levanter.schedule import BatchSchedule
from levanter.store.cache import TreeCache

from .cache import CachedPairs, EmptyPreferenceDataError, open_cached_pairs
from .cache_identity import build_identified_caches, recorded_identity
from .packing import PackedPairDataset, first_fit_decreasing
from .prompt_completion import PromptCompletionPreferenceFormat
from .shared_prompt import SharedPromptPairDataset
from .stats import PreferencePairStats

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PairRows:
    """A split laid out in rows: the dataset of rows and how many training pairs each row holds."""

    dataset: AsyncDataset
    pairs_per_row: np.ndarray
    real_tokens: int
    """Positions of the rows that hold a pair's token (the rest is padding)."""


class RowSubset(AsyncDataset):
    """Rows ``rows[0], rows[1], ...`` of a dataset."""

    def __init__(self, dataset: AsyncDataset, rows: np.ndarray):
        super().__init__()
        self.dataset, self.rows = dataset, np.asarray(rows, dtype=np.int64)

    async def async_len(self) -> int:
        return len(self.rows)

    def is_finite(self) -> bool:
        return True

    async def get_batch(self, indices: Sequence[int]):
        return await self.dataset.get_batch([int(self.rows[i]) for i in indices])


def padded_pair_rows(pairs: CachedPairs, kept: np.ndarray, Pos: Axis) -> PairRows:
    """Levanter's ``PreferencePairDataset`` over the cache, one pair a row, at the cache rows ``kept``."""
    dataset = PreferencePairDataset(pairs.pair_fields_view(), Pos, max_segments_per_example=1)
    return PairRows(RowSubset(dataset, kept), np.ones(len(kept), dtype=np.int64), _both_sides(pairs, kept))


def _both_sides(pairs: CachedPairs, kept: np.ndarray) -> int:
    return int(pairs.column("chosen_length")[kept].sum() + pairs.column("rejected_length")[kept].sum())


def packed_pair_rows(pairs: CachedPairs, kept: np.ndarray, Pos: Axis, max_pairs_per_row: int) -> PairRows:
    """The pairs at cache rows ``kept``, up to ``max_pairs_per_row`` a row pair (``first_fit_decreasing`` on both
    sides' lengths), as ``DpoExample``s whose attention segments are pairs."""
    sides = np.stack([pairs.column("chosen_length"), pairs.column("rejected_length")], axis=1)[kept]
    groups = [kept[g] for g in first_fit_decreasing(sides, Pos.size, max_pairs_per_row)]
    counts = np.array([len(g) for g in groups], dtype=np.int64)
    return PairRows(PackedPairDataset(pairs, groups, Pos), counts, _both_sides(pairs, kept))


def shared_prompt_rows(pairs: CachedPairs, kept: np.ndarray, Pos: Axis, max_pairs_per_row: int) -> PairRows:
    dataset = SharedPromptPairDataset(pairs, kept, Pos, max_pairs_per_row)
    real = _both_sides(pairs, kept) - int(pairs.column("prompt_length")[kept].sum())
    return PairRows(dataset, np.array([len(g) for g in dataset.groups], dtype=np.int64), real)


RowBuilder = Callable[[CachedPairs, np.ndarray], PairRows]
"""A pair layout's way of putting the pairs at some cache rows of a split in rows."""


def num_validation_pairs(total: int, fraction: float) -> int:
    """Held-out pairs for a split fraction: at least one when the fraction is positive, never all of them."""
    if fraction <= 0 or total <= 1:
        return 0
    return min(max(int(total * fraction), 1), total - 1)


def training_weights(config: PreferenceLmDataConfig) -> dict[str, float] | list[tuple[int, dict[str, float]]]:
    """The mixture weights of the components that train (all of them, equally, when none are given)."""
    weights = config.train_weights
    if weights is None:
        return {name: 1.0 for name in config.components}
    if isinstance(weights, dict):
        return {name: w for name, w in weights.items() if w > 0}
    return weights


def _trained_components(weights) -> list[str]:
    stages = [weights] if isinstance(weights, dict) else [stage for _, stage in weights]
    return sorted({name for stage in stages for name, w in stage.items() if w > 0})


def _shuffled(dataset: AsyncDataset, config: PreferenceLmDataConfig, key: PRNGKeyArray) -> AsyncDataset:
    shuffle = config.shuffle
    if isinstance(shuffle, BlockShuffleConfig):
        return dataset.block_shuffle(
            io_block_size=shuffle.io_block_size,
            window_blocks=shuffle.window_blocks,
            key=key,
            perm_type=shuffle.perm_type,
        )
    if shuffle is True:
        return dataset.shuffle(key, perm_type=config.permutation_type)
    return dataset


def row_weights(weights, pairs_per_row: dict[str, float]):
    """Mixture weights over rows that draw pairs by ``weights``: a component whose rows hold more pairs each is
    drawn less often (Levanter's mixture draws rows)."""

    def stage(ws: dict[str, float]) -> dict[str, float]:
        return {name: w / pairs_per_row[name] if name in pairs_per_row else w for name, w in ws.items()}

    if isinstance(weights, dict):
        return stage(weights)
    return [(start, stage(ws)) for start, ws in weights]


@dataclasses.dataclass(frozen=True)
class HeldOutPairs:
    """A component's held-out pairs: its cache and their rows in it, in cache order."""

    pairs: CachedPairs
    rows: np.ndarray


@dataclasses.dataclass(frozen=True)
class PreferenceSplits:
    components: dict[str, AsyncDataset]
    """Per training component, its shuffled training rows."""
    weights: dict[str, float] | list[tuple[int, dict[str, float]]]
    """The mixture weights over rows (``row_weights``); a list of stages starts each at a step."""
    mixture: dict
    """The rest of ``MixtureDataset``'s arguments: block size, key, stop strategy."""
    validation: dict[str, AsyncDataset]
    held_out: dict[str, HeldOutPairs]
    """Per component, the pairs ``validation`` lays out in rows."""
    stats: dict[str, PreferencePairStats]
    sources: dict[str, dict | None]
    """Per training component, the source files its cache was built from (``source_identity.json``)."""
    train_rows: dict[str, PairRows]
    """Per training component, its training rows (before the shuffle)."""
    pairs_per_row: float
    """Training pairs a row of the mixture holds on average (with the first stage's weights)."""

    def train(self, batch_schedule: BatchSchedule) -> AsyncDataset:
        """The training mixture for the trainer's batches of rows: staged weights start at steps, as in Levanter's
        LM data config, so their starts become row offsets of ``batch_schedule``, rounded to the mixture's block
        (Levanter's mixture changes weights only at block boundaries)."""
        weights = self.weights
        if isinstance(weights, list):
            block = self.mixture["block_size"]
            rows = rescale_mixture_schedule_for_batch_schedule(weights, batch_schedule)
            weights = [(start if start < 0 else round(start / block) * block, w) for start, w in rows]
            for (step, _), (row, _), (rounded, _) in zip(self.weights, rows, weights):
                if rounded != row:
                    logger.info(
                        f"train_weights stage at step {step} starts at row {rounded}, not {row}: a multiple of "
                        f"data.mixture_block_size {block}"
                    )
        return cast(AsyncDataset, MixtureDataset(datasets=self.components, weights=weights, **self.mixture))


def component_format(name: str, component: DatasetComponentBase) -> LmDatasetFormatBase:
    """The format of a preference data component; only cache-backed components (``type: cached``, the default)
    have one, which the pair caches need."""
    if not isinstance(component, DatasetComponent):
        raise ValueError(
            f"data component {name!r} is a {type(component).__name__}, which has no data format; SimPO reads "
            "cache-backed components (type: cached) of preference_prompt_completion pairs"
        )
    return component.format


def _check_format(config: PreferenceLmDataConfig, name: str, seq_len: int) -> PromptCompletionPreferenceFormat:
    format = component_format(name, config.components[name])
    if not isinstance(format, PromptCompletionPreferenceFormat):
        raise ValueError(
            f"Preference component {name!r} uses the {type(format).__name__} format; SimPO trains on "
            "preference_prompt_completion data (the same rows and cache fields, with the reference trainer's |y|, "
            "cuts and checks made when the cache is built): set `type: preference_prompt_completion`, and "
            "`completion_tokens: generation` for Levanter's chat masks"
        )
    if format.max_length is not None and format.max_length > seq_len:
        raise ValueError(
            f"Preference component {name!r}: max_length {format.max_length} is longer than the training sequence "
            f"length {seq_len}"
        )
    return format


def _open(
    config: PreferenceLmDataConfig, caches: dict[str, TreeCache], name: str, split: str, seq_len: int
) -> CachedPairs:
    """A component's cached pairs of a split, checked to fit in ``seq_len`` positions."""
    cache = caches.get(name)
    if cache is None:
        raise ValueError(f"No {split} cache could be built for preference component {name!r}.")
    format = _check_format(config, name, seq_len)
    try:
        pairs = open_cached_pairs(cache, format, config.the_tokenizer, split=f"{split} {name}")
    except EmptyPreferenceDataError:
        component = config.components[name]
        source = component.source if isinstance(component, DatasetComponent) else None
        urls = source.urls_for_split(split) if isinstance(source, UrlDatasetSourceConfig) else []
        files = f"its {split} files ({', '.join(urls)})" if urls else f"its {split} cache ({cache.cache_dir})"
        raise EmptyPreferenceDataError(
            f"Preference component {name!r} has no {split} rows: {files} hold no preference row. Point it at the "
            "data, or remove the component" + (" or its weight" if split == "train" else "")
        ) from None
    pairs.check_fits(seq_len)
    return pairs


def build_preference_splits(
    config: PreferenceLmDataConfig,
    rows_of: RowBuilder | None,
    *,
    seq_len: int,
    key: PRNGKeyArray,
    validation_split_fraction: float | None,
    choose_rows: Callable[[Sequence[CachedPairs]], RowBuilder] | None = None,
) -> PreferenceSplits:
    """Training rows (each component shuffled, then mixed so that the drawn pairs follow the configured weights)
    and held-out rows per
    component: the last ``validation_split_fraction`` of each component's pairs, or its validation set when the
    fraction is None. ``rows_of`` lays a split's pairs out in rows (the pair layout); ``choose_rows``, when given,
    is asked for it instead once every split's pairs are open (and their lengths known), training and held-out."""
    weights = training_weights(config)
    names = _trained_components(weights)
    for name in config.components:
        _check_format(config, name, seq_len)  # before any cache is built
    train_caches = build_identified_caches(config, "train")
    stats: dict[str, PreferencePairStats] = {}
    train: dict[str, AsyncDataset] = {}
    train_rows: dict[str, PairRows] = {}
    validation: dict[str, AsyncDataset] = {}
    held_out: dict[str, HeldOutPairs] = {}
    mix_key, *component_keys = jrandom.split(key, len(names) + 1)
    shuffle_keys = dict(zip(names, component_keys))
    train_pairs = {name: _open(config, train_caches, name, "train", seq_len) for name in names}
    validation_pairs: dict[str, CachedPairs] = {}
    if validation_split_fraction is None:
        for name, cache in build_identified_caches(config, "validation").items():
            validation_pairs[name] = _open(config, {name: cache}, name, "validation", seq_len)
    if choose_rows is not None:
        rows_of = choose_rows([*train_pairs.values(), *validation_pairs.values()])
    if rows_of is None:
        raise ValueError("build_preference_splits needs rows_of or choose_rows")
    for name in names:
        pairs = train_pairs[name]
        stats[f"train/{name}"] = pairs.stats()
        kept = pairs.kept
        if validation_split_fraction is not None:
            held = num_validation_pairs(len(kept), validation_split_fraction)
            if held:
                # the last pairs, whatever the layout: every layout evaluates the same pairs
                validation[name] = rows_of(pairs, kept[-held:]).dataset
                held_out[name] = HeldOutPairs(pairs, kept[-held:])
                kept = kept[:-held]
                logger.info(f"Holding out the last {held} of the {len(kept) + held} {name} pairs for validation.")
        rows = rows_of(pairs, kept)
        train_rows[name] = rows
        train[name] = _shuffled(rows.dataset, config, shuffle_keys[name])

    for name, pairs in validation_pairs.items():
        stats[f"validation/{name}"] = pairs.stats()
        validation[name] = rows_of(pairs, pairs.kept).dataset
        held_out[name] = HeldOutPairs(pairs, pairs.kept)

    per_row = {name: float(rows.pairs_per_row.mean()) for name, rows in train_rows.items()}
    sources = {name: recorded_identity(train_caches[name]) for name in names}
    first = weights if isinstance(weights, dict) else weights[0][1]
    drawn = {name: w for name, w in first.items() if w > 0 and name in per_row}
    if not drawn:
        raise ValueError(f"The first stage of train_weights draws none of the components that train: {first}")
    # rows are drawn in proportion to weight / pairs a row, so a row holds this many pairs on average
    pairs_per_row = sum(drawn.values()) / sum(w / per_row[name] for name, w in drawn.items())
    return PreferenceSplits(
        components=train,
        weights=row_weights(weights, per_row),
        mixture=dict(block_size=config.mixture_block_size, key=mix_key, stop_strategy=config.stop_strategy),
        validation=validation,
        held_out=held_out,
        stats=stats,
        sources=sources,
        train_rows=train_rows,
        pairs_per_row=pairs_per_row,
    )
