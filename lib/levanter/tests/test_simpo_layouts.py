# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Every ``pair_layout`` on the shipped tiny held-out pairs, through the datasets and the loss the trainer uses
(``build_preference_splits`` over a real cache: Levanter's ``PreferencePairDataset`` for ``padded``, first-fit
decreasing rows for ``packed`` and ``shared_prompt``): the same pairs, the same loss and the same gradients, for
rotary (Llama) and absolute (GPT-2) position embeddings."""

import dataclasses
import os
from pathlib import Path

import draccus
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jrandom
import numpy as np
import pytest

import haliax as hax
from haliax import Axis
from levanter.data.simpo.shared_prompt import PrefixSharedPairs
from levanter.data.simpo.splits import build_preference_splits
from levanter.main.train_simpo import TrainSimpoConfig, simpo_loss, validate_config
from levanter.models.gpt2 import Gpt2Config
from levanter.models.llama import LlamaConfig
from levanter.simpo.objective.layouts import pair_layout

REPO = Path(__file__).resolve().parents[3]
TINY_CONFIG = REPO / "lib/levanter/config/simpo_tiny_gpt2.yaml"
PAIRS_PER_ROW = 4
# Above the format's max_length (64): a shared-prompt row holds a pair's prompt and both completions. The cuts
# follow max_length, not the sequence length, so every layout holds the same cut pairs.
SEQ = 128
LAYOUTS = ("padded", "packed", "shared_prompt")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config's data (paths relative to the repository root) with its cache in a temporary directory."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        cache = tmp_path_factory.mktemp("layouts") / "cache"
        yield draccus.parse(TrainSimpoConfig, config_path=str(TINY_CONFIG), args=["--data.cache_dir", str(cache)])
    finally:
        os.chdir(cwd)


def held_out_batch(tiny, layout_name: str):
    """All held-out rows of a layout as one batch, from the validation dataset the trainer would evaluate on."""
    layout = pair_layout(layout_name, PAIRS_PER_ROW)
    Pos = Axis("position", SEQ)
    splits = build_preference_splits(
        tiny.data,
        lambda pairs, kept: layout.rows(pairs, kept, Pos),
        seq_len=SEQ,
        key=jrandom.PRNGKey(0),
        validation_split_fraction=None,
    )
    sync = splits.validation["tiny_simpo"].as_sync_dataset()
    items = sync.get_batch(list(range(len(sync))))
    Batch = Axis("batch", len(items))
    batch = jax.tree.map(lambda *xs: hax.stack(Batch, xs), *items, is_leaf=lambda x: isinstance(x, hax.NamedArray))
    return layout, batch, len(items)


@pytest.fixture(scope="module")
def batches(tiny):
    return {name: held_out_batch(tiny, name) for name in LAYOUTS}


MODELS = {
    "llama": LlamaConfig(
        max_seq_len=SEQ, hidden_dim=32, intermediate_dim=64, num_layers=2, num_heads=4, num_kv_heads=2
    ),
    "gpt2": Gpt2Config(max_seq_len=SEQ, hidden_dim=32, num_layers=2, num_heads=4, gradient_checkpointing=False),
}


def loss_metrics_and_gradient(model, layout, batch):
    @eqx.filter_jit
    def run(model, batch):
        def loss(model):
            return simpo_loss(model, batch, layout=layout, beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.3)

        return eqx.filter_value_and_grad(loss, has_aux=True)(model)

    (loss, metrics), grad = run(model, batch)
    flat = jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(eqx.filter(grad, eqx.is_array))])
    return float(loss), metrics, np.asarray(flat)


@pytest.mark.parametrize("model_name", MODELS)
def test_every_layout_gives_the_same_loss_and_gradient_over_the_same_pairs(tiny, batches, model_name):
    model = MODELS[model_name].build(Axis("vocab", len(tiny.data.the_tokenizer)), key=jrandom.PRNGKey(0))
    results = {}
    for name in LAYOUTS:
        layout, batch, rows = batches[name]
        assert isinstance(batch, PrefixSharedPairs) == (name == "shared_prompt")
        loss, metrics, grad = loss_metrics_and_gradient(model, layout, batch)
        # every held-out pair enters the mean once, whatever the rows that hold it
        assert float(metrics["simpo_loss"]._count) == 250
        results[name] = (
            rows,
            loss,
            {k: float(metrics[k]) for k in ("logps/chosen", "simpo_sft_loss", "logits/rejected")},
            grad,
        )
    padded_rows, padded_loss, padded_metrics, padded_grad = results["padded"]
    assert padded_rows == 250
    for name in ("packed", "shared_prompt"):
        rows, loss, metrics, grad = results[name]
        assert rows < padded_rows / 2  # several pairs a row
        np.testing.assert_allclose(loss, padded_loss, rtol=1e-5)
        for metric, value in metrics.items():
            np.testing.assert_allclose(value, padded_metrics[metric], rtol=1e-5)
        assert np.linalg.norm(grad - padded_grad) <= 1e-4 * np.linalg.norm(padded_grad)


@pytest.mark.parametrize("field, value", [("pair_layout", "stacked"), ("max_pairs_per_row", 0)])
def test_bad_layout_settings_are_rejected(tiny, field, value):
    with pytest.raises(ValueError, match=field):
        validate_config(dataclasses.replace(tiny, **{field: value}))
