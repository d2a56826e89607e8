# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0
"""``default_simpo``'s conventions, checked on the config it records, without running anything."""

import dataclasses

import pytest
from fray.types import ResourceConfig

from experiments.defaults import default_preference_tokenize, default_simpo
from experiments.simple_simpo_config import SimpleSimPOConfig
from levanter.main.train_simpo import reference_optimizer
from levanter.models.gpt2 import Gpt2Config
from marin.execution.lazy import StepContext

VERSION = "2026.01.24"


def _tokenized(split: str):
    return default_preference_tokenize(
        f"tokenized/pairs_{split}", tokenizer="gpt2", paths=[f"/data/{split}.jsonl"], version=VERSION
    )


def _simpo(tags=(), **config_overrides):
    config_overrides.setdefault("max_seq_len", Gpt2Config().max_seq_len)
    config = SimpleSimPOConfig(resources=ResourceConfig.with_cpu(), num_train_steps=10, **config_overrides)
    return default_simpo(
        "checkpoints/simpo_test", _tokenized("train"), Gpt2Config(), config, tags=tags, version=VERSION
    )


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


def test_microbatches_are_asked_in_rows_a_device():
    assert _train_config(_simpo()).trainer.per_device_parallelism == -1  # a step's rows at once
    trainer = _train_config(_simpo(per_device_parallelism=2)).trainer
    assert trainer.per_device_parallelism == 2 and trainer.train_batch_size == 128


def test_validation_caches_need_the_split_fraction_off():
    config = SimpleSimPOConfig(resources=ResourceConfig.with_cpu(), num_train_steps=10)
    with pytest.raises(ValueError, match="validation_split_fraction=None"):
        default_simpo(
            "checkpoints/x",
            _tokenized("train"),
            Gpt2Config(),
            config,
            validation=[_tokenized("test")],
            version=VERSION,
        )


def test_training_length_is_steps_or_epochs_not_both():
    resources = ResourceConfig.with_cpu()
    for lengths in ({}, {"num_train_steps": 10, "num_train_epochs": 1}):
        with pytest.raises(ValueError, match="exactly one"):
            SimpleSimPOConfig(resources=resources, **lengths)


def test_wandb_name_and_group_default_to_the_run_id_and_none():
    tracker = _train_config(_simpo()).trainer.tracker
    assert (tracker.name, tracker.group) == (f"checkpoints-simpo_test-{VERSION}", None)
    tracker = _train_config(_simpo(wandb_name="simpo-uf", wandb_group="uf-sweep")).trainer.tracker
    assert (tracker.name, tracker.group) == ("simpo-uf", "uf-sweep")


def test_lora_trains_adapters_and_exports_peft_weights():
    from levanter.adaptor import LoraAdaptorConfig, NoAdaptorConfig
    from marin.training.simpo import simpo_train_config_for_pod

    assert isinstance(_train_config(_simpo()).adapter, NoAdaptorConfig)
    step = _simpo(lora=LoraAdaptorConfig(r=8, alpha=16.0))
    pod = step.build_config(StepContext.for_fingerprint(step.runtime_args.keys(), step.deps))
    assert pod.train_config.adapter == LoraAdaptorConfig(r=8, alpha=16.0)
    launched = simpo_train_config_for_pod(
        dataclasses.replace(pod, resources=ResourceConfig.with_cpu(), output_path="/tmp/out/simpo_lora")
    )
    assert (launched.hf_save_path, launched.peft_save_path) == (None, "/tmp/out/simpo_lora/hf")


def test_sequence_lengths_are_checked_when_the_graph_is_built():
    with pytest.raises(ValueError, match="max_seq_len 2048 is longer than the model's max_seq_len 1024"):
        _simpo(max_seq_len=2048)  # GPT-2's default is 1024
    with pytest.raises(ValueError, match="max_prompt_length"):
        _simpo(max_seq_len=512, max_prompt_length=512)


def test_the_run_carries_the_reference_adam_and_pair_budgets():
    config = _train_config(_simpo(max_seq_len=512, max_prompt_length=400, truncation_mode="keep_start"))
    assert (config.optimizer.beta1, config.optimizer.beta2, config.optimizer.epsilon) == (0.9, 0.999, 1e-8)
    # the Marin door's defaults and the Levanter entrypoint's are one recipe
    assert config.optimizer == reference_optimizer()
    (component,) = config.data.components.values()
    fmt = component.format
    assert (fmt.completion_tokens, fmt.max_length, fmt.max_prompt_length, fmt.truncation_mode) == (
        "final_turn",
        512,
        400,
        "keep_start",
    )
    assert config.run_initial_eval is True


def test_a_preference_chat_cache_is_refused_by_name():
    from experiments import defaults
    from levanter.data.text.datasets import DatasetComponent, UrlDatasetSourceConfig
    from levanter.data.text.preference import PreferenceChatLmDatasetFormat

    old = PreferenceChatLmDatasetFormat()
    source = UrlDatasetSourceConfig(tags=[], train_urls=[], validation_urls=[], cache_dir="/c", format=old)
    component = DatasetComponent(source=source, cache_dir="/c", format=old, tags=[])
    config = SimpleSimPOConfig(resources=ResourceConfig.with_cpu(), num_train_steps=10)
    with pytest.raises(ValueError, match="'tokenized/old' is a PreferenceChatLmDatasetFormat cache"):
        defaults._with_training_format("tokenized/old", component, config)


def test_a_weighted_mixture_of_preference_caches():
    config = SimpleSimPOConfig(
        resources=ResourceConfig.with_cpu(), num_train_steps=10, max_seq_len=Gpt2Config().max_seq_len
    )
    first, second = _tokenized("train"), _tokenized("more_train")
    step = default_simpo("checkpoints/simpo_mix", {first: 0.75, second: 0.25}, Gpt2Config(), config, version=VERSION)
    data = _train_config(step).data
    assert data.train_weights == {first.name: 0.75, second.name: 0.25}
    assert set(data.components) == {first.name, second.name}
    assert set(step.deps) >= {first, second}
    by_epoch = dataclasses.replace(config, num_train_steps=None, num_train_epochs=1)
    with pytest.raises(ValueError, match="a mixture of preference caches trains for num_train_steps"):
        default_simpo("checkpoints/simpo_mix", {first: 0.75, second: 0.25}, Gpt2Config(), by_epoch, version=VERSION)
