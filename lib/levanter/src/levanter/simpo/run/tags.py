# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The run tag convention: SimPO runs are tagged ``dpo``, never ``simpo``, on every W&B tracker, because dashboards
and sweeps select preference-optimisation runs by the ``dpo`` tag. Marin's ``default_simpo`` follows the same rule."""

import dataclasses

from levanter.tracker import TrackerConfig
from levanter.tracker.wandb import WandbConfig
from levanter.trainer import TrainerConfig

PREFERENCE_RUN_TAG = "dpo"
FORBIDDEN_RUN_TAG = "simpo"


def _tracker_fields(tracker: TrackerConfig | tuple[TrackerConfig, ...] | list[TrackerConfig]):
    """Each tracker config with the config field that names it."""
    if isinstance(tracker, (tuple, list)):
        return [(f"trainer.tracker[{i}]", t) for i, t in enumerate(tracker)]
    return [("trainer.tracker", tracker)]


def check_run_tags(trainer: TrainerConfig) -> None:
    """Refuses a ``simpo`` tag (in any case) on a W&B tracker, naming the field that sets it."""
    for name, tracker in _tracker_fields(trainer.tracker):
        if not isinstance(tracker, WandbConfig):
            continue
        for tag in tracker.tags:
            if tag.lower() == FORBIDDEN_RUN_TAG:
                raise ValueError(
                    f"{name}.tags has {tag!r}: tag SimPO runs {PREFERENCE_RUN_TAG!r}, not {FORBIDDEN_RUN_TAG!r} "
                    f"(dashboards and sweeps select preference runs by the {PREFERENCE_RUN_TAG!r} tag)"
                )


def tag_preference_run(trainer: TrainerConfig) -> TrainerConfig:
    """``trainer`` with ``dpo`` added to every W&B tracker's tags that lacks it; other trackers are kept as they
    are. The config given is not changed. Raises as :func:`check_run_tags` does."""
    check_run_tags(trainer)

    def tagged(tracker: TrackerConfig) -> TrackerConfig:
        if isinstance(tracker, WandbConfig) and PREFERENCE_RUN_TAG not in tracker.tags:
            return dataclasses.replace(tracker, tags=[*tracker.tags, PREFERENCE_RUN_TAG])
        return tracker

    tracker = trainer.tracker
    if isinstance(tracker, (tuple, list)):
        return dataclasses.replace(trainer, tracker=type(tracker)(tagged(t) for t in tracker))
    return dataclasses.replace(trainer, tracker=tagged(tracker))
