# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The held-out length-bias diagnostics on pairs built so that the answer is known, and their exact folding over
eval batches."""

import jax.numpy as jnp
import numpy as np
import pytest

from levanter.metrics import fold
from levanter.simpo.results.length_diagnostics import finish_length_diagnostics, length_diagnostics


def _values(metrics) -> dict[str, float]:
    return finish_length_diagnostics({f"eval/{k}": float(v) for k, v in metrics.items()}, "eval")


def _diagnostics(chosen, rejected, margin, weight=None):
    weight = np.ones(len(chosen)) if weight is None else np.asarray(weight)
    return length_diagnostics(*(jnp.asarray(x, jnp.float32) for x in (chosen, rejected, margin, weight)))


def test_a_run_that_prefers_the_longer_answer():
    # margins follow the length difference exactly: longer always wins
    chosen = np.array([10, 30, 12, 40, 8, 25])
    rejected = np.array([20, 10, 30, 15, 9, 5])
    values = _values(_diagnostics(chosen, rejected, 0.1 * (chosen - rejected)))
    assert values["eval/length/accuracy_chosen_longer"] == 1.0
    assert values["eval/length/accuracy_chosen_shorter"] == 0.0
    assert values["eval/length/margin_length_correlation"] == pytest.approx(1.0, abs=1e-5)
    assert values["eval/length/chosen_tokens"] == pytest.approx(chosen.mean())
    assert values["eval/length/rejected_tokens"] == pytest.approx(rejected.mean())
    assert not any("_sum_" in k for k in values)  # the folded sums are replaced by the correlation


def test_a_run_that_learned_the_preference_not_the_length():
    # every chosen answer wins by the same margin whatever its length
    chosen = np.array([10, 30, 12, 40, 8, 25])
    rejected = np.array([20, 10, 30, 15, 9, 5])
    values = _values(_diagnostics(chosen, rejected, np.full(6, 0.5)))
    assert values["eval/length/accuracy_chosen_longer"] == values["eval/length/accuracy_chosen_shorter"] == 1.0
    assert values["eval/length/margin_length_correlation"] == 0.0  # no variation in margins: 0, not NaN


def test_diagnostics_fold_exactly_over_batches_and_skip_weightless_pairs():
    rng = np.random.default_rng(0)
    chosen, rejected = rng.integers(1, 60, 40), rng.integers(1, 60, 40)
    margin = 0.05 * (chosen - rejected) + rng.normal(0, 1, 40)
    weight = np.ones(40)
    weight[[3, 17]] = 0  # e.g. the padding pairs of a last eval batch
    whole = _values(_diagnostics(chosen, rejected, margin, weight))
    halves = [_diagnostics(chosen[s], rejected[s], margin[s], weight[s]) for s in (slice(0, 13), slice(13, 40))]
    folded = _values({k: fold(halves[0][k], halves[1][k]) for k in halves[0]})
    for name, value in whole.items():
        assert folded[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    kept = weight == 1
    expected = np.corrcoef(chosen[kept] - rejected[kept], margin[kept])[0, 1]
    assert whole["eval/length/margin_length_correlation"] == pytest.approx(expected, abs=1e-4)
