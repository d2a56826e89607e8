# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Stops a SimPO run at the first non-finite loss or gradient and says which step and which rows caused it.

Levanter's trainer already stops on a NaN or infinite loss (``crash_on_nan`` / ``crash_on_inf``) but says only
"Loss is NaN", and a non-finite gradient under a finite loss goes unnoticed until the parameters it produced make
a later step's loss NaN, which then blames the wrong batch. ``NonFiniteGuard`` checks the gradients inside the
compiled step (one ``isfinite`` reduction, no host transfer beyond a boolean) and names the step and the
positions of its rows in the training stream (a row holds one pair, or several in packed layouts), which the data
loader reproduces for the same data seed.

A batch is blamed only when the parameters it met were sane: the guard also tracks, in the same compiled step,
whether the updated parameters are finite and their largest magnitude, and when those were already non-finite or
had grown ``PARAMETER_GROWTH``-fold since the run (re)started (a learning rate of 1e12 makes them ~1e12 at step 1
with a finite loss), it names the parameters as the cause instead.
"""

import contextlib
import logging
from typing import Iterable, Iterator, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp

from levanter.callbacks import JitCallback, StepInfo
from levanter.schedule import BatchSchedule
from levanter.trainer_state import InsideJitInfo

logger = logging.getLogger(__name__)

X = TypeVar("X")

# the messages of levanter.trainer.Trainer.train_step's crash_on_nan / crash_on_inf checks
_LEVANTER_LOSS_ERRORS = {"Loss is NaN": "loss is NaN", "Loss is Inf": "loss is infinite"}

PARAMETER_GROWTH = 1e3
"""Parameters whose largest magnitude grew this many times since the run (re)started are blamed over a batch;
healthy training moves it by a small factor."""


class NonFiniteTrainingError(RuntimeError):
    """A training step produced a non-finite loss or gradient."""

    def __init__(self, message: str, *, step: int, rows: range):
        super().__init__(message)
        self.step = step
        self.rows = rows


def _float_leaves(tree) -> list[jnp.ndarray]:
    return [leaf for leaf in jax.tree.leaves(tree) if eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.inexact)]


def _all_finite(tree) -> jnp.ndarray:
    leaves = _float_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.array(True)


def _largest_magnitude(tree) -> jnp.ndarray:
    leaves = _float_leaves(tree)
    return jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in leaves])) if leaves else jnp.array(0.0)


@eqx.filter_jit
def _parameter_health(model) -> tuple[jnp.ndarray, jnp.ndarray]:
    return _all_finite(model), _largest_magnitude(model)


class NonFiniteGuard(JitCallback):
    """Install with ``trainer.add_hook(guard, every=1)``, feed the training iterator through ``track`` and run
    ``trainer.train`` inside ``reporting()``."""

    def __init__(self, batch_schedule: BatchSchedule):
        self._schedule = batch_schedule
        self._step: int | None = None
        # (step whose parameters these are, all finite, largest magnitude), at start and after each step
        self._start: tuple[int, bool, float] | None = None
        self._latest: tuple[int, bool, float] | None = None

    def check_parameters(self, state) -> None:
        """Records the health of the parameters training starts from (call before ``trainer.train``)."""
        finite, largest = jax.device_get(_parameter_health(state.trainable_model))
        self._start = self._latest = (int(state.step), bool(finite), float(largest))

    def track(self, batches: Iterable[X], first_step: int) -> Iterator[X]:
        """Yields ``batches`` unchanged, remembering that the k-th one trains step ``first_step + k``."""
        for step, batch in enumerate(batches, start=first_step):
            self._step = step
            yield batch

    def rows_of_step(self, step: int) -> range:
        start = self._schedule.global_data_offset_by_step(step)
        return range(start, start + self._schedule.batch_size_at_step(step))

    def _parameter_report(self, step: int) -> tuple[bool, str]:
        """Whether the parameters step ``step`` started from are to blame, and what is known about them."""
        if self._latest is None or self._start is None or self._latest[0] != step:
            return False, ""
        _, finite, largest = self._latest
        if not finite:
            return True, "the parameters this step started from are already not finite"
        start_step, _, start_largest = self._start
        growth = largest / max(start_largest, 1e-6)
        if growth > PARAMETER_GROWTH:
            return True, (
                f"the parameters this step started from have grown to a largest magnitude of {largest:.3g}, "
                f"{growth:.3g} times their {start_largest:.3g} at step {start_step}"
            )
        return False, f" with finite parameters of ordinary size (largest magnitude {largest:.3g})"

    def report(self, what: str, step: int) -> NonFiniteTrainingError:
        """Logs and returns the error to raise for ``step``."""
        rows = self.rows_of_step(step)
        parameters_to_blame, parameters = self._parameter_report(step)
        if parameters_to_blame:
            message = (
                f"SimPO training step {step}: {what}, and {parameters}: the parameters, not this step's batch (rows "
                f"{rows.start}..{rows.stop - 1}), are the cause. The run diverged before this step (lower the "
                "learning rate), or the checkpoint it resumed from holds such parameters."
            )
        else:
            message = (
                f"SimPO training step {step}: {what}{parameters}. The batch is rows {rows.start}..{rows.stop - 1} "
                "of the training stream (a row holds one pair, or several with a packed pair_layout), in the order "
                "the data loader reads them (the same for the same data seed and batch schedule)."
            )
        logger.error(message)
        return NonFiniteTrainingError(message, step=step, rows=rows)

    def inside_step(self, state, inside_info: InsideJitInfo):
        updated = eqx.apply_updates(state.trainable_model, inside_info.updates)
        return _all_finite(inside_info.grads), _all_finite(updated), _largest_magnitude(updated)

    def on_step(self, step_info: StepInfo, health):
        grads_finite, params_finite, largest = jax.device_get(health)
        if bool(grads_finite):
            self._latest = (step_info.next_step, bool(params_finite), float(largest))
        else:
            # by now Levanter's own hooks, the checkpointer included, have seen the parameters these gradients made
            step = step_info.step
            raise self.report(
                f"the gradients are not finite although the loss is {step_info.loss}; the parameters they updated are "
                f"not, so do not resume from a checkpoint step-{step} if one was written",
                step,
            )

    @contextlib.contextmanager
    def reporting(self):
        """Re-raises Levanter's non-finite loss errors with the step and its rows."""
        try:
            yield
        except RuntimeError as e:
            what = _LEVANTER_LOSS_ERRORS.get(str(e))
            if what is None or self._step is None:
                raise
            raise self.report(what, self._step) from e
