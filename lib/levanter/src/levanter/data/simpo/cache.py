# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""A built ``preference_prompt_completion`` cache, as the trainer opens it.

The cache builder has already made every per-pair decision (``levanter.data.simpo.pair_build``);
opening a split reads only the small ``pair_info`` field (a few integers a row): which rows train, which were
dropped and why, the statistics, and whether a malformed row stops the run. The token fields are read by
Levanter's ``PreferencePairDataset`` through ``pair_fields_view``, which opens nothing else.
"""

import dataclasses
import logging
from collections.abc import Callable

import numpy as np

from levanter.store.cache import TreeCache
from levanter.tokenizers import MarinTokenizer

from .pair_build import PAIR_INFO, STATUS_ERROR
from .prompt_completion import PromptCompletionPreferenceFormat
from .rows import PreferenceRowError, RowDrop
from .stats import PreferencePairStats

logger = logging.getLogger(__name__)

# the fields Levanter's PreferencePairDataset reads
PAIR_FIELDS = ("chosen_input_ids", "chosen_assistant_masks", "rejected_input_ids", "rejected_assistant_masks")


def _view(cache: TreeCache, fields: dict[str, type]) -> TreeCache:
    """The same cache opened with only ``fields``."""
    exemplar: dict[str, np.ndarray] = {name: np.zeros((0,), dtype=dtype) for name, dtype in fields.items()}
    return TreeCache(cache.cache_dir, exemplar, cache.ledger)


def check_cache_settings(cache: TreeCache, format: PromptCompletionPreferenceFormat, tokenizer: MarinTokenizer):
    """Fails on a cache built with another format, template or budgets: Levanter only warns and reuses it."""
    built = cache.ledger.metadata.preprocessor_metadata or {}
    if built.get("format") != "preference_prompt_completion":
        raise ValueError(
            f"The preference cache at {cache.cache_dir} was not built by the preference_prompt_completion format "
            "(SimPO's |y|, cuts and checks are made when the cache is built); delete it or set another cache_dir"
        )
    wanted = format.build_preprocessor(tokenizer).metadata
    changed = sorted(k for k, v in wanted.items() if k != "tokenizer" and built.get(k) != v)
    if changed:
        raise ValueError(
            f"The preference cache at {cache.cache_dir} was built with other settings ({', '.join(changed)}) "
            "than the data format now has; delete it or set another cache_dir"
        )


@dataclasses.dataclass(frozen=True)
class CachedPairs:
    """One split's cache and the ``PAIR_INFO`` of each of its rows."""

    cache: TreeCache
    info: np.ndarray
    split: str

    def column(self, name: str) -> np.ndarray:
        return self.info[:, PAIR_INFO.index(name)]

    @property
    def trains(self) -> np.ndarray:
        """Per cache row: whether it holds a pair that trains."""
        return self.column("status") == RowDrop.NONE

    @property
    def kept(self) -> np.ndarray:
        """Cache rows of the pairs that train, in cache order."""
        return np.flatnonzero(self.trains)

    def stats(self) -> PreferencePairStats:
        return PreferencePairStats.of(self.info)

    def pair_fields_view(self) -> TreeCache:
        """The cache with only the fields ``PreferencePairDataset`` reads."""
        return _view(self.cache, dict.fromkeys(PAIR_FIELDS, np.int32))

    def check_fits(self, seq_len: int) -> None:
        """Every pair that trains fits in ``seq_len`` positions (the format's budgets, when set, make sure)."""
        longest = np.maximum(self.column("chosen_length"), self.column("rejected_length"))
        over = np.flatnonzero(self.trains & (longest > seq_len))
        if over.size:
            raise ValueError(
                f"{over.size} {self.split} pairs are longer than the training sequence length {seq_len} (rows "
                f"{over[:10].tolist()}, up to {int(longest[over].max())} tokens); set the data format's "
                "max_length (and max_prompt_length) to cut them as the reference trainer does, or raise train_seq_len"
            )


class EmptyPreferenceDataError(ValueError):
    """A split's cache holds no rows at all: its source files hold none."""


def check_pair_info(info: np.ndarray, split: str, error_message: Callable[[int], str]) -> None:
    """Stops on a malformed row, naming it (``error_message(row)`` reads its message), or when no row trains;
    logs the drops by reason."""
    if len(info) == 0:
        raise EmptyPreferenceDataError(f"The {split} preference data holds no rows.")
    status = info[:, PAIR_INFO.index("status")]
    errors = np.flatnonzero(status == STATUS_ERROR)
    if errors.size:
        more = f" ({errors.size} malformed rows in all: {errors[:10].tolist()})" if errors.size > 1 else ""
        raise PreferenceRowError(f"{split} row {errors[0]}: {error_message(int(errors[0]))}{more}")
    counts = {r.label: int(np.sum(status == r)) for r in RowDrop if r != RowDrop.NONE}
    for reason, count in counts.items():
        if count:
            first = np.flatnonzero(status == RowDrop[reason.upper()])[:10].tolist()
            logger.warning(f"Dropped {count} {split} preference rows ({reason}); first rows: {first}")
    if not np.any(status == RowDrop.NONE):
        raise ValueError(f"None of the {len(info)} {split} preference rows trains; dropped by reason: {counts}")


def open_cached_pairs(
    cache: TreeCache, format: PromptCompletionPreferenceFormat, tokenizer: MarinTokenizer, *, split: str
) -> CachedPairs:
    """Reads a split's ``pair_info`` and checks it (``check_pair_info``)."""
    check_cache_settings(cache, format, tokenizer)
    store = _view(cache, {"pair_info": np.int32}).jagged_array_tree()["pair_info"]
    rows = int(store.num_rows)
    # (rows, len(PAIR_INFO)), not (rows, -1): numpy cannot infer a dimension of an empty array
    flat = store.data[0 : rows * len(PAIR_INFO)].read().result() if rows else np.zeros(0)
    info = np.asarray(flat, dtype=np.int32).reshape(rows, len(PAIR_INFO))

    def error_message(row: int) -> str:
        return bytes(_view(cache, {"error": np.uint8}).get_batch_sync([row])[0]["error"]).decode("utf-8")

    check_pair_info(info, split, error_message)
    return CachedPairs(cache, info, split)
