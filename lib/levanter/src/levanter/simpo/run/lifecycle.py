# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The lifecycle of one SimPO run around Levanter's trainer: what it refuses at start, the lease that makes it the
only writer of its checkpoints (``lease``), preemption (``preemption``), the no-op rerun of a finished
run, and a clean exit.

``main`` uses it as::

    with RunLifecycle(config) as run, Trainer(...) as trainer:
        run.attach(trainer)
        ...
        if run.already_finished(state):
            return
        trainer.add_hook(run.unless_preempted(evaluator), ...)
        adapter.install_export_hooks(trainer=run.once_per_step(trainer), ...)
        trainer.train(state, run.train_batches(loader.iter_from_step(state.step), state.step))
    run.report()
"""

import atexit
import dataclasses
import logging
import os
import sys
import uuid
from typing import Any, Callable, Iterator, TypeVar

import fsspec
import jax

from levanter.callbacks import StepInfo
from levanter.simpo.run.hosts import agreed, at_failure
from levanter.simpo.run.lease import RunLease
from levanter.simpo.run.preemption import Preemption, RunPreempted

logger = logging.getLogger(__name__)

X = TypeVar("X")

MAX_BETA = 1e3
MAX_ABS_GAMMA_BETA_RATIO = 1e2
"""Bounds on ``beta`` and ``|gamma_beta_ratio|``. The loss is ``softplus(-beta * (margin - gamma_beta_ratio))`` with
``margin`` a difference of length-normalised log-probs, a few nats in practice (the paper's beta is 2-10, its
ratio 0.3-1.6). float32 keeps about 7 significant digits, so the ratio costs ``|ratio| * 6e-8`` nats of resolution on
the margin: 6e-6 at 100, and at 1e38 the margin is lost entirely (the issue's ``--gamma_beta_ratio 1e38`` made a
non-finite loss). A beta of 1e3 already turns the sigmoid into a step for margins 0.01 apart."""


def check_run_id(run_id: str) -> None:
    """A run id names one directory under each output base path, so it must be a plain name."""
    problems = []
    if not run_id:
        problems.append("is empty")
    if os.path.isabs(run_id) or run_id.startswith("~"):
        problems.append("is an absolute path")
    if any(sep in run_id for sep in ("/", "\\")):
        problems.append("contains a path separator")
    if ".." in run_id:
        problems.append("contains '..'")
    if run_id == "." or any(c in run_id for c in "\0\n\r\t"):
        problems.append("is not a plain name")
    if ":" in run_id:
        problems.append("contains ':' (a URL scheme or drive)")
    if problems:
        raise ValueError(
            f"trainer.id {run_id!r} {' and '.join(dict.fromkeys(problems))}: a run id names one directory under the "
            "checkpoint, export and log paths, so it must be a plain name like 'simpo_tiny_gpt2'"
        )


def validate_run_settings(config) -> None:
    """The run-level settings of a ``TrainSimpoConfig``: run id, step budget and the loss's scale."""
    run_id = config.trainer.id if config.trainer.id is not None else os.environ.get("RUN_ID")
    if run_id is not None:
        check_run_id(run_id)
    if config.trainer.num_train_steps < 1:
        raise ValueError(f"trainer.num_train_steps must be at least 1, got {config.trainer.num_train_steps}")
    if not config.beta <= MAX_BETA:
        raise ValueError(
            f"beta must be at most {MAX_BETA:g}, got {config.beta:g}: beyond it the loss is a step function of the "
            "margin (docs/data.md, bad-input catalogue)"
        )
    if not abs(config.gamma_beta_ratio) <= MAX_ABS_GAMMA_BETA_RATIO:
        raise ValueError(
            f"gamma_beta_ratio must be within +-{MAX_ABS_GAMMA_BETA_RATIO:g}, got {config.gamma_beta_ratio:g}: "
            "a length-normalised log-prob margin is a few nats, and float32 cannot resolve it against a larger "
            "target (docs/data.md, bad-input catalogue)"
        )


def output_paths(config, run_id: str) -> dict[str, str]:
    """Every place the run writes, by the config field that names it."""
    checkpointer = config.trainer.checkpointer
    paths = {"trainer.checkpointer.base_path": checkpointer.expanded_path(run_id)}
    if checkpointer.temporary_base_path is not None:
        paths["trainer.checkpointer.temporary_base_path"] = checkpointer.expanded_temporary_path(run_id)
    for name in ("hf_save_path", "peft_save_path", "merged_hf_save_path"):
        if getattr(config, name) is not None:
            paths[name] = getattr(config, name)
    paths["trainer.log_dir"] = str(config.trainer.log_dir)
    trackers = (
        config.trainer.tracker if isinstance(config.trainer.tracker, (list, tuple)) else [config.trainer.tracker]
    )
    for i, tracker in enumerate(trackers):
        if getattr(tracker, "output_path", None):
            paths[f"trainer.tracker[{i}].output_path"] = tracker.output_path
    return paths


def check_writable(paths: dict[str, str]) -> None:
    """Creates each directory and writes and removes a probe file in it, so a bad path fails before the first step
    instead of at the first save after hours of training."""
    for field, path in paths.items():
        fs, plain = fsspec.core.url_to_fs(path)
        probe = f"{plain.rstrip('/')}/.simpo_write_probe-{uuid.uuid4().hex}"
        try:
            fs.makedirs(plain, exist_ok=True)
            with fs.open(probe, "wb") as f:
                f.write(b"probe")
            fs.rm(probe)
        except Exception as e:
            raise ValueError(f"{field}: cannot write to {path}: {type(e).__name__}: {e}") from e


