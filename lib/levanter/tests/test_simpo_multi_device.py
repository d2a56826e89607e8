# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The tiny SimPO run on four (virtual CPU) devices, data parallel, fully sharded (FSDP) and tensor parallel, gives
the single-device losses to within f32 rounding of the reordered reductions."""

import json
import os

import equinox as eqx
import jax
import numpy as np
import pytest
from simpo_tiny_run import (
    STEPS,
    collect_child,
    final_model,
    run_overrides,
    shared_setup,
    single_device_runs,
    start_child,
    train_losses,
)

DEVICES = 4
MESHES = {
    # the batch split over "replica"; parameters replicated ("embed" maps to "data", here of size 1)
    "data_parallel": {"replica": DEVICES, "data": 1, "model": 1},
    # Levanter's default: the batch and the parameters' "embed" axis split over "data"
    "fsdp": {"data": DEVICES, "replica": 1, "model": 1},
    # attention heads and MLP units split over "model" (Levanter's shared mapping); every device sees the batch
    "tensor_parallel": {"model": DEVICES, "data": 1, "replica": 1},
}
# Measured on every mesh: exactly 0 at step 0, 5e-7 at step 1, at most 1.9e-5 by step 7. A reordered f32
# reduction differs by ~1e-7; Adam's normalised update turns such differences in near-zero gradients into
# differences of a whole step for a few parameters, which the later losses show.
LOSS_RTOL = 1e-4
# Measured: 4.6e-5 (data parallel, FSDP) and 6.1e-5 (tensor parallel); a parameter laid out or updated wrongly on a
# mesh would differ by about its own size.
PARAM_RELATIVE_L2 = 1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    tmp = tmp_path_factory.mktemp("meshes")
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}".strip()
    # The four-device child has its own data and compilation caches, so that it can run while the single-device
    # runs are made (each child mostly keeps one core busy). This module sorts before the other users of
    # single_device_runs, so in a full test run the two overlap.
    own_caches = ["--data.cache_dir", str(tmp / "cache"), "--trainer.jax_compilation_cache_dir", str(tmp / "jax")]
    child, out = start_child(
        tmp,
        shared_setup(base),
        [
            {"name": name, "overrides": run_overrides(name, "--trainer.mesh.axes", json.dumps(axes), *own_caches)}
            for name, axes in MESHES.items()
        ],
        env={"XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"},
    )
    single = single_device_runs(base)
    return single, tmp, collect_child(tmp, child, out)


def test_each_run_used_its_mesh(runs):
    _, _, meshes = runs
    for name, axes in MESHES.items():
        assert meshes[name]["devices"] == DEVICES
        assert {k: v for k, v in meshes[name]["mesh"].items() if k in axes} == axes, name
    assert meshes["fsdp"]["param_mapping"]["embed"] == "data"
    assert meshes["tensor_parallel"]["param_mapping"]["mlp"] == "model"
    assert meshes["tensor_parallel"]["param_mapping"]["heads"] == "model"


@pytest.mark.parametrize("mesh", MESHES)
def test_losses_match_one_device(runs, mesh):
    single, _, meshes = runs
    reference = train_losses(single.reference)
    losses = train_losses(meshes[mesh]["steps"])
    assert sorted(losses) == list(range(STEPS))
    relative = [abs(losses[s] - reference[s]) / abs(reference[s]) for s in range(STEPS)]
    print(f"{mesh}: relative loss difference by step", " ".join(f"{r:.1e}" for r in relative))
    assert max(relative) < LOSS_RTOL


@pytest.mark.parametrize("mesh", MESHES)
def test_final_parameters_match_one_device(runs, mesh):
    single, tmp, _ = runs

    def flat(model):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))])

    reference = flat(final_model(single.tmp, "reference"))
    sharded = flat(final_model(tmp, mesh))
    relative_l2 = np.linalg.norm(sharded - reference) / np.linalg.norm(reference)
    largest = np.max(np.abs(sharded - reference))
    print(f"{mesh}: parameters' relative L2 difference {relative_l2:.1e}, largest difference {largest:.1e}")
    assert relative_l2 < PARAM_RELATIVE_L2
