# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Extreme logits stay finite in f32 and bf16 compute, and a non-finite loss or gradient stops training with the
step and the rows of the batch that caused it."""

import functools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jrandom
import jmp
import numpy as np
import optax
import pytest
from simpo_pairs import PADDED, random_pairs

import haliax as hax
from levanter.checkpoint import CheckpointerConfig
from levanter.data.text.preference import DpoExample
from levanter.main.train_simpo import simpo_loss
from levanter.models.gpt2 import Gpt2Config
from levanter.simpo.run.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from levanter.tracker import NoopConfig
from levanter.trainer import Trainer, TrainerConfig

TINY = Gpt2Config(max_seq_len=24, hidden_dim=32, num_layers=1, num_heads=2, gradient_checkpointing=False)
Vocab = hax.Axis("vocab", 64)
Batch = hax.Axis("batch", 4)
# the guard test poisons batches that start with these tokens, which _pairs otherwise never draws
NAN_LOSS, NAN_GRADIENT = Vocab.size - 1, Vocab.size - 2


def _pairs(seed: int, first_token: int | None = None) -> DpoExample:
    high = min(NAN_LOSS, NAN_GRADIENT)
    return random_pairs(seed, Batch, TINY.max_Pos, high=high, max_prompt=10, first_token=first_token)


# ---- extreme logits ----


@pytest.mark.parametrize("compute", ["f32", "bf16"])
def test_extreme_logits_keep_loss_and_gradients_finite(compute):
    # Token embeddings 1e5 times their initial size give average log-probs of about -1900 and beta * logits from
    # -4000 to +2900 over the four pairs (f32 and bf16 alike): far past where log(sigmoid(x)) underflows.
    model = TINY.build(Vocab, key=jrandom.PRNGKey(0))
    model = eqx.tree_at(lambda m: m.embeddings.token_embeddings.weight, model, replace_fn=lambda w: w * 1e5)
    policy = jmp.get_policy(f"p=f32,c={compute}")
    loss_fn = functools.partial(
        simpo_loss, layout=PADDED, beta=10.0, gamma_beta_ratio=0.5, label_smoothing=0.1, sft_weight=0.1
    )

    @eqx.filter_jit
    def loss_and_grads(model, pairs):
        # as the trainer does: f32 parameters, the forward pass in the compute dtype
        return eqx.filter_value_and_grad(lambda m: loss_fn(policy.cast_to_compute(m), pairs), has_aux=True)(model)

    (loss, metrics), grads = loss_and_grads(model, _pairs(0))

    assert float(metrics["logps/chosen"]) < -100  # the log-probs really are extreme
    assert 0 < float(metrics["rewards/accuracies"]) < 1  # and the pairs' margins have both signs
    assert np.isfinite(float(loss)) and float(loss) > 1e2
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(bool(jnp.any(g != 0)) for g in leaves)


# ---- the guard, through Levanter's trainer ----


def _poisoned_loss(model, pairs: DpoExample, *, key=None):
    """The SimPO loss, except that a batch whose first token is NAN_LOSS has a NaN loss, and one whose first token
    is NAN_GRADIENT a finite loss with a NaN gradient (the where-of-sqrt trap a masking bug typically sets)."""
    loss, metrics = simpo_loss(model, pairs, layout=PADDED, beta=2.0, gamma_beta_ratio=0.5, key=key)
    first = pairs.chosen.tokens.array[0, 0]
    w = model.embeddings.token_embeddings.weight.array[0, 0]
    inside = jnp.where(first == NAN_GRADIENT, -1.0 - jnp.abs(w), 1.0)
    loss = loss + jnp.where(first == NAN_GRADIENT, 0.0, jnp.sqrt(inside) - 1.0)
    return jnp.where(first == NAN_LOSS, jnp.nan, loss), metrics


def test_guard_names_the_step_and_pairs_of_a_non_finite_step(tmp_path):
    config = TrainerConfig(
        id="guard",
        num_train_steps=3,
        train_batch_size=Batch.size,
        require_accelerator=False,
        tracker=NoopConfig(),
        checkpointer=CheckpointerConfig(base_path=str(tmp_path)),
        mp=jmp.get_policy("f32"),
        log_jaxprs=False,
        log_xla_hlo=False,
    )
    errors = {}
    # one trainer, so both runs share one compiled step
    with Trainer(config, optax.adam(1e-3), _poisoned_loss) as trainer:
        guard = NonFiniteGuard(trainer.config.batch_schedule)
        trainer.add_hook(guard, every=1)
        for poison in (NAN_LOSS, NAN_GRADIENT):
            state = trainer.initial_state(jrandom.PRNGKey(0), model=TINY.build(Vocab, key=jrandom.PRNGKey(0)))
            # steps 0 and 1 are finite and pass the guard
            batches = [_pairs(1), _pairs(2), _pairs(3, first_token=poison)]
            with pytest.raises(NonFiniteTrainingError) as error, guard.reporting():
                trainer.train(state, guard.track(batches, 0))
            errors[poison] = error.value

    for error in errors.values():
        assert error.step == 2 and error.rows == range(8, 12)
        assert str(error).startswith("SimPO training step 2: ")
        assert "The batch is rows 8..11 of the training stream (a row holds one pair, or several" in str(error)
    assert "loss is NaN" in str(errors[NAN_LOSS]) and str(errors[NAN_LOSS].__cause__) == "Loss is NaN"
    assert "the gradients are not finite although the loss is " in str(errors[NAN_GRADIENT])


def test_a_diverging_run_stops_with_the_step_and_blames_the_parameters(single_device_runs):
    # The learning rate of 1e30 leaves step 0 finite and makes every parameter about 1e30 for step 1.
    runs = single_device_runs
    assert runs.diverged_error is not None
    print(runs.diverged_error)
    assert runs.diverged_error.startswith("SimPO training step 1: ")
    assert "the parameters this step started from have grown to a largest magnitude of 1e+30" in runs.diverged_error
    assert re.search(r"the parameters, not this step's batch \(rows \d+\.\.\d+\), are the cause", runs.diverged_error)
