# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Runs the shipped tiny SimPO config for tests in the test process (``tiny_config``, ``run``), and the pieces the
runs in child processes share with them (``shared_setup_in``, the compared runs of ``run_overrides``, ``MESHES``).
Child processes are in ``simpo_child_run.py``; the runs several test modules share are session fixtures in
``conftest.py``.
"""

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import draccus
import equinox as eqx
import jax
import jax.random as jrandom
import numpy as np
import yaml

import haliax as hax
import levanter.checkpoint
from levanter.main import train_simpo
from levanter.main.train_simpo import TrainSimpoConfig
from levanter.simpo.objective import layouts as simpo_layouts
from levanter.simpo.run import lifecycle

REPO = Path(__file__).resolve().parents[3]
TINY_CONFIG = REPO / "lib/levanter/config/simpo_tiny_gpt2.yaml"


def tiny_args(tmp: Path, *overrides: str) -> list[str]:
    """Command-line arguments that shrink the embedded default for a test and write everything under ``tmp``."""
    return [
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
        "--trainer.log_dir",
        str(tmp / "logs"),
        "--hf_save_path",
        str(tmp / "hf"),
        # Levanter traces and lowers the train step a second time to log its jaxpr and HLO; tests do not read them
        "--trainer.log_jaxprs",
        "false",
        "--trainer.log_xla_hlo",
        "false",
        *overrides,
    ]


def tiny_config(tmp: Path, *overrides: str, config_path: Path = TINY_CONFIG) -> TrainSimpoConfig:
    """The embedded default, shrunk for a test and writing everything under ``tmp``."""
    return draccus.parse(TrainSimpoConfig, config_path=str(config_path), args=tiny_args(tmp, *overrides))


class TrackedMetrics(logging.Handler):
    """Collects what the json_logger tracker logs, merged per step, and every message (Levanter resets the root
    logging handlers, so pytest's caplog does not see these records)."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.by_step: dict[int, dict[str, float]] = {}
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())
        if record.name == "levanter.json_logger":
            event = json.loads(record.getMessage())
            if event.get("event") == "log":
                self.by_step.setdefault(event["step"], {}).update(event["metrics"])


def run(config: TrainSimpoConfig, tracked: TrackedMetrics | None = None) -> TrackedMetrics:
    tracked = tracked if tracked is not None else TrackedMetrics()
    names = ("levanter.json_logger", train_simpo.__name__, simpo_layouts.__name__, lifecycle.__name__)
    loggers = [logging.getLogger(name) for name in names]
    for log in loggers:
        log.addHandler(tracked)
    try:
        train_simpo.main(config)
    finally:
        for log in loggers:
            log.removeHandler(tracked)
    return tracked


def train_losses(by_step: dict[int, dict]) -> dict[int, float]:
    return {step: metrics["train/loss"] for step, metrics in by_step.items() if "train/loss" in metrics}


# ---- the shared tiny setup ----

TRAIN_ROWS = 96
"""Pairs kept by ``training_subset_config``: enough for 12 steps of 8 without repeating a pair."""
HELD_OUT_ROWS = 16
"""Held-out pairs kept by ``training_subset_config``: two evaluation batches of 8."""


def training_subset_config(tmp: Path) -> Path:
    """The tiny config on the first TRAIN_ROWS training pairs and the first HELD_OUT_ROWS held-out pairs of the
    shipped set (caching all 2750 takes longer than the short runs these tests make)."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    source = next(iter(config["data"]["components"].values()))["source"]
    for key, rows in (("train_urls", TRAIN_ROWS), ("validation_urls", HELD_OUT_ROWS)):
        kept: list[str] = []
        for url in source[key]:
            with open(REPO / url) as f:
                kept.extend(line for _, line in zip(range(rows - len(kept)), f))
        path = tmp / f"{key.split('_')[0]}.jsonl"
        path.write_text("".join(kept))
        source[key] = [str(path)]
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclasses.dataclass(frozen=True)
class SharedSetup:
    """The training subset's config, and overrides that point runs at one data cache and one JAX compilation cache:
    the first run builds them, later runs reuse them."""

    config: Path
    overrides: list[str]


def shared_setup_in(root: Path) -> SharedSetup:
    root.mkdir(exist_ok=True)
    caches = ["--data.cache_dir", str(root / "cache"), "--trainer.jax_compilation_cache_dir", str(root / "jax_cache")]
    return SharedSetup(training_subset_config(root), [*caches, "--hf_save_path", "null"])


# ---- the runs the resume, lifecycle and multi-device tests compare ----

STEPS = 8
SAVE_EVERY = 3  # checkpoints step-3 and step-6, and step-7 at the end
FREEZE_AT = 5  # the killed run has done steps 0-5; its last checkpoint is step-3, so steps 4 and 5 are lost


def run_overrides(run_id: str, *extra: str) -> list[str]:
    """8 steps of 8 pairs."""
    keep = json.dumps([{"every": SAVE_EVERY}])
    steps = str(STEPS)
    return ["--trainer.id", run_id, "--trainer.num_train_steps", steps, "--trainer.checkpointer.keep", keep, *extra]


DEVICES = 4
"""The (virtual CPU) devices of the multi-device runs."""
MESHES = {
    # the batch split over "replica"; parameters replicated ("embed" maps to "data", here of size 1)
    "data_parallel": {"replica": DEVICES, "data": 1, "model": 1},
    # Levanter's default: the batch and the parameters' "embed" axis split over "data"
    "fsdp": {"data": DEVICES, "replica": 1, "model": 1},
    # attention heads and MLP units split over "model" (Levanter's shared mapping); every device sees the batch
    "tensor_parallel": {"model": DEVICES, "data": 1, "replica": 1},
}


def final_model(tmp: Path, run_id: str, steps: int = STEPS):
    """The model parameters of the last checkpoint of a run of ``steps`` steps, on this process's first device."""
    with contextlib.chdir(REPO):
        config = tiny_config(tmp)
        Vocab = hax.Axis("vocab", len(config.data.the_tokenizer))
    exemplar = eqx.filter_eval_shape(config.model.build, Vocab, key=jrandom.PRNGKey(0))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    path = tmp / "checkpoints" / run_id / f"step-{steps - 1}"
    return levanter.checkpoint.load_checkpoint(exemplar, path, subpath="model", axis_mapping={}, mesh=mesh)
