# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Stops a SimPO run whose loss leaves its recent range by a large factor, before the diverged model is exported.

A learning rate that is far too high makes the loss explode while it stays finite (1.3 -> 6.7e5 -> 2.5e7 on the
tiny model at 1e3), which the non-finite guard never sees. ``DivergenceGuard`` compares each step's training loss
with the largest loss of the last ``window`` steps, floored at ``floor``, and stops the run with the step, the
factor and the newest checkpoint saved before the divergence. Installed before the HF export hooks, it stops the
step before they run, and the final export never happens. The loss of step ``s`` is computed from the parameters
step ``s - 1`` produced, so the checkpoints of steps ``s - 1`` and later hold diverged parameters.
"""

import collections
import dataclasses
import logging
import math

from levanter.callbacks import Callback, StepInfo
from levanter.checkpoint import discover_checkpoint_candidates
from levanter.simpo.run.hosts import agreed

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DivergenceConfig:
    """When a SimPO run counts as diverged. The defaults are far from anything a healthy run reaches
    (docs/lifecycle.md, "Divergence"): the tiny default's 300 steps never exceed 1.04 times the largest of their
    previous 50 losses."""

    enabled: bool = True
    """Stop the run when the loss diverges; false trains on whatever the loss does."""
    factor: float = 100.0
    """The loss diverged when it exceeds this many times the largest recent loss (or ``floor``, if larger)."""
    window: int = 50
    """How many preceding steps make the recent range."""
    floor: float = 1.0
    """The smallest recent range: a loss near 0 (hinge, or a converged sigmoid loss) times ``factor`` would flag
    ordinary noise. The SimPO loss at chance is softplus(beta * gamma_beta_ratio), 1.31 for the defaults."""

    def validate(self):
        if not (math.isfinite(self.factor) and self.factor > 1):
            raise ValueError(f"divergence.factor must be a finite number above 1, got {self.factor}")
        if self.window < 1:
            raise ValueError(f"divergence.window must be at least 1, got {self.window}")
        if not (math.isfinite(self.floor) and self.floor > 0):
            raise ValueError(f"divergence.floor must be a positive finite number, got {self.floor}")


class DivergedTrainingError(RuntimeError):
    """The training loss left its recent range by more than the configured factor."""

    def __init__(self, message: str, *, step: int, factor: float, last_healthy_checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.factor = factor
        self.last_healthy_checkpoint = last_healthy_checkpoint


class DivergenceGuard(Callback):
    """Install with ``trainer.add_hook(guard, every=1)`` before the export hooks; ``checkpoint_roots`` are where
    the run's checkpoints are saved. ``on_diverged(step)`` runs before the error is raised (to mark checkpoints)."""

    def __init__(self, config: DivergenceConfig, checkpoint_roots: list[str], on_diverged=None):
        self._config = config
        self._roots = checkpoint_roots
        self._recent: collections.deque[float] = collections.deque(maxlen=config.window)
        self._last_step: int | None = None
        self._on_diverged = on_diverged

    def on_step(self, info: StepInfo, force: bool = False):
        # the trainer runs hooks once more with force=True after the last step, with the same loss
        if info.step == self._last_step:
            return
        self._last_step = info.step
        loss = float(info.loss)
        if self._recent and math.isfinite(loss):
            scale = max(max(self._recent), self._config.floor)
            if loss > self._config.factor * scale:
                raise self._report(info.step, loss, loss / scale, max(self._recent))
        self._recent.append(loss)

    def _report(self, step: int, loss: float, factor: float, recent_max: float) -> DivergedTrainingError:
        # parameters saved at step - 1 produced this loss; everything from there on is diverged
        def last_healthy_checkpoint() -> str | None:
            healthy = discover_checkpoint_candidates(*self._roots, max_step=step - 2) if self._roots else []
            if self._on_diverged is not None:
                self._on_diverged(step)
            return healthy[-1].path if healthy else None

        # every process computed the same loss and stops here; process 0 reads storage once for all of them
        last_healthy = agreed("the last healthy checkpoint", last_healthy_checkpoint)
        message = (
            f"SimPO training step {step}: the loss diverged: {loss:.6g} is {factor:.3g} times the largest of the last "
            f"{len(self._recent)} losses ({recent_max:.6g}, floor {self._config.floor:g}), above divergence.factor="
            f"{self._config.factor:g}. Training stopped and the model was not exported. Checkpoints from "
            f"step-{step - 1} on hold diverged parameters; "
            + (
                f"the last healthy checkpoint is {last_healthy}."
                if last_healthy
                else "no healthy checkpoint was saved before the divergence."
            )
            + " Lower the learning rate, or set divergence.enabled=false to train on regardless."
        )
        logger.error(message)
        return DivergedTrainingError(message, step=step, factor=factor, last_healthy_checkpoint=last_healthy)
