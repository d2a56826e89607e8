# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The SimPO objective: ``simpo_loss_from_logps`` on length-normalised log-probs (the reference trainer's loss
variants and metrics) and ``simpo_loss``, the training loss on a batch of rows of any pair layout."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp

import haliax as hax
from levanter.data.simpo.shared_prompt import PrefixSharedPairs
from levanter.data.text.preference import DpoExample
from levanter.metrics import Metric, ReductionType
from levanter.models.lm_model import LmHeadModel
from levanter.simpo.objective.layouts import PairLayout, Side
from levanter.simpo.results.length_diagnostics import length_diagnostics as simpo_length_metrics

LossType = Literal["sigmoid", "hinge"]


def _as_array(x: hax.NamedArray | jnp.ndarray) -> jnp.ndarray:
    return x.array if isinstance(x, hax.NamedArray) else jnp.asarray(x)


def _pair_mean(values: jnp.ndarray, weight: jnp.ndarray) -> Metric:
    # value and count fold separately, so microbatches and eval batches average over pairs exactly
    weight = weight.astype(jnp.float32)
    return Metric(_value=jnp.sum(values.astype(jnp.float32) * weight), _count=jnp.sum(weight))


def simpo_loss_from_logps(
    avg_logp_chosen: hax.NamedArray | jnp.ndarray,
    avg_logp_rejected: hax.NamedArray | jnp.ndarray,
    *,
    beta: float,
    gamma_beta_ratio: float,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    pair_weight: hax.NamedArray | jnp.ndarray | None = None,
    pair_count: jnp.ndarray | float | None = None,
) -> tuple[jnp.ndarray, dict[str, Metric]]:
    """Mean SimPO loss over pairs from their length-normalised log-probs, with the reference trainer's metrics.

    ``pair_weight`` (1 or 0 per pair) leaves pairs out of the loss and metrics: the loss of a batch whose pairs
    all have weight 0 is 0. ``pair_count`` is what the summed loss is divided by, by default the pairs of weight 1
    (at least 1); a microbatch divides by its share of the whole step's (``StepShare``).
    """
    chosen = _as_array(avg_logp_chosen).astype(jnp.float32)
    rejected = _as_array(avg_logp_rejected).astype(jnp.float32)
    weight = jnp.ones_like(chosen) if pair_weight is None else _as_array(pair_weight).astype(jnp.float32)
    logits = chosen - rejected - gamma_beta_ratio
    if loss_type == "sigmoid":
        # softplus(-x) == -log sigmoid(x), finite for any x
        losses = (1 - label_smoothing) * jax.nn.softplus(-beta * logits) + label_smoothing * jax.nn.softplus(
            beta * logits
        )
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * logits)
    else:
        raise ValueError(f"Unknown loss_type {loss_type!r}")
    if pair_count is None:
        pair_count = jnp.maximum(jnp.sum(weight), 1.0)
    loss = jnp.sum(losses * weight) / pair_count

    def mean(values):
        return _pair_mean(values, weight)

    chosen_reward, rejected_reward = beta * chosen, beta * rejected
    # the reference trainer's and TRL's names where they have one; simpo_* only for what they do not log
    metrics = {
        "simpo_loss": mean(losses),
        "simpo_margin": mean(chosen - rejected),
        "simpo_accuracy": mean(logits > 0),
        "rewards/chosen": mean(chosen_reward),
        "rewards/rejected": mean(rejected_reward),
        "rewards/margins": mean(chosen_reward - rejected_reward),
        "rewards/accuracies": mean(chosen_reward > rejected_reward),
        "logps/chosen": mean(chosen),
        "logps/rejected": mean(rejected),
    }
    return loss, metrics


def _average_logp(logp_sum: hax.NamedArray, count: hax.NamedArray) -> hax.NamedArray:
    """SimPO's length-normalised log-prob: a completion's summed log-prob over its number of trained tokens
    (0 for a completion with none; callers leave such pairs out and count them)."""
    return hax.where(count > 0, logp_sum / hax.maximum(count, 1), hax.zeros_like(logp_sum))


