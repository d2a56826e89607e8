# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0
"""The UltraFeedback SimPO experiment builds its step graph offline and carries the Llama-3-Base presets."""

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import draccus
import jmp
import pytest

from experiments import exp2101_simpo_ultrafeedback as exp
from levanter.data.simpo.prompt_completion import PromptCompletionPreferenceFormat
from levanter.main.train_simpo import TrainSimpoConfig
from marin.execution.build_context import BuildContext, VersionCodex, build_context
from marin.execution.lazy import ArtifactStep, StepContext
from marin.training.simpo import TrainSimpoOnPodConfig

VERSION = "2026.01.24"


def _fingerprint_config(step: ArtifactStep):
    """The config a step records as its identity: built with no data, no run and no network."""
    return step.build_config(StepContext.for_fingerprint(step.runtime_args.keys(), step.deps))


@pytest.fixture
def simpo_step(monkeypatch) -> ArtifactStep:
    def refuse(*args, **kwargs):
        raise AssertionError(f"building the step graph opened a network connection to {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    with build_context(BuildContext(versions=VersionCodex(default=VERSION))):
        step = exp.build()
    step.fingerprint()  # renders every config in the graph's identity
    return step


def test_graph_downloads_then_tokenizes_both_splits_with_the_llama3_template(simpo_step):
    train_prefs, test_prefs = simpo_step.deps
    (download,) = train_prefs.deps
    assert test_prefs.deps == (download,)
    assert _fingerprint_config(download).hf_dataset_id == "HuggingFaceH4/ultrafeedback_binarized"

    train_tokenize, test_tokenize = _fingerprint_config(train_prefs), _fingerprint_config(test_prefs)
    assert train_tokenize.train_paths == [f"{download.name}@{download.version}/data/train_prefs-*.parquet"]
    assert train_tokenize.validation_paths == []
    assert test_tokenize.train_paths == []
    assert test_tokenize.validation_paths == [f"{download.name}@{download.version}/data/test_prefs-*.parquet"]
    for config in (train_tokenize, test_tokenize):
        assert config.tokenizer == exp.SFT_MODEL
        assert isinstance(config.format, PromptCompletionPreferenceFormat)
        assert config.format.chat_template == exp.LLAMA3_CHAT_TEMPLATE
        assert "<|eot_id|>{% endgeneration %}" in config.format.chat_template


def test_train_config_round_trips_through_draccus_with_the_presets(simpo_step):
    pod = _fingerprint_config(simpo_step)
    assert isinstance(pod, TrainSimpoOnPodConfig)
    assert pod.resources == "<train_resources>"  # where it runs is not part of the checkpoint's identity
    assert simpo_step.runtime_args["train_resources"].device.variant == "v5p-32"

    # encode -> JSON text -> decode, as a recorded or hand-edited config would travel
    encoded = json.loads(json.dumps(draccus.encode(pod.train_config)))
    config = draccus.decode(TrainSimpoConfig, encoded)
    # Levanter's own default trainer.jax_config ({name: True}) decodes its bools as "True" (draccus tries str first
    # in JsonAtom), with or without SimPO; everything else must come back unchanged
    assert config.trainer.jax_config == {k: str(v) for k, v in pod.train_config.trainer.jax_config.items()}
    config = dataclasses.replace(
        config, trainer=dataclasses.replace(config.trainer, jax_config=pod.train_config.trainer.jax_config)
    )
    assert config == pod.train_config

    assert (config.beta, config.gamma_beta_ratio, config.loss_type) == (2.0, 0.5, "sigmoid")
    assert (config.label_smoothing, config.sft_weight) == (0.0, 0.0)
    assert config.optimizer.learning_rate == 6e-7
    assert (config.optimizer.warmup, config.optimizer.lr_schedule, config.optimizer.min_lr_ratio) == (0.1, "cosine", 0)
    assert config.trainer.train_batch_size == 128
    assert config.train_seq_len == config.model.max_seq_len == 2048
    assert config.initialize_from_hf == exp.SFT_MODEL
    assert config.validation_split_fraction is None
    assert config.trainer.mp == jmp.get_policy("p=f32,c=bfloat16")

    tags = config.trainer.tracker.tags
    assert "dpo" in tags
    assert not any("simpo" in tag.lower() for tag in tags)

    data = config.data
    train_prefs, test_prefs = simpo_step.deps
    assert data.train_weights == {train_prefs.name: 1.0, test_prefs.name: 0.0}
    assert (data.shuffle, data.permutation_type) == (True, "feistel")


@pytest.mark.parametrize(
    "invocation",
    [["experiments/exp2101_simpo_ultrafeedback.py"], ["-m", "experiments.exp2101_simpo_ultrafeedback"]],
    ids=["file", "module"],
)
def test_the_experiment_runs_as_a_file_and_as_a_module(invocation):
    repo = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        [sys.executable, *invocation, "--help"], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--version TEXT" in result.stdout and "--run" in result.stdout
