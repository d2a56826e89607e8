# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Preference pairs for SimPO, from the tokenized cache to ``DpoExample``s: checks, cuts, drops, statistics and
the train/validation split.

Before training, every cached pair is read once (``scan_preference_cache``):

- its sequences are checked: exactly one BOS, at position 0, and a completion that ends with EOS or an
  end-of-turn token found nowhere else in it; a violation fails the run naming the row;
- its ``|y|`` definition and the truncation budgets are applied (``preference_prompt_completion`` format), or,
  with Levanter's ``preference_chat`` format, its ``{% generation %}`` mask is used as is and a pair longer than
  the sequence fails the run;
- pairs that cannot teach a preference are dropped and counted by reason: rows flagged by
  ``levanter.data.text.preference_rows`` and completions left with no trained token;
- token lengths are summarised so the length bias SimPO is meant to remove is visible, logged, and written to
  ``pair_stats.json`` in the cache directory.

``TrainablePairs`` then serves the kept pairs, applying the same cuts, as ``DpoExample``s, one pair per row;
``PackedTrainablePairs`` serves them several per row in the ``packed`` or ``shared_prompt`` layout.
"""

import collections
import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any, Literal, cast

import equinox as eqx
import fsspec
import haliax as hax
import jax
import jax.random as jrandom
import numpy as np
from haliax import Axis
from jaxtyping import PRNGKeyArray

from levanter.data.dataset import AsyncDataset
from levanter.data.mixture import MixtureDataset
from levanter.data.text.datasets import BlockShuffleConfig, DatasetComponent, UrlDatasetSourceConfig
from levanter.data.text.preference import DpoExample, PreferenceChatLmDatasetFormat, PreferenceLmDataConfig
from levanter.data.text.preference_packing import (
    PrefixSharedPairs,
    greedy_pack,
    pack_pair_sides,
    pack_shared_rows,
    shared_layout_of_sides,
)
from levanter.data.text.preference_prompt_completion import PromptCompletionPreferenceFormat, pair_sides
from levanter.data.text.preference_rows import PreferenceRowError, RowDrop
from levanter.data.text.preference_truncation import CutPair, PairSide, cut_pair
from levanter.models.lm_model import LmExample
from levanter.store.cache import TreeCache
from levanter.tokenizers import MarinTokenizer, chat_template_has_generation_block

logger = logging.getLogger(__name__)

_SCAN_CHUNK_ROWS = 4096
STATS_FILE = "pair_stats.json"
NO_TRAINED_TOKENS = "no_trained_tokens"

PairLayout = Literal["padded", "packed", "shared_prompt"]
PAIR_LAYOUTS: tuple[str, ...] = ("padded", "packed", "shared_prompt")


class PairBuilder:
    """Turns a cached row into the two sequences SimPO trains on, under one data format and sequence length."""

    def __init__(self, format: PreferenceChatLmDatasetFormat, Pos: Axis, tokenizer: MarinTokenizer):
        self.Pos = Pos
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        # what may end a completion: EOS and the template's end-of-turn token, which tokenizers list as special
        # (GPT-2-style tokenizers use one token as both BOS and EOS)
        not_terminators = {self.bos_id, tokenizer.pad_token_id, None} - {self.eos_id}
        self.terminators = (set(tokenizer.all_special_ids) | {self.eos_id}) - not_terminators
        if isinstance(format, PromptCompletionPreferenceFormat):
            self.format_metadata: dict[str, Any] | None = format.build_preprocessor(tokenizer).metadata
            self.completion_tokens: str | None = format.completion_tokens
            self.budget = format.budget(Pos.size)
            template = format.chat_template or tokenizer.chat_template
            has_generation = template is not None and chat_template_has_generation_block(template)
            if self.completion_tokens == "generation" and not has_generation:
                raise ValueError(
                    "completion_tokens: generation trains the chat template's {% generation %} span, and the template "
                    "has none; mark the assistant turn with {% generation %} or use completion_tokens: final_turn"
                )
        else:
            # Levanter's preference_chat: the template's masks as they are, no cuts
            self.format_metadata = None
            self.completion_tokens = None
            self.budget = None

    def check_cache(self, cache: TreeCache[dict]) -> None:
        """Fails on a cache tokenized with another template or fields: Levanter only warns and reuses it."""
        if self.format_metadata is None:
            return
        built = cache.ledger.metadata.preprocessor_metadata or {}
        changed = sorted(k for k, v in self.format_metadata.items() if k != "tokenizer" and built.get(k) != v)
        if changed:
            raise ValueError(
                f"The preference cache at {cache.cache_dir} was built with other settings ({', '.join(changed)}) "
                "than the data format now has; delete it or set another cache_dir"
            )

    def describe(self) -> dict[str, Any]:
        if self.budget is None:
            # no cuts: a pair over the sequence length fails the run
            return {"format": "preference_chat", "completion_tokens": "every {% generation %} span", "cut": "never"}
        return {
            "format": "preference_prompt_completion",
            "completion_tokens": self.completion_tokens,
            "max_length": self.budget.max_length,
            "max_prompt_length": self.budget.max_prompt_length,
            "truncation_mode": self.budget.mode,
        }

    def sides(self, row: dict) -> tuple[PairSide, PairSide]:
        """Both sides before any cut."""
        if self.completion_tokens is not None:
            return pair_sides(row, self.completion_tokens, eos_id=self.eos_id)

        def side(prefix: str) -> PairSide:
            mask = np.asarray(row[f"{prefix}_assistant_masks"]) != 0
            trained = np.flatnonzero(mask)
            prompt_length = int(trained[0]) if trained.size else len(mask)
            return PairSide(np.asarray(row[f"{prefix}_input_ids"], dtype=np.int32), mask, prompt_length)

        return side("chosen"), side("rejected")

    def cut(self, chosen: PairSide, rejected: PairSide) -> CutPair:
        if self.budget is not None:
            return cut_pair(chosen, rejected, self.budget, bos_id=self.bos_id)
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            if len(side.tokens) > self.Pos.size:
                raise ValueError(
                    f"the {name} sequence has {len(side.tokens)} tokens, more than the training sequence length "
                    f"{self.Pos.size}. Use the preference_prompt_completion format to cut over-long pairs, or raise "
                    "train_seq_len"
                )
        return CutPair(chosen, rejected, prompt_cut=False, completions_cut=False)

    def build(self, row: dict) -> CutPair:
        return self.cut(*self.sides(row))

    def _snippet(self, tokens: np.ndarray) -> str:
        return repr(self.tokenizer.decode(tokens.tolist()))

    def problem(self, side: PairSide) -> str | None:
        """What is wrong with a sequence's BOS or its completion's end, if anything."""
        tokens = side.tokens
        if self.bos_id is not None:
            bos_positions = np.flatnonzero(tokens == self.bos_id)
            if self.bos_id == self.eos_id and bos_positions.size and bos_positions[-1] == len(tokens) - 1:
                bos_positions = bos_positions[:-1]  # that one is the completion's EOS
            if bos_positions.tolist() != [0]:
                return (
                    f"it has BOS at positions {bos_positions[:8].tolist()}, where exactly one, at position 0, is "
                    f"expected (does the chat template write bos_token more than once, or not at all?). It starts "
                    f"{self._snippet(tokens[:24])}"
                )
        trained = np.flatnonzero(side.trained)
        if trained.size == 0:
            return None  # dropped, and counted, as a pair without trained tokens
        # the last contiguous trained span: the final completion (Levanter's format also trains earlier turns)
        gaps = np.flatnonzero(np.diff(trained) > 1)
        completion = tokens[trained[gaps[-1] + 1 if gaps.size else 0] : trained[-1] + 1]
        end = len(completion)
        while end > 0 and int(completion[end - 1]) in self.terminators:
            end -= 1
        if end == len(completion):
            return (
                f"its completion ends with {self._snippet(completion[-1:])}, not EOS or an end-of-turn token, so the "
                f"model would never learn to stop. It ends {self._snippet(completion[-24:])}"
            )
        for token in set(completion[end:].tolist()):
            count = int(np.sum(completion == token))
            if count > 1:
                return (
                    f"its completion holds {self._snippet(np.array([token]))} {count} times, where exactly one, at "
                    f"its end, is expected. It ends {self._snippet(completion[-24:])}"
                )
        return None


@dataclasses.dataclass(frozen=True)
class TokenLengths:
    mean: float
    median: float
    max: int

    @staticmethod
    def of(values: Sequence[int]) -> "TokenLengths":
        a = np.asarray(values)
        return TokenLengths(float(a.mean()), float(np.median(a)), int(a.max()))


@dataclasses.dataclass(frozen=True)
class PreferencePairStats:
    """One cached split. Lengths are of the pairs that train, after cuts; completion lengths are ``|y|``, the
    trained tokens a completion's log-prob is averaged over."""

    rows: int
    pairs: int
    prompt_tokens: TokenLengths
    chosen_tokens: TokenLengths
    rejected_tokens: TokenLengths
    rejected_longer_fraction: float
    max_sequence_tokens: int
    cut: dict[str, int]
    """Pairs whose prompt was cut, whose completions were cut, and either."""
    dropped: dict[str, int]
    """Rows left out of training, by reason."""

    def as_metrics(self, prefix: str) -> dict[str, float]:
        def flat(name: str, value) -> dict[str, float]:
            if isinstance(value, dict):
                return {k: v for key, sub in value.items() for k, v in flat(f"{name}/{key}", sub).items()}
            return {name: float(value)}

        return flat(prefix, dataclasses.asdict(self))

    def describe(self) -> str:
        def lengths(t: TokenLengths) -> str:
            return f"mean {t.mean:.1f} / median {t.median:.0f} / max {t.max}"

        dropped = ", ".join(f"{k} {v}" for k, v in self.dropped.items() if v) or "none"
        return (
            f"{self.pairs} of {self.rows} pairs train; completion tokens |y| chosen {lengths(self.chosen_tokens)}, "
            f"rejected {lengths(self.rejected_tokens)} (rejected longer in {self.rejected_longer_fraction:.0%}); "
            f"prompt tokens {lengths(self.prompt_tokens)}; longest sequence {self.max_sequence_tokens}; "
            f"cut {self.cut['pairs']} (prompt {self.cut['prompt']}, completions {self.cut['completions']}); "
            f"dropped: {dropped}"
        )