class RunLifecycle:
    """Enter before the ``Trainer``, so it outlives it: checks the outputs, takes the lease, handles SIGTERM; on
    exit stops the data loader's threads, releases the lease and closes wandb, so the interpreter exits cleanly."""

    def __init__(self, config):
        self.config = config
        self.run_id: str = config.trainer.id
        check_run_id(self.run_id)
        self.preemption = Preemption()
        self._lease = RunLease(config.trainer.checkpointer.expanded_path(self.run_id), self.run_id)
        self._is_primary = jax.process_index() == 0
        self._closers: list[Callable[[], None]] = []
        self._tracker = None
        self._noop = False

    def __enter__(self) -> "RunLifecycle":
        check_writable(output_paths(self.config, self.run_id))
        # before the lease, so a run that holds it also handles SIGTERM
        self.preemption.install()
        try:
            # process 0 takes it; every process learns the outcome, so a refusal stops them all at once
            agreed("the lease on the run's checkpoint directory", self._lease.acquire)
            if self._is_primary:
                at_failure(self._lease.release)  # a failure's exit skips __exit__
        except BaseException:
            self.preemption.uninstall()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.preemption.uninstall()
        for close in reversed(self._closers):
            close()
        if self._tracker is not None and (exc is None or isinstance(exc, RunPreempted)) and not self._noop:
            self._tracker.finish()
        if self._is_primary:
            self._lease.release()
        close_wandb()
        if isinstance(exc, RunPreempted):
            logger.warning(
                f"Run {self.run_id} preempted (SIGTERM) before its first step here; nothing new to save. "
                "Rerun the same command to continue."
            )
            return True
        return False

    def attach(self, trainer) -> None:
        """The trainer's tracker is finished on a clean exit (not by a no-op rerun, which writes nothing)."""
        self._tracker = trainer.tracker

    def already_finished(self, state) -> bool:
        """A rerun of a finished run: says so and leaves everything as it is."""
        step, target = int(state.step), self.config.trainer.num_train_steps
        if step < target:
            return False
        self._noop = True
        logger.info(
            f"Run {self.run_id} already finished: its checkpoint holds {step} steps of {target}. Nothing to train; "
            "its checkpoints and exports are left as they are. Raise trainer.num_train_steps to train further, or use "
            "a new trainer.id."
        )
        return True

    def train_batches(self, batches: Iterator[X], first_step: int) -> Iterator[X]:
        """``batches`` (a ``DataLoaderIterator``), ending at the step boundary where preemption is agreed; its
        prefetch thread is stopped and joined when the run ends."""
        if hasattr(batches, "close"):
            self._closers.append(batches.close)
        return self._until_preempted(batches, first_step)

    def _until_preempted(self, batches: Iterator[X], first_step: int) -> Iterator[X]:
        for step, batch in enumerate(batches, start=first_step):
            if self.preemption.stop_requested(step):
                if step == first_step:
                    raise RunPreempted()
                # the trainer's final forced hooks save the checkpoint of the last finished step
                self.preemption.stopped_after_step = step - 1
                logger.warning(f"Run {self.run_id} preempted: stopping after step {step - 1}, saving its checkpoint")
                return
            yield batch

    def unless_preempted(self, hook: Callable[[StepInfo], Any]) -> Callable[[StepInfo], Any]:
        """A hook skipped at the preemption stop (evaluation and exports are not worth a preemption's grace period)."""

        def run(info: StepInfo):
            if self.preemption.stopped_after_step is None:
                return hook(info)

        return run

    def once_per_step(self, trainer):
        """The trainer as ``install_export_hooks`` sees it: each export hook writes once per step (Levanter's final
        forced hooks run the periodic ones again at the last step) and never at a preemption stop."""
        return _OncePerStepHooks(trainer, self)

    def report(self) -> None:
        step = self.preemption.stopped_after_step
        if step is not None:
            message = (
                f"Run {self.run_id} preempted: saved checkpoint step-{step} at the step boundary; rerun the same "
                f"command to resume from step {step + 1}"
            )
            logger.warning(message)
            print(message, flush=True)


@dataclasses.dataclass
class _OncePerStepHooks:
    trainer: Any
    run: RunLifecycle

    def __getattr__(self, name):
        return getattr(self.trainer, name)

    def add_hook(self, fn: Callable[[StepInfo], Any], *, every: int):
        written: set[int] = set()

        def export_once(info: StepInfo):
            if info.step not in written:
                written.add(info.step)
                fn(info)

        return self.trainer.add_hook(self.run.unless_preempted(export_once), every=every)


def close_wandb() -> None:
    """Tears wandb's service down now.

    Levanter's wandb tracker registers an atexit teardown that starts a thread, which Python 3.12 refuses at
    interpreter shutdown ("can't create new thread at interpreter shutdown"); running it here, while threads may
    still start, and unregistering it ends the process without that traceback. Without a wandb session it returns
    at once.
    """
    module = sys.modules.get("levanter.tracker.wandb")
    if module is None:
        return
    atexit.unregister(module._teardown_wandb_service_bounded)
    module._teardown_wandb_service_bounded(module.WandbConfig.service_teardown_timeout)
