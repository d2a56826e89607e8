# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The shipped tiny config through the real Trainer: checkpoints, HF export, falling loss, and resume."""

import json
import math

import jax
import jax.random as jrandom
import numpy as np
import pytest
from simpo_hf_reference import check_against_the_export
from simpo_tiny_run import final_model, run, tiny_config

import haliax as hax
from levanter.data.simpo.splits import build_preference_splits
from levanter.main.train_simpo import simpo_loss
from levanter.simpo.objective.layouts import pair_layout
from levanter.simpo.results.samples import describe


def test_tiny_run_learns_checkpoints_exports_and_resumes(tmp_path, repo_cwd):
    # every held-out pair, in eval batches of 32: the last of the 8 batches holds 26
    evaluation = ("--trainer.max_eval_batches", "null", "--trainer.per_device_eval_parallelism", "32")
    # 40 steps of the default's 32 pairs: in fewer, the held-out loss can still be rising from its start
    schedule = ("--trainer.train_batch_size", "32", "--trainer.steps_per_eval", "20")
    keep = ("--trainer.checkpointer.keep", '[{"every": 20}]')
    overrides = ("--trainer.id", "e2e", "--hf_save_steps", "40", *schedule, *keep, *evaluation)
    config = tiny_config(tmp_path, "--trainer.num_train_steps", "40", *overrides)
    first_run = run(config)
    first = first_run.by_step
    # the default layout: on the CPU, rows of 64 positions cannot hold every pair's prompt and both completions,
    # so pairs are packed; the batch of 32 pairs becomes the rows that hold 32 pairs on average
    auto = "pair_layout packed (auto on cpu: packed trains every pair, shared_prompt would drop some; 2582 of 2750"
    assert any(m.startswith(auto) for m in first_run.messages)
    assert any(m.startswith("tiny_simpo: pair_layout packed (auto): ") for m in first_run.messages)
    assert any(m.startswith("trainer.train_batch_size 32 pairs (from step 0): 17 rows") for m in first_run.messages)

    train_steps = sorted(s for s, m in first.items() if "train/loss" in m)
    assert train_steps == list(range(40))
    # a fresh model gives both sides the same average log-prob: logits = -gamma_beta_ratio, loss softplus(beta*0.5)
    untrained = math.log1p(math.exp(2.0 * 0.5))
    assert first[0]["train/loss"] == pytest.approx(untrained, abs=0.01)
    # the held-out loss falls from evaluation to evaluation (same pairs each time)
    assert untrained > first[19]["eval/simpo_loss"] > first[39]["eval/simpo_loss"]
    assert first[39]["eval/rewards/accuracies"] > 0.65 and first[39]["eval/rewards/margins"] > 0
    assert first[39]["eval/simpo_skipped_pairs"] == 0
    # the held-out loss is the exact mean over the 250 pairs, which Levanter's mean of per-batch means is not
    exact, mean_of_batch_means = _held_out_losses(config, final_model(tmp_path, "e2e", steps=40))
    assert first[39]["eval/loss"] == pytest.approx(exact, rel=1e-5)
    assert abs(mean_of_batch_means - exact) > 1e-4 * exact  # so the check above can fail

    checkpoints = tmp_path / "checkpoints" / "e2e"
    assert (checkpoints / "step-20").is_dir() and (checkpoints / "step-39").is_dir()
    # the data statistics go beside the run's checkpoints, never into the cache another run may share
    stats = json.loads((checkpoints / "pair_stats.json").read_text())
    assert stats["train/tiny_simpo"]["pairs"] == 2500 and stats["validation/tiny_simpo"]["pairs"] == 250
    assert not list((tmp_path / "cache").rglob("pair_stats.json"))
    export = tmp_path / "hf" / "e2e" / "step-39"
    assert (export / "config.json").is_file() and (export / "tokenizer_config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in export.iterdir())

    # what the trained model writes at its last evaluation is what transformers generates from its export
    records = check_against_the_export(tmp_path / "logs" / "e2e", export, 39)
    assert len({tuple(r["answer_ids"]) for r in records}) > 1, records  # the prompts get different answers
    summary = next(m for m in first_run.messages if m.startswith("SimPO held-out metrics at step 39"))
    assert "What the model writes (two held-out prompts):\n" + describe(records[0]) in summary

    resumed = run(tiny_config(tmp_path, "--trainer.num_train_steps", "42", *overrides))
    assert "Resuming SimPO training from step 40" in resumed.messages
    assert sorted(s for s, m in resumed.by_step.items() if "train/loss" in m) == [40, 41]


def _held_out_losses(config, model) -> tuple[float, float]:
    """The exact mean SimPO loss over the 250 held-out pairs in one batch, and Levanter's mean of the means of
    eval batches of 32."""
    layout = pair_layout("padded", 1)
    Pos = model.Pos
    splits = build_preference_splits(
        config.data,
        lambda pairs, kept: layout.rows(pairs, kept, Pos),
        seq_len=Pos.size,
        key=jrandom.PRNGKey(0),
        validation_split_fraction=None,
    )
    items = splits.validation["tiny_simpo"].as_sync_dataset().get_batch(list(range(250)))

    def loss(rows):
        Batch = hax.Axis("batch", len(rows))
        batch = jax.tree.map(lambda *xs: hax.stack(Batch, xs), *rows, is_leaf=lambda x: isinstance(x, hax.NamedArray))
        return float(simpo_loss(model, batch, layout=layout, beta=2.0, gamma_beta_ratio=0.5)[0])

    return loss(items), float(np.mean([loss(items[i : i + 32]) for i in range(0, 250, 32)]))
