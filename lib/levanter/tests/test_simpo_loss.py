# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""SimPO loss math against hand-computed values, and the length-normalised log-prob on a real tiny model."""

import math

import jax
import jax.numpy as jnp
import jax.random as jrandom
import numpy as np
import pytest

import haliax as hax
from levanter.data.text.preference import DpoExample
from levanter.main.train_simpo import _average_logp, simpo_loss, simpo_loss_from_logps
from levanter.metrics import Metric
from levanter.models.gpt2 import Gpt2Config
from levanter.models.lm_model import LmExample
from levanter.simpo.objective.layouts import Side, pair_layout


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _loss(chosen, rejected, **kwargs):
    kwargs.setdefault("beta", 2.0)
    kwargs.setdefault("gamma_beta_ratio", 0.5)
    loss, metrics = simpo_loss_from_logps(jnp.asarray(chosen), jnp.asarray(rejected), **kwargs)
    return float(loss), {k: float(v) for k, v in metrics.items()}


def test_sigmoid_loss_matches_worked_example():
    # logits = -1.2 - (-2.5) - 0.5 = 0.8; loss = -log sigmoid(2 * 0.8)
    loss, metrics = _loss([-1.2], [-2.5])
    assert loss == pytest.approx(0.18390, abs=1e-5)
    assert metrics["simpo_loss"] == pytest.approx(loss)
    assert metrics["simpo_margin"] == pytest.approx(1.3, abs=1e-6)


def test_sft_example_with_beta_2_5():
    # SFT term with beta 2.5 (the worked example's logits 0.8): the SimPO part is -log sigmoid(2.0), not the
    # beta=2 loss
    simpo_part, _ = _loss([-1.2], [-2.5], beta=2.5)
    assert simpo_part == pytest.approx(_softplus(-2.0), abs=1e-6)
    assert simpo_part + 0.1 * 1.2 == pytest.approx(0.2469, abs=1e-4)


def test_gamma_shifts_the_logits():
    no_margin, _ = _loss([-1.0], [-1.5], gamma_beta_ratio=0.0)
    with_margin, _ = _loss([-1.0], [-1.5], gamma_beta_ratio=0.5)
    assert no_margin == pytest.approx(_softplus(-1.0), abs=1e-6)
    assert with_margin == pytest.approx(math.log(2.0), abs=1e-6)  # logits exactly 0
    assert with_margin > no_margin


def test_label_smoothing_mixes_in_the_flipped_label():
    loss, _ = _loss([-1.2], [-2.5], label_smoothing=0.1)
    expected = 0.9 * _softplus(-1.6) + 0.1 * _softplus(1.6)
    assert loss == pytest.approx(expected, abs=1e-6)
    half, _ = _loss([-1.2], [-2.5], label_smoothing=0.5)
    flipped, _ = _loss([-2.5], [-1.2], gamma_beta_ratio=-0.5, label_smoothing=0.5)
    assert half == pytest.approx(flipped, abs=1e-6)  # at 0.5 the loss no longer prefers either side


def test_hinge_loss():
    loss, _ = _loss([-1.2], [-2.5], loss_type="hinge")  # beta * logits = 1.6, past the margin of 1
    assert loss == 0.0
    loss, _ = _loss([-1.2], [-1.3], loss_type="hinge")  # logits -0.4: 1 + 0.8
    assert loss == pytest.approx(1.8, abs=1e-6)


def test_loss_falls_as_chosen_logp_rises():
    losses = [_loss([c], [-2.0])[0] for c in (-3.0, -2.0, -1.0, -0.5)]
    assert all(a > b for a, b in zip(losses, losses[1:]))


def test_metrics_are_levanter_metrics_with_reference_names():
    _, metrics = simpo_loss_from_logps(
        jnp.array([-1.0, -2.0, -1.5]), jnp.array([-2.0, -1.0, -1.6]), beta=2.0, gamma_beta_ratio=0.5
    )
    assert all(isinstance(m, Metric) for m in metrics.values())
    values = {k: float(v) for k, v in metrics.items()}
    # logits: 0.5, -1.5, -0.4 -> one positive; reward comparison ignores gamma -> two of three
    assert values["simpo_accuracy"] == pytest.approx(1 / 3)
    assert values["rewards/accuracies"] == pytest.approx(2 / 3)
    assert values["rewards/chosen"] == pytest.approx(2.0 * -1.5)
    assert values["rewards/rejected"] == pytest.approx(2.0 * np.mean([-2.0, -1.0, -1.6]))
    assert values["rewards/margins"] == pytest.approx(2.0 * np.mean([1.0, -1.0, 0.1]))
    assert values["logps/chosen"] == pytest.approx(-1.5)
    assert values["simpo_margin"] == pytest.approx(np.mean([1.0, -1.0, 0.1]))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("gap", [-1e4, -50.0, 50.0, 1e4])
