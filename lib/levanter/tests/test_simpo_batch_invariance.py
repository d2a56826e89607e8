# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The same global batch of one pair a row gives the same SimPO loss and gradients however Levanter's own
``microbatched`` splits it.

Levanter's gradient accumulation (``levanter.grad_accum.microbatched``, what ``trainer.per_device_parallelism``
turns on) averages the per-microbatch losses and gradients. The SimPO loss is a mean over pairs and here every
microbatch holds the same number of pairs, so the average of the microbatch means is the mean over the whole batch,
even without the step's share that ``SimpoTrainer`` passes (``test_simpo_accumulation.py`` covers rows of several
pairs and the SFT term, through the trainer).
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jrandom
import numpy as np
import pytest
from simpo_pairs import PADDED, random_pairs

import haliax as hax
from levanter.data.text.preference import DpoExample
from levanter.grad_accum import microbatched
from levanter.main.train_simpo import simpo_loss
from levanter.models.gpt2 import Gpt2Config

TINY = Gpt2Config(max_seq_len=24, hidden_dim=32, num_layers=1, num_heads=2, gradient_checkpointing=False)
Vocab = hax.Axis("vocab", 64)
Batch = hax.Axis("batch", 8)
# f32 sums of the same terms in another order: the observed differences are below 7e-7 of the values
RTOL = 1e-5
COMPUTE = {Batch.name: "data"}  # microbatched needs the batch axis on a mesh axis, here of one device


@pytest.fixture(scope="module")
def pairs() -> DpoExample:
    return random_pairs(0, Batch, TINY.max_Pos, high=Vocab.size, max_prompt=12)


@pytest.fixture(scope="module")
def model():
    # a fresh model gives every token about the same log-prob, hence every pair the same loss, which would hide a
    # mean weighted other than by pair; larger token embeddings make the pairs' log-probs and losses differ
    model = TINY.build(Vocab, key=jrandom.PRNGKey(0))
    return eqx.tree_at(lambda m: m.embeddings.token_embeddings.weight, model, replace_fn=lambda w: w * 300)


@eqx.filter_jit
def _accumulated_loss_and_grads(model, pairs: DpoExample, microbatch_size: int, sft_weight: float):
    """What the trainer computes for one step with ``microbatch_size`` pairs per accumulation step."""
    loss_fn = functools.partial(simpo_loss, layout=PADDED, beta=2.0, gamma_beta_ratio=0.5, sft_weight=sft_weight)
    grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)
    Rows = pairs.chosen.tokens.resolve_axis(Batch.name)
    return microbatched(functools.partial(grad_fn, model), Rows, microbatch_size, {}, COMPUTE)(pairs)


def _loss_and_grads(model, pairs: DpoExample, microbatch_size: int, sft_weight: float = 0.0):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with hax.partitioning.set_mesh(mesh), hax.axis_mapping(COMPUTE):
        (loss, metrics), grads = _accumulated_loss_and_grads(model, pairs, microbatch_size, sft_weight)
    return float(loss), {k: float(v) for k, v in metrics.items()}, jax.tree.leaves(grads)


def _max_relative_grad_difference(grads, reference) -> float:
    scale = max(float(jnp.max(jnp.abs(g))) for g in reference)
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads, reference)) / scale


@pytest.fixture(scope="module")
def whole_batch(model, pairs):
    return _loss_and_grads(model, pairs, Batch.size)


@pytest.mark.parametrize("microbatch_size", [4, 1])
def test_microbatch_size_does_not_change_loss_metrics_or_gradients(model, pairs, whole_batch, microbatch_size):
    loss, metrics, grads = whole_batch
    split_loss, split_metrics, split_grads = _loss_and_grads(model, pairs, microbatch_size)

    assert split_loss == pytest.approx(loss, rel=RTOL)
    for name in ("simpo_loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert split_metrics[name] == pytest.approx(metrics[name], rel=RTOL, abs=1e-6), name
    assert _max_relative_grad_difference(split_grads, grads) < RTOL
