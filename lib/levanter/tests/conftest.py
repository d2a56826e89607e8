# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Session fixtures: the tiny runs that several test modules compare, made once per session in child processes
(``simpo_child_run.py``), whichever module asks first."""

import dataclasses
import json
import os
from pathlib import Path

import pytest

# Tests never reach the Hugging Face Hub; offline mode skips the retries an HF export would otherwise make. Set before
# the helpers are imported: they import huggingface_hub, which reads it when imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from simpo_child_run import ChildRuns  # noqa: E402
from simpo_tiny_run import DEVICES, FREEZE_AT, MESHES, STEPS, SharedSetup, run_overrides, shared_setup_in  # noqa: E402


@pytest.fixture
def repo_cwd(monkeypatch):
    """The tiny YAML's data and tokenizer paths are relative to the repository root."""
    monkeypatch.chdir(Path(__file__).resolve().parents[3])


def _session_uses(request, fixture: str) -> bool:
    return any(fixture in item.fixturenames for item in request.session.items)


@pytest.fixture(scope="session")
def shared_setup(tmp_path_factory) -> SharedSetup:
    """One data cache, config and JAX compilation cache for the tiny-subset runs of the session."""
    return shared_setup_in(tmp_path_factory.mktemp("simpo_tiny_shared"))


@dataclasses.dataclass(frozen=True)
class SingleDeviceRuns:
    tmp: Path
    reference: dict[int, dict]
    """The uninterrupted run (id "reference")."""
    killed: dict[int, dict]
    """What the run SIGKILLed after step FREEZE_AT logged (id "preempted")."""
    checkpoints_at_kill: list[str]
    resumed: dict[int, dict]
    """The same command run again after the kill."""
    resumed_log: str
    diverged_error: str | None
    """What stopped a run whose learning rate of 1e30 makes step 1 non-finite."""


@pytest.fixture(scope="session")
def single_device_runs(request, shared_setup, tmp_path_factory) -> SingleDeviceRuns:
    """The single-device runs, in two child processes: the first is killed; the second resumes its run, then makes
    the uninterrupted one and one that diverges."""
    if _session_uses(request, "mesh_runs"):
        # the mesh runs' child first, so that the two overlap (each child keeps about one core busy)
        request.getfixturevalue("mesh_child")
    tmp = tmp_path_factory.mktemp("single_device")
    # a preempted job's restart runs the same command: the same run id and checkpoint path
    preempted = run_overrides("preempted")
    child = ChildRuns(tmp, shared_setup, [{"name": "killed", "overrides": preempted, "freeze_at_step": FREEZE_AT}])
    child.wait_for_freeze()
    child.kill()
    killed = child.frozen_metrics()
    checkpoints = tmp / "checkpoints" / "preempted"
    checkpoints_at_kill = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())  # not the run's lease.json
    diverging = run_overrides("diverged", "--optimizer.learning_rate", "1e30", "--optimizer.warmup", "0")
    runs = [
        {"name": "resumed", "overrides": preempted},
        # exported, so that its samples can be checked against transformers (test_simpo_samples.py)
        {
            "name": "reference",
            "overrides": run_overrides("reference", "--run_initial_eval", "true", "--hf_save_path", str(tmp / "hf")),
        },
        {"name": "diverged", "overrides": diverging},
    ]
    resuming = ChildRuns(tmp, shared_setup, runs)
    results = resuming.collect()
    return SingleDeviceRuns(
        tmp=tmp,
        reference=results["reference"]["steps"],
        killed=killed,
        checkpoints_at_kill=checkpoints_at_kill,
        resumed=results["resumed"]["steps"],
        resumed_log=resuming.log(),
        diverged_error=results["diverged"]["error"],
    )


@pytest.fixture(scope="session")
def mesh_child(shared_setup, tmp_path_factory):
    """The runs of MESHES on DEVICES virtual CPU devices, started in a child process; ``mesh_runs`` collects them."""
    tmp = tmp_path_factory.mktemp("meshes")
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}".strip()
    # its own data and compilation caches, so that it can run beside the single-device runs
    own_caches = ["--data.cache_dir", str(tmp / "cache"), "--trainer.jax_compilation_cache_dir", str(tmp / "jax")]
    # as a pod runs: evaluation at step 0 and every few steps, checkpoints, the HF export; then the same command
    # again (nothing to do), and one mesh's run extended by two steps (a resume)
    runs = []
    for name, axes in MESHES.items():
        overrides = run_overrides(name, "--trainer.mesh.axes", json.dumps(axes), "--run_initial_eval", "true",
                                  "--hf_save_path", str(tmp / "hf"), *own_caches)  # fmt: skip
        runs += [{"name": name, "overrides": overrides}, {"name": f"{name}_again", "overrides": overrides}]
    extended = [*runs[-2]["overrides"], "--trainer.num_train_steps", str(STEPS + 2)]
    runs.append({"name": "tensor_parallel_extended", "overrides": extended})
    # 12 pairs a step, whose rows a step on 4 data-parallel devices are a multiple of 4 and on one device are not
    rows = ["--trainer.train_batch_size", "12", "--trainer.num_train_steps", "2"]
    mesh = ["--trainer.mesh.axes", json.dumps(MESHES["data_parallel"])]
    runs.append({"name": "rows", "overrides": ["--trainer.id", "rows", *rows, *mesh, *own_caches]})
    child = ChildRuns(tmp, shared_setup, runs, env={"XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"})
    yield child
    child.close()


@pytest.fixture(scope="session")
def mesh_runs(request, mesh_child) -> tuple[Path, dict]:
    """The mesh runs' directory and results (as ``ChildRuns.collect`` returns them)."""
    if _session_uses(request, "single_device_runs"):
        request.getfixturevalue("single_device_runs")  # made while the mesh runs' child runs
    return mesh_child.tmp, mesh_child.collect()


def pytest_sessionfinish(session, exitstatus):
    # Levanter's training progress bar is never closed, and the trainers of in-process runs live until the
    # interpreter exits, when closing the bar would log to a closed stream ("--- Logging error ---"); close the
    # leftover bars while the streams are open
    from tqdm import tqdm

    for bar in list(tqdm._instances):
        bar.close()
