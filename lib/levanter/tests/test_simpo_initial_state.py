# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""A fresh start's state (``levanter.simpo.run.initial_state``): the weights, optimizer state and layout of Levanter's
own initialisation, from a program compiled without LLVM's optimisations on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_a_fresh_state_is_levanters_initialisation_laid_out_alike_on_four_device_meshes(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    script = Path(__file__).with_name("simpo_initial_state_check.py")
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-6000:]
    meshes = {r["mesh"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert list(meshes) == ["fsdp", "tensor_parallel"]
    for mesh in meshes.values():
        # parameters and Adam's two moments split over the devices, as Levanter lays them out
        assert mesh["split"] >= 3 * 9 and mesh["max_abs_diff"] < 1e-6, mesh
        # another program than Levanter's (no LLVM optimisations): its weights differ in the last bits, not more;
        # bit-for-bit equal would mean the fresh start no longer took the cheaply compiled program
        assert mesh["max_abs_diff"] > 0, mesh
