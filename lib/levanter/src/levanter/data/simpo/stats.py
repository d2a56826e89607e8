# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Statistics of a cached preference split, from the per-row ``pair_info`` its cache builder recorded: how
many pairs train, their token lengths (so the length bias SimPO is meant to remove is visible), cuts and drops."""

import dataclasses
import json

import fsspec
import numpy as np

from .pair_build import PAIR_INFO
from .rows import RowDrop


@dataclasses.dataclass(frozen=True)
class TokenLengths:
    mean: float
    median: float
    max: int

    @staticmethod
    def of(values: np.ndarray) -> "TokenLengths":
        return TokenLengths(float(values.mean()), float(np.median(values)), int(values.max()))


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
    mean_sequence_tokens: float
    """Mean length of a pair's two sequences, prompt included: what a row holds per pair in each layout."""
    cut: dict[str, int]
    """Pairs whose prompt was cut, whose completions were cut, and either."""
    dropped: dict[str, int]
    """Rows left out of training, by reason."""

    @staticmethod
    def of(info: np.ndarray) -> "PreferencePairStats":
        """``info``: one ``PAIR_INFO`` row per cache row; at least one of them trains."""
        col = {name: info[:, i] for i, name in enumerate(PAIR_INFO)}
        trains = col["status"] == RowDrop.NONE
        chosen, rejected = col["chosen_trained"][trains], col["rejected_trained"][trains]
        prompt_cut, completions_cut = col["prompt_cut"][trains] != 0, col["completions_cut"][trains] != 0
        return PreferencePairStats(
            rows=len(info),
            pairs=int(trains.sum()),
            prompt_tokens=TokenLengths.of(col["prompt_length"][trains]),
            chosen_tokens=TokenLengths.of(chosen),
            rejected_tokens=TokenLengths.of(rejected),
            rejected_longer_fraction=float(np.mean(rejected > chosen)),
            max_sequence_tokens=int(np.maximum(col["chosen_length"], col["rejected_length"])[trains].max()),
            mean_sequence_tokens=float((col["chosen_length"] + col["rejected_length"])[trains].mean() / 2),
            cut={
                "prompt": int(prompt_cut.sum()),
                "completions": int(completions_cut.sum()),
                "pairs": int((prompt_cut | completions_cut).sum()),
            },
            dropped={r.label: int(np.sum(col["status"] == r)) for r in RowDrop if r != RowDrop.NONE},
        )

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


STATS_FILE = "pair_stats.json"


def write_pair_stats(stats: dict[str, PreferencePairStats], directory: str) -> str:
    """Writes every split's statistics to ``directory/pair_stats.json`` (the run's own output, never a cache
    another step owns) and returns the path."""
    path = f"{directory.rstrip('/')}/{STATS_FILE}"
    with fsspec.open(path, "w", auto_mkdir=True) as f:
        json.dump({split: dataclasses.asdict(s) for split, s in stats.items()}, f, indent=2)
    return path
