# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""SimPO runs are tagged ``dpo`` on every W&B tracker and a ``simpo`` tag is refused by the field that sets it:
configs parsed from YAML as a user writes them, no model."""

import io
import re

import draccus
import pytest

from levanter.main.train_simpo import TrainSimpoConfig, validate_config
from levanter.simpo.run.tags import tag_preference_run
from levanter.tracker.json_logger import JsonLoggerConfig
from levanter.tracker.wandb import WandbConfig
from levanter.trainer import TrainerConfig


def _load(trainer_yaml: str) -> TrainSimpoConfig:
    return draccus.load(TrainSimpoConfig, io.StringIO("trainer:\n" + trainer_yaml))


def test_a_single_wandb_tracker_gets_the_dpo_tag_after_its_own():
    config = _load("  tracker:\n    type: wandb\n    project: p\n    tags: [ultrafeedback]\n")
    tagged = tag_preference_run(config.trainer)
    assert tagged.tracker.tags == ["ultrafeedback", "dpo"]
    assert tagged.tracker.project == "p"
    assert config.trainer.tracker.tags == ["ultrafeedback"], "the config given is not changed"


def test_levanters_default_tracker_is_wandb_and_is_tagged():
    assert tag_preference_run(TrainerConfig()).tracker == WandbConfig(tags=["dpo"])


def test_every_wandb_tracker_of_several_is_tagged_once_and_other_trackers_are_left_alone():
    config = _load(
        "  tracker:\n"
        "    - type: json_logger\n"
        "    - type: wandb\n"
        "      tags: [dpo, llama3]\n"
        "    - type: wandb\n"
        "      project: second\n"
    )
    tracker = tag_preference_run(config.trainer).tracker
    assert isinstance(tracker, tuple) and len(tracker) == 3
    assert isinstance(tracker[0], JsonLoggerConfig) and tracker[0] == config.trainer.tracker[0]
    assert tracker[1].tags == ["dpo", "llama3"]
    assert (tracker[2].project, tracker[2].tags) == ("second", ["dpo"])


def test_trackers_without_tags_are_unchanged():
    trainer = TrainerConfig(tracker=(JsonLoggerConfig(),))
    assert tag_preference_run(trainer) == trainer


@pytest.mark.parametrize(
    "trainer_yaml, field",
    [
        ("  tracker:\n    type: wandb\n    tags: [dpo, simpo]\n", "trainer.tracker.tags"),
        (
            "  tracker:\n    - type: json_logger\n    - type: wandb\n      tags: [SimPO]\n",
            "trainer.tracker[1].tags",
        ),
    ],
)
def test_a_simpo_tag_is_refused_naming_the_field(trainer_yaml, field):
    config = _load(trainer_yaml)
    with pytest.raises(ValueError, match="^" + re.escape(field) + " has '(simpo|SimPO)'"):
        validate_config(config)
    with pytest.raises(ValueError, match="not 'simpo'"):
        tag_preference_run(config.trainer)