@dataclasses.dataclass(frozen=True)
class PreferenceScan:
    stats: PreferencePairStats
    kept: np.ndarray
    """Cache rows of the pairs that train, in cache order."""
    dropped_rows: dict[str, list[int]]


def scan_preference_rows(rows, builder: PairBuilder, *, split: str) -> PreferenceScan:
    """Checks, cuts and counts ``(cache row index, cached row)`` pairs; raises on the first invalid sequence."""
    kept: list[int] = []
    dropped: dict[str, list[int]] = collections.defaultdict(list)
    prompt, chosen, rejected, longest = [], [], [], 0
    cut = {"prompt": 0, "completions": 0, "pairs": 0}
    total = 0
    for index, row in rows:
        total += 1
        if len(row.get("error", ())):
            raise PreferenceRowError(f"{split} row {index}: {bytes(row['error']).decode('utf-8')}")
        drop = RowDrop(int(row["drop"][0])) if "drop" in row else RowDrop.NONE
        if drop != RowDrop.NONE:
            dropped[drop.label].append(index)
            continue
        sides = builder.sides(row)
        for name, side in zip(("chosen", "rejected"), sides):
            problem = builder.problem(side)
            if problem is not None:
                raise PreferenceRowError(f"{split} row {index}, {name} sequence: {problem}")
        try:
            pair = builder.cut(*sides)
        except ValueError as e:
            raise PreferenceRowError(f"{split} row {index}: {e}") from None
        chosen_count, rejected_count = int(pair.chosen.trained.sum()), int(pair.rejected.trained.sum())
        if chosen_count == 0 or rejected_count == 0:
            dropped[NO_TRAINED_TOKENS].append(index)
            continue
        kept.append(index)
        prompt.append(pair.chosen.prompt_length)
        chosen.append(chosen_count)
        rejected.append(rejected_count)
        longest = max(longest, len(pair.chosen.tokens), len(pair.rejected.tokens))
        cut["prompt"] += pair.prompt_cut
        cut["completions"] += pair.completions_cut
        cut["pairs"] += pair.prompt_cut or pair.completions_cut

    if total == 0:
        raise ValueError(f"The {split} preference data holds no rows.")
    counts = {reason.label: len(dropped[reason.label]) for reason in RowDrop if reason != RowDrop.NONE}
    counts[NO_TRAINED_TOKENS] = len(dropped[NO_TRAINED_TOKENS])
    if not kept:
        raise ValueError(f"None of the {total} {split} preference rows trains; dropped by reason: {counts}")
    chosen_a, rejected_a = np.array(chosen), np.array(rejected)
    stats = PreferencePairStats(
        rows=total,
        pairs=len(kept),
        prompt_tokens=TokenLengths.of(prompt),
        chosen_tokens=TokenLengths.of(chosen),
        rejected_tokens=TokenLengths.of(rejected),
        rejected_longer_fraction=float(np.mean(rejected_a > chosen_a)),
        max_sequence_tokens=longest,
        cut=cut,
        dropped=counts,
    )
    return PreferenceScan(stats, np.asarray(kept, dtype=np.int64), dict(dropped))


