# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""A SimPO run killed hard (SIGKILL) after a mid-run checkpoint and restarted trains exactly like one that was never
stopped: the same batches, bit-identical losses after the restart, bit-identical final parameters."""

import jax
import numpy as np
import pytest
from simpo_tiny_run import FREEZE_AT, SAVE_EVERY, STEPS, final_model, train_losses

RESUMES_AT = SAVE_EVERY + 1  # checkpoint step-3 holds the state after step 3


@pytest.fixture
def runs(single_device_runs):
    return single_device_runs


def test_the_kill_lost_the_steps_after_the_checkpoint(runs):
    assert sorted(train_losses(runs.killed)) == list(range(FREEZE_AT + 1))
    assert runs.checkpoints_at_kill == [f"step-{SAVE_EVERY}"]
    assert f"Resuming SimPO training from step {RESUMES_AT}" in runs.resumed_log
    # the killed process still named itself in the run's lease; the restart sees it gone and takes over
    assert "Run preempted: taking over the stale lease" in runs.resumed_log
    assert "(that process is gone)" in runs.resumed_log


def test_resumed_losses_equal_the_uninterrupted_run_bitwise(runs):
    reference = train_losses(runs.reference)
    killed = train_losses(runs.killed)
    resumed = train_losses(runs.resumed)
    assert sorted(reference) == list(range(STEPS))
    assert sorted(resumed) == list(range(RESUMES_AT, STEPS))
    assert killed == {s: reference[s] for s in killed}
    assert resumed == {s: reference[s] for s in resumed}


def test_resumed_run_sees_the_same_batches(runs):
    # every per-pair mean (log-probs, rewards, accuracies) of every step equal: the same pairs in the same order
    def train_metrics(by_step, step):
        return {k: v for k, v in by_step[step].items() if k.startswith("train/")}

    for step in range(RESUMES_AT, STEPS):
        assert train_metrics(runs.resumed, step) == train_metrics(runs.reference, step)
    for step in range(FREEZE_AT):  # the freeze came with step FREEZE_AT's loss, before its other metrics
        assert train_metrics(runs.killed, step) == train_metrics(runs.reference, step)


def test_resumed_final_parameters_equal_the_uninterrupted_run_bitwise(runs):
    reference = jax.tree.leaves(final_model(runs.tmp, "reference"))
    resumed = jax.tree.leaves(final_model(runs.tmp, "preempted"))
    assert len(reference) == len(resumed) > 0
    for a, b in zip(reference, resumed):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
