# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The shipped tiny config through the real Trainer: checkpoints, HF export, falling loss, and resume."""

import json
import math
import os

import pytest
from simpo_tiny_run import REPO, run, tiny_config


@pytest.fixture(scope="module")
def repo_cwd():
    """The YAML's data and tokenizer paths are relative to the repository root."""
    cwd = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(cwd)


def test_tiny_run_learns_checkpoints_exports_and_resumes(tmp_path, repo_cwd):
    overrides = ("--trainer.id", "e2e", "--hf_save_steps", "8")
    first = run(tiny_config(tmp_path, "--trainer.num_train_steps", "8", *overrides)).by_step

    train_steps = sorted(s for s, m in first.items() if "train/loss" in m)
    assert train_steps == list(range(8))
    # a fresh model gives both sides the same average log-prob: logits = -gamma_beta_ratio, loss softplus(beta*0.5)
    untrained = math.log1p(math.exp(2.0 * 0.5))
    assert first[0]["train/loss"] == pytest.approx(untrained, abs=0.01)
    # the held-out loss falls from evaluation to evaluation (same pairs each time)
    assert untrained > first[3]["eval/simpo_loss"] > first[7]["eval/simpo_loss"]
    assert first[7]["eval/rewards/accuracies"] > 0.6
    assert first[7]["eval/simpo_skipped_pairs"] == 0  # two full eval batches, no padding

    checkpoints = tmp_path / "checkpoints" / "e2e"
    assert (checkpoints / "step-4").is_dir() and (checkpoints / "step-7").is_dir()
    # the data statistics go beside the run's checkpoints, never into the cache another run may share
    stats = json.loads((checkpoints / "pair_stats.json").read_text())
    assert stats["train/tiny_simpo"]["pairs"] == 2500 and stats["validation/tiny_simpo"]["pairs"] == 250
    assert not list((tmp_path / "cache").rglob("pair_stats.json"))
    export = tmp_path / "hf" / "e2e" / "step-7"
    assert (export / "config.json").is_file() and (export / "tokenizer_config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in export.iterdir())

    resumed = run(tiny_config(tmp_path, "--trainer.num_train_steps", "10", *overrides))
    assert "Resuming SimPO training from step 8" in resumed.messages
    assert sorted(s for s, m in resumed.by_step.items() if "train/loss" in m) == [8, 9]