def _cache_rows(cache: TreeCache[dict]):
    n = len(cache)
    for start in range(0, n, _SCAN_CHUNK_ROWS):
        yield from enumerate(cache.get_batch_sync(slice(start, min(n, start + _SCAN_CHUNK_ROWS))), start)


def scan_preference_cache(cache: TreeCache[dict], builder: PairBuilder, *, split: str) -> PreferenceScan:
    """``scan_preference_rows`` over a cache; logs the statistics and drops and writes them next to the cache."""
    builder.check_cache(cache)
    try:
        scan = scan_preference_rows(_cache_rows(cache), builder, split=split)
    except PreferenceRowError as e:
        # a fixed row or template does not reach a cache that already exists: Levanter reuses it as it is
        raise PreferenceRowError(f"{e}\nAfter fixing it, delete the cache at {cache.cache_dir} to rebuild.") from None
    for reason, rows in scan.dropped_rows.items():
        if rows:
            logger.warning(f"Dropped {len(rows)} {split} preference rows ({reason}); first rows: {rows[:10]}")
    if jax.process_index() == 0:
        report = {
            "split": split,
            "policy": builder.describe(),
            "stats": dataclasses.asdict(scan.stats),
            "dropped_rows": {reason: rows[:1000] for reason, rows in scan.dropped_rows.items() if rows},
        }
        path = f"{cache.cache_dir.rstrip('/')}/{STATS_FILE}"
        with fsspec.open(path, "w") as f:
            json.dump(report, f, indent=2)
        logger.info(f"Wrote {split} preference statistics to {path}")
    return scan


