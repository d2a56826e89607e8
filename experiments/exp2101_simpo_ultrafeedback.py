# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0

"""SimPO on UltraFeedback from the Llama-3-Base-8B SFT model, with the SimPO paper's Llama-3-Base settings.

The recipe (loss, data format and budgets, optimizer, schedule, batch, sequence length, initial checkpoint) is
read from ``lib/levanter/config/simpo_ultrafeedback_llama3_8b.yaml``, the Levanter entrypoint's config, so the
two doors train the same SimPO; this file adds only what a Marin run decides: the step graph, the epoch count
resolved from the tokenized cache, resources, checkpoint and export cadence.

    uv run python -m experiments.exp2101_simpo_ultrafeedback --version dev          # print the plan
    uv run python -m experiments.exp2101_simpo_ultrafeedback --version dev --run    # build it

``uv run python experiments/exp2101_simpo_ultrafeedback.py ...`` works the same.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # run as a file, Python puts experiments/ on the path rather than the repository root that `-m` uses
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import draccus
from fray.types import ResourceConfig

from experiments.defaults import default_preference_tokenize, default_simpo
from experiments.simple_simpo_config import SimpleSimPOConfig
from levanter.data.simpo.prompt_completion import PromptCompletionPreferenceFormat
from levanter.data.simpo.splits import component_format
from levanter.main.train_simpo import TrainSimpoConfig
from levanter.tracker.wandb import WandbConfig
from marin.execution.lazy import ArtifactStep
from marin.experiment.cli import experiment_main
from marin.experiment.data import hf_download
from marin.training.training import LevanterCheckpoint

RECIPE_PATH = Path(__file__).resolve().parents[1] / "lib/levanter/config/simpo_ultrafeedback_llama3_8b.yaml"


def load_recipe() -> TrainSimpoConfig:
    with open(RECIPE_PATH) as f:
        return draccus.load(TrainSimpoConfig, f)


def _sft_model(config: TrainSimpoConfig) -> str:
    """The SFT checkpoint the recipe starts from, whose id also names the tokenizer."""
    if not isinstance(config.initialize_from_hf, str):
        raise ValueError(f"{RECIPE_PATH} names no SFT checkpoint in initialize_from_hf: {config.initialize_from_hf!r}")
    return config.initialize_from_hf


def _recipe_tags(config: TrainSimpoConfig) -> list[str]:
    tracker = config.trainer.tracker
    if not isinstance(tracker, WandbConfig):
        raise ValueError(f"{RECIPE_PATH}: exp2101 takes its run tags from one wandb tracker, got {tracker!r}")
    return tracker.tags


recipe = load_recipe()
(recipe_format,) = (component_format(name, component) for name, component in recipe.data.components.items())
if not isinstance(recipe_format, PromptCompletionPreferenceFormat):
    raise ValueError(f"{RECIPE_PATH}: the recipe's data format is {type(recipe_format).__name__}, not a SimPO one")
SFT_MODEL = _sft_model(recipe)
LLAMA3_CHAT_TEMPLATE = recipe_format.chat_template

simpo_config = SimpleSimPOConfig.from_train_config(
    recipe,
    resources=ResourceConfig.with_tpu("v5p-32"),
    # the YAML's step count is one epoch of today's train_prefs; an epoch here follows the cache actually built
    num_train_epochs=1,
    steps_per_checkpoint=200,
    steps_per_hf_export=200,
)

# Dataset artifacts pin a calendar version so reruns reuse the caches.
DATA_VERSION = "2026.01.24"
# No Hub access where this was written, so no commit hash could be looked up: "main" is a moving revision.
# Pin the commit (huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized/commits/main) before a run
# whose results must be reproducible; the tokenized caches are keyed by DATA_VERSION, not by this revision.
ULTRAFEEDBACK_REVISION = "main"


def build() -> ArtifactStep[LevanterCheckpoint]:
    """The step graph: download -> tokenize (train_prefs, test_prefs) -> SimPO."""
    ultrafeedback = hf_download(
        "raw/ultrafeedback_binarized",
        hf_id="HuggingFaceH4/ultrafeedback_binarized",
        revision=ULTRAFEEDBACK_REVISION,
        urls_glob=["data/train_prefs-*.parquet", "data/test_prefs-*.parquet"],
        version=DATA_VERSION,
    )
    train_prefs, test_prefs = (
        default_preference_tokenize(
            f"tokenized/ultrafeedback_binarized_{split}_llama3",
            tokenizer=SFT_MODEL,
            raw=ultrafeedback,
            glob=f"data/{split}-*.parquet",
            validation=split == "test_prefs",
            chat_template=LLAMA3_CHAT_TEMPLATE,
            pairs=simpo_config,
            version=DATA_VERSION,
        )
        for split in ("train_prefs", "test_prefs")
    )
    return default_simpo(
        "checkpoints/simpo/ultrafeedback_llama3_8b_base",
        train_prefs,
        recipe.model,
        simpo_config,
        validation=[test_prefs],
        tags=_recipe_tags(recipe),
    )


if __name__ == "__main__":
    experiment_main(build)()
