# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The shipped tiny data through ``build_preference_splits`` in each ``pair_layout``: the same pairs, the same
mean SimPO loss."""

import os
from pathlib import Path

import draccus
import equinox as eqx
import haliax as hax
import jax
import jax.random as jrandom
import numpy as np
import pytest
from haliax import Axis

from levanter.data.text.preference_packing import PrefixSharedPairs
from levanter.data.text.preference_pairs import PairBuilder, pair_rows, scan_preference_cache
from levanter.main.train_simpo import TrainSimpoConfig, simpo_loss, validate_config
from levanter.models.llama import LlamaConfig

REPO = Path(__file__).resolve().parents[3]
TINY_CONFIG = REPO / "lib/levanter/config/simpo_tiny_gpt2.yaml"
PAIRS_PER_ROW = 4


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


# Above the format's max_length (64): a shared-prompt row holds a pair's prompt and both completions. The cuts
# follow max_length, not the sequence length, so every layout holds the same cut pairs.
SEQ = 128


@pytest.fixture(scope="module")
def model(tiny):
    # Llama, not the tiny config's GPT-2: packed rows keep positions running across the pairs of a row (the
    # shared-prompt rows restart them after each pair's prompt only), and rotary embeddings make attention depend
    # on relative offsets alone, so a pair scores the same at any offset; GPT-2's absolute position embeddings
    # would not
    config = LlamaConfig(max_seq_len=SEQ, hidden_dim=32, intermediate_dim=64, num_layers=2, num_heads=4, num_kv_heads=2)
    return config.build(Axis("vocab", len(tiny.data.the_tokenizer)), key=jrandom.PRNGKey(0))


@pytest.fixture(scope="module")
def held_out(tiny, model):
    """The held-out cache, scanned (checks, cuts, drops) as ``build_preference_splits`` scans it."""
    ((name, cache),) = tiny.data.build_caches("validation").items()
    builder = PairBuilder(tiny.data.components[name].format, model.Pos.resize(SEQ), tiny.data.the_tokenizer)
    return cache, builder, scan_preference_cache(cache, builder, split="validation")


def rows_of(held_out, layout: str):
    cache, builder, scan = held_out
    dataset = pair_rows(cache, scan.kept, builder, layout, 1 if layout == "padded" else PAIRS_PER_ROW)
    sync = dataset.as_sync_dataset()
    items = sync.get_batch(list(range(len(sync))))
    Batch = Axis("batch", len(items))
    return jax.tree.map(lambda *xs: hax.stack(Batch, xs), *items, is_leaf=lambda x: isinstance(x, hax.NamedArray))


@eqx.filter_jit
def loss_and_metrics(model, batch, max_pairs_per_row):
    return simpo_loss(model, batch, beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.3, max_pairs_per_row=max_pairs_per_row)


def test_every_layout_gives_the_same_mean_loss_over_the_same_pairs(held_out, model):
    pairs = held_out[2].stats.pairs
    results = {}
    for layout in ("padded", "packed", "shared_prompt"):
        batch = rows_of(held_out, layout)
        if layout == "shared_prompt":
            assert isinstance(batch, PrefixSharedPairs)
        rows = batch.tokens.axis_size("batch") if layout == "shared_prompt" else batch.chosen.tokens.axis_size("batch")
        loss, metrics = loss_and_metrics(model, batch, 1 if layout == "padded" else PAIRS_PER_ROW)
        # every held-out pair enters the mean once, whatever the rows that hold it
        assert float(metrics["simpo_loss"]._count) == pairs == 250
        results[layout] = (rows, float(loss), {k: float(metrics[k]) for k in ("simpo_chosen_logp", "simpo_sft_loss")})
    assert results["packed"][0] < results["padded"][0] == 250
    assert results["shared_prompt"][0] < results["padded"][0]
    for layout in ("packed", "shared_prompt"):
        np.testing.assert_allclose(results[layout][1], results["padded"][1], rtol=1e-5)
        for name, value in results[layout][2].items():
            np.testing.assert_allclose(value, results["padded"][2][name], rtol=1e-5)


@pytest.mark.parametrize("field, value", [("pair_layout", "stacked"), ("max_pairs_per_row", 0)])
def test_bad_layout_settings_are_rejected(tiny, field, value):
    import dataclasses

    with pytest.raises(ValueError, match=field):
        validate_config(dataclasses.replace(tiny, **{field: value}))