def _side_arrays(side: PairSide, Pos: Axis) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(side.tokens)
    tokens = np.zeros(Pos.size, dtype=np.int32)
    tokens[:n] = side.tokens
    # position t predicts token t + 1, so it carries the weight of the token after it
    weight = np.zeros(Pos.size, dtype=np.float32)
    weight[: n - 1] = side.trained[1:]
    segments = np.full(Pos.size, -1, dtype=np.int32)
    segments[:n] = 0
    return tokens, weight, segments


@eqx.filter_jit
def _dpo_example(Pos: Axis, chosen: tuple, rejected: tuple) -> DpoExample:
    def side(arrays) -> LmExample:
        tokens, weight, segments = (hax.named(a, Pos) for a in arrays)
        return LmExample.causal(tokens=tokens, loss_weight=weight, segment_ids=segments)

    out = DpoExample(chosen=side(chosen), rejected=side(rejected))
    # as Levanter's PreferencePairDataset: examples stay on the host until the loader shards them
    host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    return jax.lax.with_sharding_constraint(out, host)


class TrainablePairs(AsyncDataset[DpoExample]):
    """The kept pairs of a cache, cut to their budgets and padded to ``Pos``, as ``DpoExample``s."""

    def __init__(self, cache: TreeCache[dict], rows: np.ndarray, builder: PairBuilder):
        self.cache = cache
        self.rows = rows
        self.builder = builder

    async def async_len(self) -> int:
        return len(self.rows)

    def is_finite(self) -> bool:
        return True

    async def get_batch(self, indices: Sequence[int]) -> Sequence[DpoExample]:
        cached = await self.cache.get_batch([int(self.rows[i]) for i in indices])
        Pos = self.builder.Pos
        examples = []
        for row in cached:
            pair = self.builder.build(row)
            examples.append(_dpo_example(Pos, _side_arrays(pair.chosen, Pos), _side_arrays(pair.rejected, Pos)))
        return examples


