# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Runs the shipped tiny SimPO config for tests, in the test process (``tiny_config``, ``run``) or in child
processes (``start_child``, ``collect_child``, ``single_device_runs``).

A child process is what a test needs to give JAX more (virtual) devices, to kill a run hard, or to restart one the
way a preempted job restarts. ``python simpo_tiny_run.py SPEC.json`` runs the spec's ``runs`` one after another,
each ``{"name", "overrides"}`` with optionally ``freeze_at_step``: after logging that step's training metrics the
run writes what it has and sleeps, so the test can SIGKILL it mid-run with a known amount of unsaved work; with
``"freeze_until_signal": true`` it waits there for a signal instead (its handler runs, then the run goes on), so a
test can SIGTERM it at a known step.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import draccus
import equinox as eqx
import haliax as hax
import jax
import jax.random as jrandom
import numpy as np
import yaml

import levanter.checkpoint
from levanter.main import train_simpo
from levanter.main.simpo_guard import NonFiniteTrainingError
from levanter.main.train_simpo import TrainSimpoConfig

REPO = Path(__file__).resolve().parents[3]
TINY_CONFIG = REPO / "lib/levanter/config/simpo_tiny_gpt2.yaml"


def tiny_config(tmp: Path, *overrides: str, config_path: Path = TINY_CONFIG) -> TrainSimpoConfig:
    """The embedded default, shrunk for a test and writing everything under ``tmp``."""
    args = [
        "--data.cache_dir",
        str(tmp / "cache"),
        "--trainer.train_batch_size",
        "8",
        "--trainer.steps_per_eval",
        "4",
        "--trainer.max_eval_batches",
        "2",
        "--trainer.checkpointer.base_path",
        str(tmp / "checkpoints"),
        "--trainer.checkpointer.keep",
        '[{"every": 4}]',
        "--trainer.tracker",
        '{"type": "json_logger"}',
        "--hf_save_path",
        str(tmp / "hf"),
        # Levanter traces and lowers the train step a second time to log its jaxpr and HLO; tests do not read them
        "--trainer.log_jaxprs",
        "false",
        "--trainer.log_xla_hlo",
        "false",
        *overrides,
    ]
    return draccus.parse(TrainSimpoConfig, config_path=str(config_path), args=args)


class TrackedMetrics(logging.Handler):
    """Collects what the json_logger tracker logs, merged per step (Levanter resets the root logging handlers,
    so pytest's caplog does not see these records)."""

    def __init__(self, freeze_at_step: int | None = None, out: Path | None = None, until_signal: bool = False):
        super().__init__(level=logging.INFO)
        self.by_step: dict[int, dict[str, float]] = {}
        self.messages: list[str] = []
        self._freeze_at_step = freeze_at_step
        self._out = out
        self._until_signal = until_signal

    def emit(self, record):
        self.messages.append(record.getMessage())
        if record.name == "levanter.json_logger":
            event = json.loads(record.getMessage())
            if event.get("event") == "log":
                step = event["step"]
                self.by_step.setdefault(step, {}).update(event["metrics"])
                if step == self._freeze_at_step and "train/loss" in event["metrics"]:
                    self._freeze_at_step = None  # once: Levanter's final forced hooks log the last step again
                    self._freeze()

    def _freeze(self):
        # The training thread stops here with steps past the last checkpoint done and unsaved; the checkpointer's
        # own threads keep running, so a checkpoint being written completes.
        assert self._out is not None
        self._out.write_text(json.dumps({"frozen": self.by_step}))
        Path(f"{self._out}.frozen").touch()
        if self._until_signal:
            signal.pause()  # returns once a signal's handler has run
        else:
            time.sleep(600)


def run(config: TrainSimpoConfig, tracked: TrackedMetrics | None = None) -> TrackedMetrics:
    tracked = tracked if tracked is not None else TrackedMetrics()
    loggers = [logging.getLogger("levanter.json_logger"), logging.getLogger(train_simpo.__name__)]
    for log in loggers:
        log.addHandler(tracked)
    try:
        train_simpo.main(config)
    finally:
        for log in loggers:
            log.removeHandler(tracked)
    return tracked


