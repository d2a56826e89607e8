# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The tiny SimPO run on four (virtual CPU) devices, data parallel, fully sharded (FSDP) and tensor parallel, as a
pod runs it (evaluation at step 0 and every four steps, checkpoints, the HF export, a rerun and a resume), gives the
single-device losses and held-out metrics to within f32 rounding of the reordered reductions."""

import re

import equinox as eqx
import jax
import numpy as np
import pytest
from simpo_tiny_run import DEVICES, MESHES, STEPS, final_model, run, tiny_config, train_losses

from levanter.simpo.run.checkpoints import CheckpointMismatchError

# Measured on every mesh: exactly 0 at step 0, 5e-7 at step 1, at most 1.9e-5 by step 7. A reordered f32
# reduction differs by ~1e-7; Adam's normalised update turns such differences in near-zero gradients into
# differences of a whole step for a few parameters, which the later losses show.
LOSS_RTOL = 1e-4
# Measured: 4.6e-5 (data parallel, FSDP) and 6.1e-5 (tensor parallel); a parameter laid out or updated wrongly on a
# mesh would differ by about its own size.
PARAM_RELATIVE_L2 = 1e-3


def test_each_run_used_its_mesh(mesh_runs):
    _, meshes = mesh_runs
    for name, axes in MESHES.items():
        assert meshes[name]["devices"] == DEVICES
        assert {k: v for k, v in meshes[name]["mesh"].items() if k in axes} == axes, name
    assert meshes["fsdp"]["param_mapping"]["embed"] == "data"
    assert meshes["tensor_parallel"]["param_mapping"]["mlp"] == "model"
    assert meshes["tensor_parallel"]["param_mapping"]["heads"] == "model"


@pytest.mark.parametrize("mesh", MESHES)
def test_losses_match_one_device(single_device_runs, mesh_runs, mesh):
    _, meshes = mesh_runs
    reference = train_losses(single_device_runs.reference)
    losses = train_losses(meshes[mesh]["steps"])
    assert sorted(losses) == list(range(STEPS))
    relative = [abs(losses[s] - reference[s]) / abs(reference[s]) for s in range(STEPS)]
    print(f"{mesh}: relative loss difference by step", " ".join(f"{r:.1e}" for r in relative))
    assert max(relative) < LOSS_RTOL


@pytest.mark.parametrize("mesh", MESHES)
def test_held_out_metrics_match_one_device(single_device_runs, mesh_runs, mesh):
    _, meshes = mesh_runs
    reference, ours = single_device_runs.reference, meshes[mesh]["steps"]
    evaluated = sorted(s for s, m in ours.items() if "eval/loss" in m)
    assert evaluated == sorted(s for s, m in reference.items() if "eval/loss" in m)
    assert evaluated[0] == 0 and evaluated[-1] == STEPS - 1, evaluated
    names = [k for k in reference[evaluated[-1]] if k.startswith("eval/")]
    assert "eval/length/margin_length_correlation" in names and "eval/rewards/accuracies" in names
    for step in evaluated:
        for name in names:
            theirs = reference[step][name]
            assert abs(ours[step][name] - theirs) <= LOSS_RTOL * max(abs(theirs), 1.0), (step, name, ours[step][name])


@pytest.mark.parametrize("mesh", MESHES)
def test_each_mesh_exports_and_a_rerun_changes_nothing(mesh_runs, mesh):
    tmp, meshes = mesh_runs
    assert (tmp / "hf" / mesh / f"step-{STEPS - 1}" / "config.json").exists()
    again = meshes[f"{mesh}_again"]
    assert not any("train/loss" in m for m in again["steps"].values())
    assert any(f"Run {mesh} already finished: its checkpoint holds {STEPS} steps" in m for m in again["messages"])


def test_a_run_on_a_mesh_resumes_when_extended(mesh_runs):
    _, meshes = mesh_runs
    extended = meshes["tensor_parallel_extended"]
    assert f"Resuming SimPO training from step {STEPS}" in extended["messages"]
    assert sorted(s for s, m in extended["steps"].items() if "train/loss" in m) == [STEPS, STEPS + 1]
    assert "eval/loss" in extended["steps"][STEPS + 1]


@pytest.mark.parametrize("mesh", MESHES)
def test_final_parameters_match_one_device(single_device_runs, mesh_runs, mesh):
    tmp, _ = mesh_runs

    def flat(model):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))])

    reference = flat(final_model(single_device_runs.tmp, "reference"))
    sharded = flat(final_model(tmp, mesh))
    relative_l2 = np.linalg.norm(sharded - reference) / np.linalg.norm(reference)
    largest = np.max(np.abs(sharded - reference))
    print(f"{mesh}: parameters' relative L2 difference {relative_l2:.1e}, largest difference {largest:.1e}")
    assert relative_l2 < PARAM_RELATIVE_L2


def test_a_packed_run_resumed_where_its_rows_a_step_differ_stops(mesh_runs, shared_setup, repo_cwd):
    # the mesh may change on resume, but a packed run's rows a step follow the data-parallel width: 12 pairs a step
    # made a multiple of 4 rows on four devices, and make another number on one; every later batch would move
    tmp, meshes = mesh_runs
    assert meshes["rows"]["devices"] == DEVICES
    args = ["--data.cache_dir", str(tmp / "cache"), "--trainer.id", "rows", "--trainer.train_batch_size", "12"]
    config = tiny_config(
        tmp, *shared_setup.overrides, *args, "--trainer.num_train_steps", "4", config_path=shared_setup.config
    )
    with pytest.raises(CheckpointMismatchError) as error:
        run(config)
    rows = re.search(r"rows_per_step: '(\d+)' -> '(\d+)'", str(error.value))
    assert rows is not None, str(error.value)
    assert int(rows[1]) % DEVICES == 0 and rows[1] != rows[2]