def _host_rows(fields: dict[str, np.ndarray], Pos: Axis) -> PrefixSharedPairs:
    rows = PrefixSharedPairs(**{k: hax.named(jax.numpy.asarray(v), Pos) for k, v in fields.items()})
    host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    return jax.device_put(rows, host)


class PackedTrainablePairs(AsyncDataset):
    """The kept pairs of a cache, cut as ``TrainablePairs`` cuts them, with up to ``max_pairs_per_row``
    consecutive pairs (in cache order) per row: ``packed`` gives ``DpoExample``s whose chosen and rejected rows
    hold the pairs as segments (``pack_pair_sides``), ``shared_prompt`` gives ``PrefixSharedPairs`` rows of
    ``prompt, chosen, rejected`` (``shared_layout_of_sides``). Rows are planned once, from every kept pair's
    lengths, with ``greedy_pack``."""

    def __init__(
        self, cache: TreeCache[dict], rows: np.ndarray, builder: PairBuilder, layout: PairLayout, max_pairs_per_row: int
    ):
        if layout not in ("packed", "shared_prompt"):
            raise ValueError(f"PackedTrainablePairs builds the packed and shared_prompt layouts, not {layout!r}")
        if max_pairs_per_row < 1:
            raise ValueError(f"max_pairs_per_row must be at least 1, got {max_pairs_per_row}")
        self.cache, self.rows, self.builder = cache, rows, builder
        self.layout, self.max_pairs_per_row = layout, max_pairs_per_row
        lengths: list = []
        for start in range(0, len(rows), _SCAN_CHUNK_ROWS):
            chunk = [int(r) for r in rows[start : start + _SCAN_CHUNK_ROWS]]
            for index, row in zip(chunk, cache.get_batch_sync(chunk)):
                pair = builder.build(row)
                if layout == "packed":
                    lengths.append((len(pair.chosen.tokens), len(pair.rejected.tokens)))
                    continue
                n = len(self._shared(pair))
                if n > builder.Pos.size:
                    # the pair's cut bounds each side by the sequence length, not prompt + both completions
                    raise ValueError(
                        f"cache row {index} takes {n} tokens as prompt, chosen, rejected, more than the sequence "
                        f"length {builder.Pos.size}; with pair_layout shared_prompt set train_seq_len (and the model's "
                        "max_seq_len) above the data format's max_length"
                    )
                lengths.append(n)
        self._packed = greedy_pack(lengths, builder.Pos.size, max_pairs_per_row)

    @staticmethod
    def _shared(pair: CutPair):
        chosen, rejected = pair.chosen, pair.rejected
        return shared_layout_of_sides(chosen.tokens, chosen.trained, rejected.tokens, rejected.trained)

    async def async_len(self) -> int:
        return len(self._packed)

    def is_finite(self) -> bool:
        return True

    async def get_batch(self, indices: Sequence[int]):
        Pos = self.builder.Pos
        wanted = [self._packed[i] for i in indices]
        cached = await self.cache.get_batch([int(self.rows[j]) for r in wanted for j in r])
        pairs = [self.builder.build(row) for row in cached]
        out, start = [], 0
        for r in wanted:
            group, start = pairs[start : start + len(r)], start + len(r)
            if self.layout == "packed":
                chosen, rejected = pack_pair_sides(
                    [(p.chosen.tokens, p.chosen.trained) for p in group],
                    [(p.rejected.tokens, p.rejected.trained) for p in group],
                    Pos,
                )
                out.append(_dpo_example(Pos, chosen, rejected))
            else:
                out.append(_host_rows(pack_shared_rows([self._shared(p) for p in group], Pos), Pos))
        return out


def pair_rows(
    cache: TreeCache[dict],
    rows: np.ndarray,
    builder: PairBuilder,
    layout: PairLayout = "padded",
    max_pairs_per_row: int = 1,
) -> AsyncDataset:
    """The dataset of training rows for a layout: one pair per row (``TrainablePairs``) or packed rows."""
    if layout == "padded":
        return TrainablePairs(cache, rows, builder)
    return PackedTrainablePairs(cache, rows, builder, layout, max_pairs_per_row)


