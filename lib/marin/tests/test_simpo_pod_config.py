# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0
"""What ``run_levanter_train_simpo`` hands to ``levanter.main.train_simpo.main`` for a pod config."""

import pytest
from fray.types import ResourceConfig

from levanter.adaptor import LoraAdaptorConfig
from levanter.main.train_simpo import TrainSimpoConfig
from levanter.trainer import TrainerConfig
from marin.training.simpo import TrainSimpoOnPodConfig, simpo_train_config_for_pod


@pytest.fixture(autouse=True)
def local_marin_prefix(tmp_path, monkeypatch):
    # temporary checkpoints live under the Marin prefix; keep it on local disk
    monkeypatch.setenv("MARIN_PREFIX", str(tmp_path / "marin"))
    monkeypatch.delenv("RUN_ID", raising=False)


def _pod(train_config=None, **kwargs) -> TrainSimpoOnPodConfig:
    return TrainSimpoOnPodConfig(
        train_config=train_config or TrainSimpoConfig(), resources=ResourceConfig.with_cpu(), **kwargs
    )


def test_output_path_places_checkpoints_and_hf_export_and_names_the_run(tmp_path):
    output = str(tmp_path / "checkpoints" / "my-run")
    config = simpo_train_config_for_pod(_pod(output_path=output))

    assert config.trainer.checkpointer.base_path == f"{output}/checkpoints"
    assert config.trainer.checkpointer.append_run_id_to_base_path is False
    assert f"{output}/checkpoints" in config.trainer.load_checkpoint_path
    assert config.hf_save_path == f"{output}/hf"
    assert config.trainer.id == "my-run"


def test_run_id_precedence_is_trainer_id_then_run_id_env_then_output_dir(tmp_path, monkeypatch):
    output = str(tmp_path / "run-from-path")
    named = TrainSimpoConfig(trainer=TrainerConfig(id="explicit"))
    assert simpo_train_config_for_pod(_pod(named, output_path=output, env_vars={"RUN_ID": "env"})).trainer.id == (
        "explicit"
    )
    assert simpo_train_config_for_pod(_pod(output_path=output, env_vars={"RUN_ID": "env"})).trainer.id == "env"
    monkeypatch.setenv("RUN_ID", "process-env")
    assert simpo_train_config_for_pod(_pod(output_path=output)).trainer.id == "process-env"


def test_cpu_pod_drops_the_accelerator_requirement_and_sets_cache_building():
    assert TrainSimpoConfig().data.auto_build_caches is True
    config = simpo_train_config_for_pod(_pod())
    assert config.trainer.require_accelerator is False
    assert config.data.auto_build_caches is False
    assert simpo_train_config_for_pod(_pod(auto_build_caches=True)).data.auto_build_caches is True


def test_lora_run_exports_peft_weights_where_full_runs_export_hf(tmp_path):
    output = str(tmp_path / "lora-run")
    config = simpo_train_config_for_pod(_pod(TrainSimpoConfig(adapter=LoraAdaptorConfig()), output_path=output))
    # Levanter rejects hf_save_path for a LoRA adapter; the export location moves to peft_save_path
    assert config.hf_save_path is None
    assert config.peft_save_path == f"{output}/hf"
