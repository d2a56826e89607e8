# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0
"""``default_simpo``'s conventions, checked on the config it records, without running anything."""

import pytest
from fray.types import ResourceConfig
from levanter.models.gpt2 import Gpt2Config

from experiments.defaults import default_preference_tokenize, default_simpo
from experiments.simple_simpo_config import SimpleSimPOConfig
from marin.execution.lazy import StepContext

VERSION = "2026.01.24"


def _tokenized(split: str):
    return default_preference_tokenize(
        f"tokenized/pairs_{split}", tokenizer="gpt2", paths=[f"/data/{split}.jsonl"], version=VERSION
    )


def _simpo(tags=(), **config_overrides):
    config = SimpleSimPOConfig(resources=ResourceConfig.with_cpu(), num_train_steps=10, **config_overrides)
    return default_simpo("checkpoints/simpo_test", _tokenized("train"), Gpt2Config(), config, tags=tags, version=VERSION)


def _train_config(step):
    return step.build_config(StepContext.for_fingerprint(step.runtime_args.keys(), step.deps)).train_config


def test_runs_are_tagged_dpo_and_never_simpo():
    assert _train_config(_simpo()).trainer.tracker.tags == ["dpo"]
    assert _train_config(_simpo(tags=["ultrafeedback", "dpo"])).trainer.tracker.tags == ["ultrafeedback", "dpo"]
    for tag in ("simpo", "SimPO"):
        with pytest.raises(ValueError, match="not 'simpo'"):
            _simpo(tags=[tag])


def test_hf_initialisation_follows_model_name_or_path():
    assert _train_config(_simpo()).initialize_from_hf is False
    assert _train_config(_simpo(model_name_or_path="org/sft")).initialize_from_hf == "org/sft"
    from_checkpoint = _train_config(_simpo(model_name_or_path="org/sft", initialize_from_checkpoint_path="/ckpt"))
    assert from_checkpoint.initialize_from_hf is False
    assert from_checkpoint.initialize_from_checkpoint_path == "/ckpt"
    with pytest.raises(ValueError, match="model_name_or_path"):
        _simpo(initialize_from_hf=True)


def test_trainer_uses_marin_precision_checkpointing_and_a_run_id_per_step():
    trainer = _train_config(_simpo(steps_per_checkpoint=250)).trainer
    assert trainer.id == f"checkpoints-simpo_test-{VERSION}"
    assert trainer.checkpointer.save_interval.total_seconds() == 600
    assert trainer.checkpointer.keep == [{"every": 250}]
    assert trainer.allow_nondivisible_batch_size is True
    assert trainer.mesh.compute_mapping["token"] == ["replica_dcn", "replica", "data"]


def test_validation_caches_need_the_split_fraction_off():
    config = SimpleSimPOConfig(resources=ResourceConfig.with_cpu(), num_train_steps=10)
    with pytest.raises(ValueError, match="validation_split_fraction=None"):
        default_simpo(
            "checkpoints/x", _tokenized("train"), Gpt2Config(), config, validation=[_tokenized("test")], version=VERSION
        )


def test_training_length_is_steps_or_epochs_not_both():
    resources = ResourceConfig.with_cpu()
    for lengths in ({}, {"num_train_steps": 10, "num_train_epochs": 1}):
        with pytest.raises(ValueError, match="exactly one"):
            SimpleSimPOConfig(resources=resources, **lengths)