def _first_undecodable_line(config: PreferenceLmDataConfig, split: str) -> tuple[str, int] | None:
    """The first JSON-lines source line of ``split`` that is not UTF-8, as (file, 0-based line)."""
    for component in config.components.values():
        source = getattr(component, "source", None)
        if not isinstance(source, UrlDatasetSourceConfig):
            continue
        for url in source.urls_for_split(split):
            if ".json" not in url:
                continue
            for opened in fsspec.open_files(url, "rb", compression="infer"):
                with opened as f:
                    for index, line in enumerate(f):
                        try:
                            line.decode("utf-8")
                        except UnicodeDecodeError:
                            return opened.path, index
    return None


def _build_caches(config: PreferenceLmDataConfig, split: str) -> dict[str, TreeCache[dict]]:
    try:
        return config.build_caches(split)
    except Exception as e:
        # Levanter's JSON-lines reader fails on undecodable bytes inside the cache builder's worker, with a
        # message that names neither the file nor the row; find them before passing the failure on
        if "UnicodeDecodeError" not in f"{type(e).__name__} {e}":
            raise
        located = _first_undecodable_line(config, split)
        if located is None:
            raise
        raise PreferenceRowError(f"{split} file {located[0]}, row {located[1]}: the line is not valid UTF-8") from e


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
    train: AsyncDataset[DpoExample | PrefixSharedPairs]
    validation: dict[str, AsyncDataset[DpoExample | PrefixSharedPairs]]
    stats: dict[str, PreferencePairStats]


def build_preference_splits(
    config: PreferenceLmDataConfig,
    Pos: Axis,
    *,
    key: PRNGKeyArray,
    validation_split_fraction: float | None,
    layout: PairLayout = "padded",
    max_pairs_per_row: int = 1,
) -> PreferenceSplits:
    """Training pairs (shuffled) and held-out pairs, either split off the end of the training pairs or taken
    from the configured validation sets when ``validation_split_fraction`` is None.

    With the ``packed`` or ``shared_prompt`` layout both are rows of up to ``max_pairs_per_row`` consecutive kept
    pairs (``PackedTrainablePairs``); the training rows, not the pairs, are shuffled."""
    tokenizer = config.the_tokenizer
    name, component = _training_component(config)
    builder = PairBuilder(cast(PreferenceChatLmDatasetFormat, component.format), Pos, tokenizer)
    train_cache = _build_caches(config, "train").get(name)
    if train_cache is None:
        raise ValueError(f"No training cache could be built for preference component {name!r}.")
    scan = scan_preference_cache(train_cache, builder, split="train")
    stats = {"train": scan.stats}
    kept = scan.kept

    validation: dict[str, AsyncDataset] = {}
    if validation_split_fraction is not None:
        held_out = num_validation_pairs(len(kept), validation_split_fraction)
        if held_out:
            validation[name] = pair_rows(train_cache, kept[-held_out:], builder, layout, max_pairs_per_row)
            kept = kept[:-held_out]
            logger.info(f"Holding out the last {held_out} of {scan.stats.pairs} training pairs for validation.")
    else:
        for val_name, val_cache in _build_caches(config, "validation").items():
            val_format = cast(PreferenceChatLmDatasetFormat, config.components[val_name].format)
            val_builder = PairBuilder(val_format, Pos, tokenizer)
            val_scan = scan_preference_cache(val_cache, val_builder, split=f"validation {val_name}")
            stats[f"validation/{val_name}"] = val_scan.stats
            validation[val_name] = pair_rows(val_cache, val_scan.kept, val_builder, layout, max_pairs_per_row)

    shuffle_key, mix_key = jrandom.split(key)
    pairs = pair_rows(train_cache, kept, builder, layout, max_pairs_per_row)
    train = MixtureDataset(
        datasets={name: _shuffled(pairs, config, shuffle_key)},
        weights={name: 1.0},
        block_size=config.mixture_block_size,
        key=mix_key,
        stop_strategy=config.stop_strategy,
    )
    return PreferenceSplits(train=cast(AsyncDataset, train), validation=validation, stats=stats)