# ---- runs in child processes ----

TRAIN_ROWS = 96
"""Pairs kept by ``training_subset_config``: enough for 12 steps of 8 without repeating a pair."""


def training_subset_config(tmp: Path) -> Path:
    """The tiny config training on the first TRAIN_ROWS pairs of the shipped set, without evaluation.

    Caching all 2500 pairs takes longer than the short runs these tests make, and evaluation does not change the
    training state they compare.
    """
    config = yaml.safe_load(TINY_CONFIG.read_text())
    source = next(iter(config["data"]["components"].values()))["source"]
    rows = []
    for url in source["train_urls"]:
        with open(REPO / url) as f:
            rows.extend(line for _, line in zip(range(TRAIN_ROWS - len(rows)), f))
    train = tmp / "train.jsonl"
    train.write_text("".join(rows))
    source["train_urls"] = [str(train)]
    source["validation_urls"] = []
    config["validation_split_fraction"] = 0
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@functools.cache
def shared_setup(base: Path) -> dict:
    """One data cache, config and JAX compilation cache for every child run of a pytest session (``base`` is its
    base temporary directory): the first run builds them, later runs reuse them."""
    root = base / "simpo_tiny_shared"
    root.mkdir(exist_ok=True)
    return {
        "config": str(training_subset_config(root)),
        "overrides": [
            "--data.cache_dir",
            str(root / "cache"),
            "--trainer.jax_compilation_cache_dir",
            str(root / "jax_cache"),
            "--hf_save_path",
            "null",
        ],
    }