def test_gradients_finite_at_extreme_logits(loss_type, gap):
    def f(chosen):
        return simpo_loss_from_logps(chosen, jnp.zeros(2), beta=10.0, gamma_beta_ratio=0.5, loss_type=loss_type)[0]

    value, grad = jax.value_and_grad(f)(jnp.full(2, gap))
    assert np.isfinite(value) and np.all(np.isfinite(grad))


TINY = Gpt2Config(max_seq_len=16, hidden_dim=32, num_layers=2, num_heads=2, gradient_checkpointing=False)
Vocab = hax.Axis("vocab", 50)
Batch = hax.Axis("batch", 3)


PADDED = pair_layout("padded", 1)


def _causal(tokens, weight, segments):
    return hax.vmap(lambda t, w, s: LmExample.causal(t, loss_weight=w, segment_ids=s), Batch)(tokens, weight, segments)


def _average(model, example, *, key=None):
    """Length-normalised log-prob of each row's completion, as the padded layout computes it."""
    logps = PADDED.logps(model, DpoExample(chosen=example, rejected=example), key=key)
    return _average_logp(logps.sum, logps.count)[Side, 0]["pair_in_row", 0]


def _numpy_average_logp(model, example):
    logits = np.asarray(model(example.tokens, attn_mask=example.attn_mask).array, np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    tokens = np.asarray(example.tokens.array)
    weight = np.asarray(example.loss_weight.array)
    next_logp = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    w = weight[:, :-1]
    return (next_logp * w).sum(-1) / w.sum(-1), (next_logp * w).sum(-1)


def _batched_example(prompt_lengths, lengths, seed=0):
    Pos = TINY.max_Pos
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, Vocab.size, size=(Batch.size, Pos.size)).astype(np.int32)
    mask = np.zeros((Batch.size, Pos.size), np.float32)
    segments = np.full((Batch.size, Pos.size), -1, np.int32)
    for i, (p, n) in enumerate(zip(prompt_lengths, lengths)):
        tokens[i, n:] = 0
        mask[i, p:n] = 1
        segments[i, :n] = i  # as Levanter's packer: the pair's index on its tokens, -1 on padding
    tokens_n = hax.named(jnp.asarray(tokens), (Batch, Pos))
    weight = hax.roll(hax.named(jnp.asarray(mask), (Batch, Pos)), -1, Pos)
    return _causal(tokens_n, weight, hax.named(jnp.asarray(segments), (Batch, Pos)))


@pytest.fixture(scope="module")
def model():
    return TINY.build(Vocab, key=jrandom.PRNGKey(0))


def test_average_logp_matches_numpy_over_completion_tokens(model):
    example = _batched_example(prompt_lengths=[3, 5, 1], lengths=[9, 16, 6])
    got = np.asarray(_average(model, example).array)
    expected_avg, expected_sum = _numpy_average_logp(model, example)
    np.testing.assert_allclose(got, expected_avg, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, expected_sum, atol=1e-3)  # a sum in place of the mean fails here


def test_average_logp_of_a_row_without_completion_tokens_is_zero(model):
    example = _batched_example(prompt_lengths=[3, 6, 2], lengths=[9, 6, 8])  # row 1: prompt fills it
    got = np.asarray(_average(model, example).array)
    assert np.all(np.isfinite(got)) and got[1] == 0.0 and got[0] != 0.0


def test_dropout_key_reaches_the_model():
    dropout = Gpt2Config(
        max_seq_len=16, hidden_dim=32, num_layers=2, num_heads=2, gradient_checkpointing=False, resid_pdrop=0.5
    ).build(Vocab, key=jrandom.PRNGKey(0))
    example = _batched_example(prompt_lengths=[3, 5, 1], lengths=[9, 16, 6])
    a = _average(dropout, example, key=jrandom.PRNGKey(1)).array
    b = _average(dropout, example, key=jrandom.PRNGKey(2)).array
    again = _average(dropout, example, key=jrandom.PRNGKey(1)).array
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, again)


def test_pair_loss_equals_loss_from_separately_computed_averages(model):
    chosen = _batched_example(prompt_lengths=[3, 5, 1], lengths=[9, 16, 6], seed=1)
    rejected = _batched_example(prompt_lengths=[3, 5, 1], lengths=[12, 7, 15], seed=2)
    pair = DpoExample(chosen=chosen, rejected=rejected)
    loss, metrics = simpo_loss(model, pair, layout=PADDED, beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.3)

    avg_c, sum_c = _numpy_average_logp(model, chosen)
    avg_r, _ = _numpy_average_logp(model, rejected)
    reference, _ = simpo_loss_from_logps(jnp.asarray(avg_c), jnp.asarray(avg_r), beta=2.0, gamma_beta_ratio=0.5)
    chosen_tokens = np.asarray(chosen.loss_weight.array)[:, :-1].sum()
    sft = -sum_c.sum() / chosen_tokens  # token-level mean over all chosen tokens, not a mean of per-pair means
    assert float(loss) == pytest.approx(float(reference) + 0.3 * sft, rel=1e-5)
    assert float(metrics["simpo_sft_loss"]) == pytest.approx(sft, rel=1e-5)
    assert float(metrics["simpo_skipped_pairs"]) == 0.0


