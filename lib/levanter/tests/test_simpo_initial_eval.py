# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""``run_initial_eval`` evaluates the starting model on the held-out pairs before the first step, at step 0."""

import math

import pytest
from simpo_tiny_run import run, tiny_config, training_subset_config


def test_the_starting_model_is_evaluated_at_step_0(tmp_path, repo_cwd):
    config = tiny_config(
        tmp_path,
        "--trainer.id",
        "initial_eval",
        "--trainer.num_train_steps",
        "2",
        "--trainer.steps_per_eval",
        "100",
        "--validation_split_fraction",
        "0.25",
        "--run_initial_eval",
        "true",
        config_path=training_subset_config(tmp_path),
    )
    tracked = run(config)
    assert "Evaluating the starting model on the held-out pairs." in tracked.messages
    step0 = tracked.by_step[0]
    # a fresh model gives both sides the same average log-prob: logits = -gamma_beta_ratio, loss softplus(beta*0.5)
    assert step0["eval/simpo_loss"] == pytest.approx(math.log1p(math.exp(2.0 * 0.5)), abs=0.01)
    assert "train/loss" in step0
