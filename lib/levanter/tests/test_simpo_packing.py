# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Packed pairs and shared-prompt rows give the same SimPO loss (and gradient) as one padded pair per row."""

import equinox as eqx
import haliax as hax
import jax
import jax.random as jrandom
import numpy as np
import pytest
from haliax import Axis

from levanter.data.text.preference import PreferenceChatLmDatasetFormat, PreferencePairDataset
from levanter.data.text.preference_packing import (
    PrefixSharedPairDataset,
    greedy_pack,
    packed_pair_dataset,
    padding_report,
    shared_pair_layout,
)
from levanter.main.train_simpo import simpo_loss
from levanter.models.llama import LlamaConfig
from levanter.store.cache import SerialCacheWriter

SEQ = 64
VOCAB = Axis("vocab", 61)
EXEMPLAR = {
    k: np.zeros((0,), dtype=np.int32)
    for k in ("chosen_input_ids", "chosen_assistant_masks", "rejected_input_ids", "rejected_assistant_masks")
}


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """BOS, a prompt, then a completion per side; only the completion is trained, as the chat format masks it."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        prompt = [1, *rng.integers(3, VOCAB.size, rng.integers(2, 12))]
        row = {}
        for side in ("chosen", "rejected"):
            completion = rng.integers(3, VOCAB.size, rng.integers(1, 10))
            row[f"{side}_input_ids"] = np.array([*prompt, *completion, 2], dtype=np.int32)
            row[f"{side}_assistant_masks"] = np.array([0] * len(prompt) + [1] * (len(completion) + 1), np.int32)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pairs"))
    with SerialCacheWriter(path, EXEMPLAR) as writer:
        writer.write_batch(synthetic_pairs(13))
    return writer.result()


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(
        max_seq_len=SEQ, hidden_dim=32, intermediate_dim=64, num_layers=2, num_heads=4, num_kv_heads=2
    )
    return config.build(VOCAB, key=jrandom.PRNGKey(0))


def one_batch(dataset):
    sync = dataset.as_sync_dataset()
    items = sync.get_batch(list(range(len(sync))))
    Batch = Axis("batch", len(items))
    return jax.tree.map(
        lambda *xs: hax.stack(Batch, xs), *items, is_leaf=lambda x: isinstance(x, hax.NamedArray)
    )


@eqx.filter_jit
def loss_and_metrics(model, batch, max_pairs_per_row):
    return simpo_loss(model, batch, beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.3, max_pairs_per_row=max_pairs_per_row)


def assert_same_loss(model, reference_batch, batch, max_pairs_per_row):
    ref_loss, ref_metrics = loss_and_metrics(model, reference_batch, 1)
    loss, metrics = loss_and_metrics(model, batch, max_pairs_per_row)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for name in ("simpo_chosen_logp", "simpo_rejected_logp", "simpo_sft_loss", "simpo_accuracy"):
        np.testing.assert_allclose(float(metrics[name]), float(ref_metrics[name]), rtol=1e-5)
    # every pair is counted once: the same number of pairs enters the mean
    assert float(metrics["simpo_loss"]._count) == float(ref_metrics["simpo_loss"]._count) == 13


def test_packed_pairs_match_one_pair_per_row(cache, model):
    Pos = model.Pos.resize(SEQ)
    padded = PreferencePairDataset(cache, Pos)
    packed = packed_pair_dataset(PreferenceChatLmDatasetFormat(), Pos, cache, max_pairs_per_row=4)
    assert len(packed.as_sync_dataset()) < len(padded.as_sync_dataset())
    assert_same_loss(model, one_batch(padded), one_batch(packed), 4)


def test_shared_prompt_matches_unshared_loss_and_gradient(cache, model):
    Pos = model.Pos.resize(SEQ)
    padded = one_batch(PreferencePairDataset(cache, Pos))
    # three pairs per row covers one per row too: pairs in a row never see each other
    shared = one_batch(PrefixSharedPairDataset(cache, Pos, max_pairs_per_row=3))
    assert_same_loss(model, padded, shared, 3)

    @eqx.filter_jit
    def grad(batch, k):
        return eqx.filter_grad(lambda m: loss_and_metrics(m, batch, k)[0])(model)

    ref_leaves = jax.tree.leaves(grad(padded, 1))
    leaves = jax.tree.leaves(grad(shared, 3))
    assert len(leaves) == len(ref_leaves)
    for g, ref in zip(leaves, ref_leaves):
        scale = float(np.max(np.abs(ref))) + 1e-12
        np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(ref) / scale, atol=1e-5)


def test_shared_layout_puts_prompt_once_and_restarts_positions():
    row = synthetic_pairs(1, seed=3)[0]
    layout = shared_pair_layout(row)
    p = layout.prompt_length
    n_chosen, n_rejected = len(row["chosen_input_ids"]) - p, len(row["rejected_input_ids"]) - p
    assert len(layout) == p + n_chosen + n_rejected
    assert layout.pos_ids[p + n_chosen] == p  # the rejected completion starts right after the prompt
    assert layout.trained.sum() == row["chosen_assistant_masks"].sum() + row["rejected_assistant_masks"].sum()


def test_greedy_pack_respects_length_and_pair_limits():
    assert greedy_pack([3, 3, 3, 5, 1], 8, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(ValueError):
        greedy_pack([9], 8, 2)


def test_padding_report_counts_rows_the_datasets_build(cache):
    Pos = Axis("position", SEQ)
    fmt = PreferenceChatLmDatasetFormat()
    padded = padding_report(fmt, cache, Pos, "padded")
    packed = padding_report(fmt, cache, Pos, "packed", max_pairs_per_row=4)
    shared = padding_report(fmt, cache, Pos, "shared", max_pairs_per_row=4)
    assert padded.rows == 26 and padded.real_tokens == packed.real_tokens
    assert padded.real_fraction < packed.real_fraction
    assert shared.real_tokens < packed.real_tokens  # each prompt once