def test_pairs_without_trained_tokens_are_left_out_and_counted(model):
    chosen = _batched_example(prompt_lengths=[3, 5, 1], lengths=[9, 16, 6], seed=1)
    rejected = _batched_example(prompt_lengths=[3, 7, 1], lengths=[12, 7, 15], seed=2)  # pair 1: nothing trained
    loss, metrics = simpo_loss(
        model, DpoExample(chosen=chosen, rejected=rejected), layout=PADDED, beta=2.0, gamma_beta_ratio=0.5
    )

    avg_c, _ = _numpy_average_logp(model, chosen)
    avg_r = _numpy_average_logp(model, rejected)[0][[0, 2]]
    kept, kept_metrics = simpo_loss_from_logps(avg_c[[0, 2]], avg_r, beta=2.0, gamma_beta_ratio=0.5)
    assert float(loss) == pytest.approx(float(kept), rel=1e-5)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(float(kept_metrics["rewards/accuracies"]))
    assert float(metrics["simpo_skipped_pairs"]) == 1.0


def test_empty_pair_slots_are_left_out_silently(model):
    # row 1 has no trained token on either side: an eval padding pair or an unused slot of a packed row
    chosen = _batched_example(prompt_lengths=[3, 7, 1], lengths=[9, 7, 6], seed=1)
    rejected = _batched_example(prompt_lengths=[3, 7, 1], lengths=[12, 7, 15], seed=2)
    loss, metrics = simpo_loss(
        model, DpoExample(chosen=chosen, rejected=rejected), layout=PADDED, beta=2.0, gamma_beta_ratio=0.5
    )

    avg_c = _numpy_average_logp(model, chosen)[0][[0, 2]]
    avg_r = _numpy_average_logp(model, rejected)[0][[0, 2]]
    kept, _ = simpo_loss_from_logps(avg_c, avg_r, beta=2.0, gamma_beta_ratio=0.5)
    assert float(loss) == pytest.approx(float(kept), rel=1e-5)
    assert float(metrics["simpo_skipped_pairs"]) == 0.0


def test_mixture_of_experts_router_loss_is_added_once_and_never_enters_the_log_probs():
    from levanter.models.lm_model import split_activations
    from levanter.models.mixtral import MixtralConfig

    # Mixtral routes tokens inside a shard_map, which needs a mesh even on one device
    with hax.partitioning.set_mesh(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))):
        _check_moe(MixtralConfig, split_activations)


def _check_moe(MixtralConfig, split_activations):
    config = MixtralConfig(
        max_seq_len=16,
        hidden_dim=32,
        intermediate_dim=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        lbl_coef=0.5,
        rzl_coef=0.1,
        use_flash_attention=False,
    )
    moe = config.build(Vocab, key=jrandom.PRNGKey(0))
    chosen = _batched_example(prompt_lengths=[3, 5, 1], lengths=[9, 16, 6], seed=1)
    rejected = _batched_example(prompt_lengths=[3, 5, 1], lengths=[12, 7, 15], seed=2)
    pair = DpoExample(chosen=chosen, rejected=rejected)

    # the averages are log-probs: they match a plain log-softmax of the model's logits
    avg_c, _ = _numpy_average_logp(moe, chosen)
    np.testing.assert_allclose(np.asarray(_average(moe, chosen).array), avg_c, rtol=1e-5, atol=1e-5)

    loss, _ = simpo_loss(moe, pair, layout=PADDED, beta=2.0, gamma_beta_ratio=0.5)
    avg_r, _ = _numpy_average_logp(moe, rejected)
    simpo_only, _ = simpo_loss_from_logps(jnp.asarray(avg_c), jnp.asarray(avg_r), beta=2.0, gamma_beta_ratio=0.5)
    # the router's loss over the same tokens: both sides as one batch of six rows
    both = jax.tree.map(
        lambda c, r: hax.concatenate("batch", [c, r]),
        chosen,
        rejected,
        is_leaf=lambda x: isinstance(x, hax.NamedArray),
    )
    _, aux = split_activations(moe.activations(both.tokens, both.attn_mask))
    assert float(aux) > 1e-3  # the router's loss is there to be counted
    assert float(loss) == pytest.approx(float(simpo_only) + float(aux), rel=1e-5)
