# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The shipped tiny config through the real Trainer: checkpoints, HF export, falling loss, and resume."""

import json
import logging
import math
import os
from pathlib import Path

import draccus
import pytest

from levanter.main import train_simpo
from levanter.main.train_simpo import TrainSimpoConfig

REPO = Path(__file__).resolve().parents[3]
TINY_CONFIG = REPO / "lib/levanter/config/simpo_tiny_gpt2.yaml"


def tiny_config(tmp: Path, *overrides: str) -> TrainSimpoConfig:
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
        *overrides,
    ]
    return draccus.parse(TrainSimpoConfig, config_path=str(TINY_CONFIG), args=args)


class TrackedMetrics(logging.Handler):
    """Collects what the json_logger tracker logs, merged per step (Levanter resets the root logging handlers,
    so pytest's caplog does not see these records)."""

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


@pytest.fixture(scope="module")
def repo_cwd():
    """The YAML's data and tokenizer paths are relative to the repository root."""
    cwd = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(cwd)


def run(config: TrainSimpoConfig) -> TrackedMetrics:
    tracked = TrackedMetrics()
    loggers = [logging.getLogger("levanter.json_logger"), logging.getLogger(train_simpo.__name__)]
    for log in loggers:
        log.addHandler(tracked)
    try:
        train_simpo.main(config)
    finally:
        for log in loggers:
            log.removeHandler(tracked)
    return tracked


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
    export = tmp_path / "hf" / "e2e" / "step-7"
    assert (export / "config.json").is_file() and (export / "tokenizer_config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in export.iterdir())

    resumed = run(tiny_config(tmp_path, "--trainer.num_train_steps", "10", *overrides))
    assert "Resuming SimPO training from step 8" in resumed.messages
    assert sorted(s for s, m in resumed.by_step.items() if "train/loss" in m) == [8, 9]
