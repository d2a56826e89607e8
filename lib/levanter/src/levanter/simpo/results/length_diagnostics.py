# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Held-out diagnostics of length bias: does the run prefer the longer answer rather than the better one?

SimPO averages log-probs over ``|y|`` to remove the pull towards longer answers that summed log-probs have. These
metrics show whether a run exploits length anyway, from the pairs' ``|y|`` (trained tokens) and rewards:

- ``length/accuracy_chosen_longer`` and ``length/accuracy_chosen_shorter``: preference accuracy (chosen reward
  above rejected) over the pairs whose chosen answer is the longer, respectively the shorter one. A run that
  learns the preference scores about the same on both; one that learns "longer wins" scores high on the first
  and low on the second.
- ``length/margin_length_correlation``: Pearson correlation, over pairs, between ``|y_w| - |y_l|`` and the reward
  margin. Near 0: margins do not follow length; towards 1: the longer answer gets the higher reward.
- ``length/chosen_tokens``, ``length/rejected_tokens``: mean ``|y|`` of each side.

Every quantity folds exactly over eval batches: the correlation is assembled from folded sums
(``finish_length_diagnostics``), which are then dropped.
"""

import math

import jax.numpy as jnp

from levanter.metrics import Metric, ReductionType

_SUMS = ("n", "x", "y", "xx", "yy", "xy")
_PREFIX = "length/_sum_"


def _mean(values: jnp.ndarray, weight: jnp.ndarray) -> Metric:
    return Metric(_value=jnp.sum(values * weight), _count=jnp.sum(weight))


def length_diagnostics(
    chosen_tokens: jnp.ndarray, rejected_tokens: jnp.ndarray, reward_margin: jnp.ndarray, weight: jnp.ndarray
) -> dict[str, Metric]:
    """Per-pair ``|y_w|``, ``|y_l|``, reward margin and 0/1 weight (pairs to count) to foldable metrics."""
    weight = weight.astype(jnp.float32)
    chosen, rejected = chosen_tokens.astype(jnp.float32), rejected_tokens.astype(jnp.float32)
    margin = reward_margin.astype(jnp.float32)
    correct = (margin > 0).astype(jnp.float32)
    longer = weight * (chosen > rejected)
    shorter = weight * (chosen < rejected)
    x, y = chosen - rejected, margin
    sums = {
        "n": weight,
        "x": x * weight,
        "y": y * weight,
        "xx": x * x * weight,
        "yy": y * y * weight,
        "xy": x * y * weight,
    }
    metrics = {
        "length/accuracy_chosen_longer": _mean(correct, longer),
        "length/accuracy_chosen_shorter": _mean(correct, shorter),
        "length/chosen_tokens": _mean(chosen, weight),
        "length/rejected_tokens": _mean(rejected, weight),
    }
    metrics |= {f"{_PREFIX}{k}": Metric.from_value(jnp.sum(v), ReductionType.SUM) for k, v in sums.items()}
    return metrics


def finish_length_diagnostics(results: dict[str, float], prefix: str) -> dict[str, float]:
    """Replaces the folded sums under ``prefix`` by the margin/length correlation (NaN-free: 0 when either
    quantity does not vary)."""
    sums = {k: results.pop(f"{prefix}/{_PREFIX}{k}") for k in _SUMS if f"{prefix}/{_PREFIX}{k}" in results}
    if len(sums) != len(_SUMS) or sums["n"] < 2:
        return results
    n = sums["n"]
    cov = sums["xy"] / n - (sums["x"] / n) * (sums["y"] / n)
    var_x = sums["xx"] / n - (sums["x"] / n) ** 2
    var_y = sums["yy"] / n - (sums["y"] / n) ** 2
    if var_x <= 0 or var_y <= 0:
        correlation = 0.0
    else:
        correlation = cov / math.sqrt(var_x * var_y)
    results[f"{prefix}/length/margin_length_correlation"] = correlation
    return results
