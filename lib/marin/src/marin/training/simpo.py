# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0

"""Launching SimPO (``levanter.main.train_simpo``) from Marin.

The SimPO counterpart of :func:`marin.training.training.run_levanter_train_dpo`: the same run-scoped
paths, run id, environment and path checks, for a single-model, reference-free train config. The
shared pieces come from :mod:`marin.training.training`'s public helpers; the steps that module keeps
private are restated here for :class:`~levanter.main.train_simpo.TrainSimpoConfig`.
"""

import dataclasses
import logging
import os
from dataclasses import dataclass

from fray.types import CpuConfig, ResourceConfig

from levanter.adaptor import NoAdaptorConfig
from levanter.infra.cli_helpers import default_run_id
from levanter.main import train_simpo
from levanter.main.train_simpo import TrainSimpoConfig
from marin.training.training import apply_output_path, check_train_config_paths, resolve_training_env

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSimpoOnPodConfig:
    """A SimPO training run and where it runs."""

    train_config: TrainSimpoConfig
    resources: ResourceConfig
    output_path: str | None = None
    """Base output directory for the run. The checkpointer, HF export, and run id derive from it."""
    env_vars: dict[str, str] | None = None
    """Environment variables for the training process (e.g. WANDB_MODE, WANDB_API_KEY, RUN_ID)."""
    auto_build_caches: bool = False
    """Whether Levanter may tokenize missing preference caches during training.

    Off by default, as for Marin's LM and DPO runs: a missing cache should fail the launch, not spend
    accelerator time on tokenization.
    """


def _with_output_path(train_config: TrainSimpoConfig, output_path: str) -> TrainSimpoConfig:
    config = apply_output_path(train_config, output_path)
    if isinstance(config.adapter, NoAdaptorConfig):
        return config
    # A LoRA run exports PEFT weights, and Levanter rejects hf_save_path for it. Marin's helper makes this
    # swap only for the LM and DPO configs it knows, so SimPO makes it here.
    peft_save_path = config.peft_save_path
    if peft_save_path is None and config.hf_save_steps is not None:
        peft_save_path = config.hf_save_path
    return dataclasses.replace(config, hf_save_path=None, peft_save_path=peft_save_path)


def _with_run_id(train_config: TrainSimpoConfig, output_path: str | None, env_run_id: str | None) -> TrainSimpoConfig:
    # A stable id lets a preempted run resume into the same tracker run and checkpoints; same precedence as
    # Marin's LM/DPO runs: explicit trainer.id, then RUN_ID (config env, then process env), then the output
    # directory's name, and only then a random id.
    run_id = train_config.trainer.id or env_run_id or os.environ.get("RUN_ID")
    if run_id is None and output_path is not None:
        run_id = os.path.basename(output_path.rstrip("/"))
    if not run_id:
        run_id = default_run_id()
        logger.warning("Run ID not set. Using default: %s", run_id)
    return dataclasses.replace(train_config, trainer=dataclasses.replace(train_config.trainer, id=run_id))


def simpo_train_config_for_pod(config: TrainSimpoOnPodConfig) -> TrainSimpoConfig:
    """The train config ``levanter.main.train_simpo.main`` receives for this pod config."""
    train_config = config.train_config
    if config.output_path is not None:
        logger.info("Using output path: %s", config.output_path)
        train_config = _with_output_path(train_config, config.output_path)
    train_config = _with_run_id(train_config, config.output_path, (config.env_vars or {}).get("RUN_ID"))
    logger.info("Using run ID: %s", train_config.trainer.id)

    if train_config.data.auto_build_caches != config.auto_build_caches:
        data = dataclasses.replace(train_config.data, auto_build_caches=config.auto_build_caches)
        train_config = dataclasses.replace(train_config, data=data)

    if isinstance(config.resources.device, CpuConfig):
        # a CPU pod has no accelerator to require; region checks only matter where one is used
        trainer = dataclasses.replace(train_config.trainer, require_accelerator=False)
        train_config = dataclasses.replace(train_config, trainer=trainer)
    else:
        check_train_config_paths(train_config, config.resources)
    return train_config


def run_levanter_train_simpo(config: TrainSimpoOnPodConfig) -> None:
    """Run Levanter's SimPO training main in the current process.

    Reads WANDB_API_KEY, RUN_ID and GIT_COMMIT from the process or ``config.env_vars`` as the LM and DPO
    runs do; variables already set in the process (e.g. by the cluster) win over the config's.
    """
    train_config = simpo_train_config_for_pod(config)
    for key, value in resolve_training_env(config.env_vars, config.resources).items():
        os.environ.setdefault(key, value)
    train_simpo.main(train_config)
