# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The ``preference_prompt_completion`` cache builder's processor run on rows in memory, and the checks the
trainer makes when it opens the cache, for tests of per-pair decisions that need no cache on disk."""

import dataclasses

import numpy as np

from levanter.data.simpo.cache import check_pair_info
from levanter.data.simpo.pair_build import PAIR_INFO
from levanter.data.simpo.prompt_completion import PromptCompletionPreferenceFormat
from levanter.data.simpo.rows import RowDrop
from levanter.data.simpo.stats import PreferencePairStats


@dataclasses.dataclass(frozen=True)
class Built:
    records: list[dict]
    info: np.ndarray

    @property
    def stats(self) -> PreferencePairStats:
        return PreferencePairStats.of(self.info)

    @property
    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.info[:, PAIR_INFO.index("status")] == RowDrop.NONE)

    def rows_dropped_for(self, reason: str) -> list[int]:
        return np.flatnonzero(self.info[:, PAIR_INFO.index("status")] == RowDrop[reason.upper()]).tolist()


def build_records(tokenizer, rows, **format_settings) -> list[dict]:
    return list(PromptCompletionPreferenceFormat(**format_settings).build_preprocessor(tokenizer)(rows))


def build_and_check(tokenizer, rows, *, split: str = "train", **format_settings) -> Built:
    records = build_records(tokenizer, rows, **format_settings)
    info = np.stack([r["pair_info"] for r in records]) if records else np.zeros((0, len(PAIR_INFO)), np.int32)
    check_pair_info(info, split, lambda row: bytes(records[row]["error"]).decode("utf-8"))
    return Built(records, info)