def start_child(tmp: Path, shared: dict, runs: list[dict], *, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """Starts ``runs`` (each ``{"name", "overrides", "freeze_at_step"?}``) in a child; returns it and its output."""
    out = tmp / "runs.json"
    spec = tmp / "spec.json"
    runs = [{**r, "overrides": shared["overrides"] + list(r["overrides"])} for r in runs]
    spec.write_text(json.dumps({"tmp": str(tmp), "out": str(out), "config": shared["config"], "runs": runs}))
    with open(tmp / "child.log", "w") as log:
        child = subprocess.Popen(
            [sys.executable, __file__, str(spec)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    return child, out


def child_log_tail(tmp: Path) -> str:
    return (tmp / "child.log").read_text()[-6000:]


def collect_child(tmp: Path, child: subprocess.Popen, out: Path, timeout: float = 600) -> dict:
    """Waits for a child from ``start_child`` and returns, per run name, ``{"steps": {step: metrics}, "error" (the
    message of a NonFiniteTrainingError that ended the run, or None), "devices", "mesh", "param_mapping"}``."""
    try:
        child.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
    if not out.exists():
        raise RuntimeError(f"the child run failed (exit code {child.returncode}):\n{child_log_tail(tmp)}")
    results = json.loads(out.read_text())
    for result in results.values():
        result["steps"] = {int(s): m for s, m in result["steps"].items()}
    return results


def run_in_child(tmp: Path, shared: dict, runs: list[dict], *, env: dict | None = None) -> dict:
    child, out = start_child(tmp, shared, runs, env=env)
    return collect_child(tmp, child, out)


def train_losses(by_step: dict[int, dict]) -> dict[int, float]:
    return {step: metrics["train/loss"] for step, metrics in by_step.items() if "train/loss" in metrics}


STEPS = 8
SAVE_EVERY = 3  # checkpoints step-3 and step-6, and step-7 at the end
FREEZE_AT = 5  # the killed run has done steps 0-5; its last checkpoint is step-3, so steps 4 and 5 are lost


def run_overrides(run_id: str, *extra: str) -> list[str]:
    """The runs the resume and multi-device tests compare: 8 steps of 8 pairs."""
    keep = json.dumps([{"every": SAVE_EVERY}])
    steps = str(STEPS)
    return ["--trainer.id", run_id, "--trainer.num_train_steps", steps, "--trainer.checkpointer.keep", keep, *extra]


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


def wait_for_freeze(tmp: Path, child: subprocess.Popen, out: Path, *files: Path, timeout: float = 600) -> None:
    """Waits until the child froze at its ``freeze_at_step`` and ``files`` exist (polling the files it writes)."""
    frozen = Path(f"{out}.frozen")
    deadline = time.monotonic() + timeout
    while not (frozen.exists() and all(f.exists() for f in files)):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise RuntimeError(f"the run ended or stalled before it froze:\n{child_log_tail(tmp)}")
        time.sleep(0.05)


def _kill_after_checkpoint(tmp: Path, child: subprocess.Popen, out: Path, checkpoint: Path, timeout: float = 600):
    wait_for_freeze(tmp, child, out, checkpoint / "metadata.json", timeout=timeout)  # Levanter writes it last
    os.kill(child.pid, signal.SIGKILL)
    if child.wait(timeout=60) != -signal.SIGKILL:
        raise RuntimeError(f"the run ended with {child.returncode} instead of being killed:\n{child_log_tail(tmp)}")


@functools.cache
def single_device_runs(base: Path) -> SingleDeviceRuns:
    """The single-device runs the tests of a session compare (``base`` is its base temporary directory), in two
    child processes: the first is killed; the second resumes its run, then makes the uninterrupted one and one
    that diverges."""
    tmp = base / "simpo_tiny_single_device"
    tmp.mkdir()
    shared = shared_setup(base)
    # a preempted job's restart runs the same command: the same run id and checkpoint path
    preempted = run_overrides("preempted")
    child, out = start_child(tmp, shared, [{"name": "killed", "overrides": preempted, "freeze_at_step": FREEZE_AT}])
    checkpoints = tmp / "checkpoints" / "preempted"
    _kill_after_checkpoint(tmp, child, out, checkpoints / f"step-{SAVE_EVERY}")
    killed = {int(s): m for s, m in json.loads(out.read_text())["frozen"].items()}
    checkpoints_at_kill = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())  # not the run's lease.json
    diverging = run_overrides("diverged", "--optimizer.learning_rate", "1e30", "--optimizer.warmup", "0")
    runs = [
        {"name": "resumed", "overrides": preempted},
        {"name": "reference", "overrides": run_overrides("reference")},
        {"name": "diverged", "overrides": diverging},
    ]
    results = run_in_child(tmp, shared, runs)
    return SingleDeviceRuns(
        tmp=tmp,
        reference=results["reference"]["steps"],
        killed=killed,
        checkpoints_at_kill=checkpoints_at_kill,
        resumed=results["resumed"]["steps"],
        resumed_log=(tmp / "child.log").read_text(),
        diverged_error=results["diverged"]["error"],
    )


def final_model(tmp: Path, run_id: str):
    """The model parameters of a child run's last checkpoint, on this process's first device."""
    with contextlib.chdir(REPO):
        config = tiny_config(tmp)
        Vocab = hax.Axis("vocab", len(config.data.the_tokenizer))
    exemplar = eqx.filter_eval_shape(config.model.build, Vocab, key=jrandom.PRNGKey(0))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    path = tmp / "checkpoints" / run_id / f"step-{STEPS - 1}"
    return levanter.checkpoint.load_checkpoint(exemplar, path, subpath="model", axis_mapping={}, mesh=mesh)


def _child(spec_path: str):
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    results = {}
    for entry in spec["runs"]:
        tracked = TrackedMetrics(entry.get("freeze_at_step"), out, entry.get("freeze_until_signal", False))
        config = tiny_config(Path(spec["tmp"]), *entry["overrides"], config_path=Path(spec["config"]))
        error = None
        try:
            run(config, tracked)
        except NonFiniteTrainingError as e:
            error = str(e)
        results[entry["name"]] = {
            "steps": tracked.by_step,
            "error": error,
            "devices": jax.device_count(),
            "mesh": dict(config.trainer.device_mesh.shape),
            "param_mapping": dict(config.trainer.parameter_axis_mapping),
        }
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    os.chdir(REPO)  # the YAML's data and tokenizer paths are relative to the repository root
    _child(sys.argv[1])