class StepShare(eqx.Module):
    """What each microbatch of a step divides its summed losses by: the step's trained pairs (at least 1) and its
    chosen tokens (at least 1, for the SFT term), each over the number of microbatches. Levanter's gradient
    accumulation averages the microbatches' losses and gradients equally (``levanter.grad_accum.microbatched``);
    with these denominators that average is the exact mean over the step's pairs and chosen tokens, however many
    pairs each microbatch holds. Without microbatches it is the batch's own counts, and the loss is unchanged."""

    pairs: jnp.ndarray
    chosen_tokens: jnp.ndarray

    @staticmethod
    def of(layout: PairLayout, model: LmHeadModel, example: DpoExample | PrefixSharedPairs, microbatches: int):
        """The share of each of ``microbatches`` microbatches of the step whose rows are ``example``."""
        counts = layout.counts(model, example)
        pairs = jnp.sum(hax.all(counts > 0, axis=Side).array).astype(jnp.float32)
        chosen_tokens = hax.sum(counts[Side, 0]).array.astype(jnp.float32)
        return StepShare(
            pairs=jnp.maximum(pairs, 1.0) / microbatches,
            chosen_tokens=jnp.maximum(chosen_tokens, 1.0) / microbatches,
        )


def simpo_loss(
    model: LmHeadModel,
    example: DpoExample | PrefixSharedPairs,
    *,
    layout: PairLayout,
    beta: float,
    gamma_beta_ratio: float,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    length_diagnostics: bool = False,
    step: StepShare | None = None,
    key=None,
) -> tuple[jnp.ndarray, dict[str, Metric]]:
    """The training objective on a batch of rows laid out by ``layout``: one forward pass over chosen and
    rejected together, the mean over pairs whatever the layout, plus the model's auxiliary loss once.
    ``length_diagnostics`` adds the held-out length-bias metrics (``simpo_length_diagnostics``). ``step``: the
    batch is one of a step's microbatches, and divides by its share of the step's pairs and chosen tokens
    (``StepShare``); the metrics need no share, they fold over microbatches as (sum, count)."""
    logps = layout.logps(model, example, key=key)
    avg = _average_logp(logps.sum, logps.count)
    # a side with no trained token has no average; empty slots (the loader's padding pairs at the end of an eval
    # set, unused pair slots of packed rows) have none on either side and are not pairs at all
    trainable = hax.all(logps.count > 0, axis=Side).array
    half_empty = hax.any(logps.count > 0, axis=Side).array & ~trainable
    loss, metrics = simpo_loss_from_logps(
        avg[Side, 0],
        avg[Side, 1],
        beta=beta,
        gamma_beta_ratio=gamma_beta_ratio,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        pair_weight=trainable,
        pair_count=None if step is None else step.pairs,
    )
    metrics["simpo_skipped_pairs"] = Metric.from_value(jnp.sum(half_empty).astype(jnp.float32), ReductionType.SUM)
    for side, name in ((0, "chosen"), (1, "rejected")):
        # the mean logit over the vocabulary, per trained token of the side (the reference's logits/*)
        tokens = hax.sum(logps.count[Side, side]).array
        metrics[f"logits/{name}"] = Metric(_value=hax.sum(logps.logit_sum[Side, side]).array, _count=tokens)
    if length_diagnostics:
        chosen, rejected = logps.count[Side, 0].array, logps.count[Side, 1].array
        margin = beta * (avg[Side, 0] - avg[Side, 1]).array
        metrics |= simpo_length_metrics(chosen, rejected, margin, trainable)
    if sft_weight > 0:
        # the reference trainer's SFT term: cross-entropy averaged over all chosen tokens, not per pair
        chosen_tokens = hax.sum(logps.count[Side, 0]).array
        chosen_nll = -hax.sum(logps.sum[Side, 0]).array
        token_count = jnp.maximum(chosen_tokens, 1.0) if step is None else step.chosen_tokens
        loss = loss + sft_weight * chosen_nll / token_count
        metrics["simpo_sft_loss"] = Metric(_value=chosen_nll, _count=chosen_tokens)
    aux_loss = logps.aux_loss
    if isinstance(aux_loss, hax.NamedArray):
        aux_loss = aux_loss.array  # one number for the whole batch
    return loss + aux_loss, metrics
