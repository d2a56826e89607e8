# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Stops a SimPO run at the first non-finite loss or gradient and says which step and which pairs caused it.

Levanter's trainer already stops on a NaN or infinite loss (``crash_on_nan`` / ``crash_on_inf``) but says only
"Loss is NaN", and a non-finite gradient under a finite loss goes unnoticed until the parameters it produced make
a later step's loss NaN, which then blames the wrong batch. ``NonFiniteGuard`` checks the gradients inside the
compiled step (one ``isfinite`` reduction, no host transfer beyond a boolean) and names the step and the
positions of its pairs in the training stream, which the data loader reproduces for the same data seed.
"""

import contextlib
import logging
from typing import Iterable, Iterator, TypeVar

import jax
import jax.numpy as jnp

from levanter.callbacks import JitCallback, StepInfo
from levanter.schedule import BatchSchedule
from levanter.trainer_state import InsideJitInfo

logger = logging.getLogger(__name__)

X = TypeVar("X")

# the messages of levanter.trainer.Trainer.train_step's crash_on_nan / crash_on_inf checks
_LEVANTER_LOSS_ERRORS = {"Loss is NaN": "loss is NaN", "Loss is Inf": "loss is infinite"}


class NonFiniteTrainingError(RuntimeError):
    """A training step produced a non-finite loss or gradient."""

    def __init__(self, message: str, *, step: int, pairs: range):
        super().__init__(message)
        self.step = step
        self.pairs = pairs


def _all_finite(tree) -> jnp.ndarray:
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.array(True)


class NonFiniteGuard(JitCallback):
    """Install with ``trainer.add_hook(guard, every=1)``, feed the training iterator through ``track`` and run
    ``trainer.train`` inside ``reporting()``."""

    def __init__(self, batch_schedule: BatchSchedule):
        self._schedule = batch_schedule
        self._step: int | None = None

    def track(self, batches: Iterable[X], first_step: int) -> Iterator[X]:
        """Yields ``batches`` unchanged, remembering that the k-th one trains step ``first_step + k``."""
        for step, batch in enumerate(batches, start=first_step):
            self._step = step
            yield batch

    def pairs_of_step(self, step: int) -> range:
        start = self._schedule.global_data_offset_by_step(step)
        return range(start, start + self._schedule.batch_size_at_step(step))

    def report(self, what: str, step: int) -> NonFiniteTrainingError:
        """Logs and returns the error to raise for ``step``."""
        pairs = self.pairs_of_step(step)
        message = (
            f"SimPO training step {step}: {what}. The batch is pairs {pairs.start}..{pairs.stop - 1} of the training "
            "stream, in the order the data loader reads them (the same for the same data seed and batch schedule)."
        )
        logger.error(message)
        return NonFiniteTrainingError(message, step=step, pairs=pairs)

    def inside_step(self, state, inside_info: InsideJitInfo) -> jnp.ndarray:
        return _all_finite(inside_info.grads)

    def on_step(self, step_info: StepInfo, grads_finite: jnp.ndarray):
        if not bool(grads_finite):
            # by now Levanter's own hooks, the checkpointer included, have seen the parameters these gradients made
            step = step_info.step
            raise self.report(
                f"the gradients are not finite although the loss is {step_info.loss}; the parameters they updated are "
                f"not, so do not resume from a checkpoint step-{step} if one was written",
                step,
            )

    @contextlib.contextmanager
    def reporting(self):
        """Re-raises Levanter's non-finite loss errors with the step and its pairs."""
        try:
            yield
        except RuntimeError as e:
            what = _LEVANTER_LOSS_ERRORS.get(str(e))
            if what is None or self._step is None:
                raise
            raise self.report(what, self._step) from e
