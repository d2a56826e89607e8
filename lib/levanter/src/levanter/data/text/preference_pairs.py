# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Preference-pair datasets for SimPO: the train/validation split and data-set statistics.

Levanter's preference stack (``PreferenceLmDataConfig`` -> cache -> ``PreferencePairDataset``) tokenizes the
pairs; this module picks the single training component, splits off held-out pairs, checks every cached pair
against the sequence length before training starts, and summarises lengths so the length bias SimPO is meant
to remove is visible in the logs.
"""

import dataclasses
import logging
from typing import cast

import jax.random as jrandom
import numpy as np
from haliax import Axis
from jaxtyping import PRNGKeyArray

from levanter.data.dataset import AsyncDataset
from levanter.data.mixture import MixtureDataset
from levanter.data.text.datasets import BlockShuffleConfig, DatasetComponent
from levanter.data.text.preference import (
    DpoExample,
    PreferenceChatLmDatasetFormat,
    PreferenceLmDataConfig,
    dataset_for_preference_format,
)
from levanter.store.cache import TreeCache

logger = logging.getLogger(__name__)

_STATS_CHUNK_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class PreferencePairStats:
    """Token counts of one cached split. Completion tokens are the trained (assistant-masked) positions."""

    pairs: int
    mean_prompt_tokens: float
    mean_chosen_tokens: float
    mean_rejected_tokens: float
    max_sequence_tokens: int
    rejected_longer_fraction: float
    zero_token_completions: int

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{k}": float(v) for k, v in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        return (
            f"{self.pairs} pairs; mean completion tokens chosen {self.mean_chosen_tokens:.1f}, "
            f"rejected {self.mean_rejected_tokens:.1f} (rejected longer in {self.rejected_longer_fraction:.0%}); "
            f"mean prompt tokens {self.mean_prompt_tokens:.1f}; longest sequence {self.max_sequence_tokens} tokens"
        )


def preference_pair_stats(cache: TreeCache[dict], Pos: Axis, *, split: str) -> PreferencePairStats:
    """Reads every cached pair once; fails on the first pair that cannot be trained at this sequence length.

    A pair that does not fit would otherwise fail deep inside the packer (or, with truncation, be averaged over
    the wrong tokens), and a completion with no trained token would make its average log-prob meaningless.
    """
    n = len(cache)
    if n == 0:
        raise ValueError(f"The {split} preference cache at {cache.cache_dir} holds no pairs.")

    prompt, chosen, rejected, longest = [], [], [], 0
    for start in range(0, n, _STATS_CHUNK_ROWS):
        for offset, row in enumerate(cache.get_batch_sync(slice(start, min(n, start + _STATS_CHUNK_ROWS)))):
            index = start + offset
            for side in ("chosen", "rejected"):
                length = len(row[f"{side}_input_ids"])
                if length > Pos.size:
                    raise ValueError(
                        f"{split} pair {index}: the {side} sequence has {length} tokens, more than the training "
                        f"sequence length {Pos.size}. Raise train_seq_len or shorten/remove the row."
                    )
                longest = max(longest, length)
            chosen_mask = np.asarray(row["chosen_assistant_masks"])
            trained = np.flatnonzero(chosen_mask)
            prompt.append(int(trained[0]) if trained.size else len(chosen_mask))
            chosen.append(int(trained.size))
            rejected.append(int(np.count_nonzero(row["rejected_assistant_masks"])))

    chosen_a, rejected_a = np.array(chosen), np.array(rejected)
    return PreferencePairStats(
        pairs=n,
        mean_prompt_tokens=float(np.mean(prompt)),
        mean_chosen_tokens=float(chosen_a.mean()),
        mean_rejected_tokens=float(rejected_a.mean()),
        max_sequence_tokens=longest,
        rejected_longer_fraction=float(np.mean(rejected_a > chosen_a)),
        zero_token_completions=int(np.sum(chosen_a == 0) + np.sum(rejected_a == 0)),
    )


def num_validation_pairs(total: int, fraction: float) -> int:
    """Held-out pairs for a split fraction: at least one when the fraction is positive, never all of them."""
    if fraction <= 0 or total <= 1:
        return 0
    return min(max(int(total * fraction), 1), total - 1)


def _training_component(config: PreferenceLmDataConfig) -> tuple[str, DatasetComponent]:
    weights = config.train_weights
    if weights is None:
        names = set(config.components)
    elif isinstance(weights, dict):
        names = {name for name, w in weights.items() if w > 0}
    else:
        names = {name for _, stage in weights for name, w in stage.items() if w > 0}
    if len(names) != 1:
        raise ValueError(
            f"SimPO trains on exactly one preference component; found {len(names)} with training weight: "
            f"{sorted(names)}"
        )
    name = names.pop()
    return name, cast(DatasetComponent, config.components[name])


def _shuffled(dataset: AsyncDataset[DpoExample], config: PreferenceLmDataConfig, key: PRNGKeyArray):
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


@dataclasses.dataclass(frozen=True)
class PreferenceSplits:
    train: AsyncDataset[DpoExample]
    validation: dict[str, AsyncDataset[DpoExample]]
    stats: dict[str, PreferencePairStats]


def build_preference_splits(
    config: PreferenceLmDataConfig,
    Pos: Axis,
    *,
    key: PRNGKeyArray,
    validation_split_fraction: float | None,
) -> PreferenceSplits:
    """Training pairs (shuffled) and held-out pairs, either split off the end of the training cache or taken
    from the configured validation sets when ``validation_split_fraction`` is None."""
    name, component = _training_component(config)
    train_cache = config.build_caches("train").get(name)
    if train_cache is None:
        raise ValueError(f"No training cache could be built for preference component {name!r}.")
    stats = {"train": preference_pair_stats(train_cache, Pos, split="train")}
    pairs = dataset_for_preference_format(cast(PreferenceChatLmDatasetFormat, component.format), Pos, train_cache)

    validation: dict[str, AsyncDataset[DpoExample]] = {}
    if validation_split_fraction is not None:
        total = stats["train"].pairs
        held_out = num_validation_pairs(total, validation_split_fraction)
        if held_out:
            validation[name] = pairs.slice_dataset(start_index=total - held_out, end_index=total)
            pairs = pairs.slice_dataset(end_index=total - held_out)
            logger.info(f"Holding out the last {held_out} of {total} training pairs for validation.")
    else:
        for val_name, val_cache in config.build_caches("validation").items():
            val_format = cast(PreferenceChatLmDatasetFormat, config.components[val_name].format)
            stats[f"validation/{val_name}"] = preference_pair_stats(val_cache, Pos, split=f"validation {val_name}")
            validation[val_name] = dataset_for_preference_format(val_format, Pos, val_cache)

    shuffle_key, mix_key = jrandom.split(key)
    train = MixtureDataset(
        datasets={name: _shuffled(pairs, config, shuffle_key)},
        weights={name: 1.0},
        block_size=config.mixture_block_size,
        key=mix_key,
        stop_strategy=config.stop_strategy,
    )
    return PreferenceSplits(train=cast(AsyncDataset[DpoExample], train), validation=validation, stats=stats)
