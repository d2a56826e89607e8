# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0
"""End to end on this machine: the shipped tiny preference set and tiny GPT-2 go through Marin's preference
tokenization and ``default_simpo``, built by Marin's step runner locally, and leave a checkpoint, an HF export
and tracker metrics behind."""

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import draccus
import jax
import pytest
from fray.types import ResourceConfig

from experiments.defaults import default_preference_tokenize, default_simpo
from experiments.simple_simpo_config import SimpleSimPOConfig
from levanter.checkpoint import discover_latest_checkpoint
from levanter.main.train_simpo import TrainSimpoConfig
from marin.execution.lazy import materialized_config, resolve

REPO = Path(__file__).resolve().parents[3]
TINY_DATA = REPO / "lib" / "levanter" / "data" / "tiny_simpo"
TINY_CONFIG = REPO / "lib" / "levanter" / "config" / "simpo_tiny_gpt2.yaml"
VERSION = "2026.01.24"
NUM_STEPS = 4


@pytest.fixture
def data_dir():
    # Marin refuses training files whose path mentions "test" or "validation", as pytest's temporary paths do
    with tempfile.TemporaryDirectory(prefix="simpo_pairs_") as directory:
        yield Path(directory)


@pytest.fixture
def local_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MARIN_PREFIX", str(tmp_path / "marin"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the metrics still land in tracker_metrics.jsonl
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)  # Levanter writes its logs/ under the working directory
    # the run is all compilation on a tiny model: skip XLA's optimisation passes to roughly halve it
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield tmp_path / "marin"
    jax.config.update("jax_disable_most_optimizations", previous)


def _train_file(directory: Path) -> Path:
    """The shipped training pairs plus two that spell a special token out in their text (dropped and counted)
    and two whose prompts are longer than the 64-token budget (cut as the reference cuts them)."""
    rows = [json.loads(line) for line in (TINY_DATA / "train.jsonl").read_text().splitlines()]
    extra = []
    for i, marker in enumerate(["<|eot_id|>", "<|begin_of_text|>"]):
        row = json.loads(json.dumps(rows[i]))
        row["chosen"][-1]["content"] += f" {marker}"
        extra.append(row)
    for i in (2, 3):
        row = json.loads(json.dumps(rows[i]))
        for side in ("chosen", "rejected"):
            row[side][0]["content"] = " ".join([row[side][0]["content"]] * 8)
        extra.append(row)
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    return path


def _tiny_preferences(directory: Path, pairs: SimpleSimPOConfig):
    tokenizer = str(TINY_DATA / "tokenizer")
    train = default_preference_tokenize(
        "tokenized/tiny_simpo_train",
        tokenizer=tokenizer,
        paths=[str(_train_file(directory))],
        pairs=pairs,
        version=VERSION,
    )
    validation = default_preference_tokenize(
        "tokenized/tiny_simpo_validation",
        tokenizer=tokenizer,
        paths=[str(TINY_DATA / "validation.jsonl")],
        validation=True,
        pairs=pairs,
        version=VERSION,
    )
    return train, validation


@pytest.mark.timeout(600)
def test_tiny_simpo_run_through_the_local_marin_executor(local_run, data_dir):
    with open(TINY_CONFIG) as f:
        tiny_gpt2 = draccus.load(TrainSimpoConfig, f).model
    # the config's paths are relative to the repository root, and this test runs elsewhere
    tiny_gpt2 = dataclasses.replace(tiny_gpt2, tokenizer=str(REPO / tiny_gpt2.tokenizer))
    config = SimpleSimPOConfig(
        resources=ResourceConfig.with_cpu(),
        train_batch_size=32,
        num_train_steps=NUM_STEPS,
        learning_rate=3e-3,
        max_seq_len=tiny_gpt2.max_seq_len,
        validation_split_fraction=None,
        steps_per_eval=NUM_STEPS,
        steps_per_checkpoint=NUM_STEPS,
        steps_per_hf_export=NUM_STEPS,
    )
    train, validation = _tiny_preferences(data_dir, config)
    step = default_simpo("checkpoints/tiny_simpo", train, tiny_gpt2, config, validation=[validation], version=VERSION)

    checkpoint = resolve(step)

    assert checkpoint.path == str(local_run / "checkpoints" / "tiny_simpo" / VERSION)
    last_step = NUM_STEPS - 1  # Levanter labels a checkpoint with the last completed step's index
    latest = discover_latest_checkpoint(checkpoint.checkpoint_dir)
    assert latest == os.path.join(checkpoint.checkpoint_dir, f"step-{last_step}")
    with open(os.path.join(latest, "metadata.json")) as f:
        assert json.load(f)["step"] == last_step
    hf_export = Path(checkpoint.path) / "hf" / f"step-{last_step}"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in hf_export.iterdir()}

    metrics = checkpoint.training_metrics()
    assert math.isfinite(metrics.train_loss) and math.isfinite(metrics.eval_loss)
    summary = metrics.summary
    assert summary["global_step"] == last_step
    # the Marin door cuts and drops as the Levanter YAML does: long prompts cut, special-token text dropped
    train_stats = "data/train/tokenized/tiny_simpo_train"
    assert summary[f"{train_stats}/rows"] == 2504 and summary[f"{train_stats}/pairs"] == 2502
    assert summary[f"{train_stats}/dropped/special_token_text"] == 2
    assert summary[f"{train_stats}/cut/prompt"] == 2
    assert summary["data/validation/tokenized/tiny_simpo_validation/pairs"] == 250
    stats = json.loads((Path(checkpoint.checkpoint_dir) / "pair_stats.json").read_text())
    assert stats["train/tokenized/tiny_simpo_train"]["dropped"]["special_token_text"] == 2
    assert (summary["simpo/beta"], summary["simpo/gamma"]) == (2.0, 1.0)
    assert 0.0 <= summary["eval/rewards/accuracies"] <= 1.0

    recorded = checkpoint.record.config["train_config"]
    assert recorded["trainer"]["tracker"]["tags"] == ["dpo"]
    assert recorded["data"]["tokenizer"] == str(TINY_DATA / "tokenizer")
    assert recorded["data"]["components"]["tokenized/tiny_simpo_train"]["cache_dir"] == train.path(str(local_run))

    # with the caches built, an epoch count resolves to steps from the train cache's pair count
    by_epoch = dataclasses.replace(config, num_train_steps=None, num_train_epochs=1)
    epoch_step = default_simpo(
        "checkpoints/tiny_simpo_epoch", train, tiny_gpt2, by_epoch, validation=[validation], version=VERSION
    )
    resolved = materialized_config(epoch_step, str(local_run)).train_config
    assert resolved.trainer.num_train_steps == math.ceil(2504 / 32)
