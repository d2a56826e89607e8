# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Preemption: SIGTERM asks a SimPO run to stop at the next step boundary, at the same step on every host."""

import logging
import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)


class RunPreempted(Exception):
    """Preemption came before this process trained a step: there is nothing new to save."""


class Preemption:
    """SIGTERM (the first signal of a TPU or cloud preemption) asks the run to stop at the next step boundary.

    ``stop_requested`` is asked once per step, between steps; with several hosts they agree on the step: JAX's
    preemption sync point where ``jax.distributed`` runs the preemption service (it catches SIGTERM itself), else
    any host's SIGTERM stops every host at the same step (one small all-gather per step).
    """

    def __init__(self):
        self.signalled = False
        self.stopped_after_step: int | None = None
        self._previous_handler: Any = None
        self._installed = False
        self._use_jax_sync_point = jax.process_count() > 1 and _jax_preemption_service_running()

    def install(self) -> None:
        if self._use_jax_sync_point:
            return
        if threading.current_thread() is not threading.main_thread():
            # Python delivers signals to the main thread only; whoever runs us in a thread owns SIGTERM
            logger.info("SimPO run started outside the main thread: SIGTERM is left to the caller")
            return
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            # None: the previous handler was not set from Python; the default is the closest we can restore
            previous = self._previous_handler
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            self._installed = False

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self.signalled = True
        logger.warning("SIGTERM: stopping at the next step boundary and saving a checkpoint there")

    def stop_requested(self, next_step: int) -> bool:
        if self._use_jax_sync_point:
            return multihost_utils.reached_preemption_sync_point(next_step)
        if jax.process_count() == 1:
            return self.signalled
        return bool(np.any(multihost_utils.process_allgather(np.array(self.signalled))))


def _jax_preemption_service_running() -> bool:
    from jax._src import distributed  # the public API has no query for it; reached_preemption_sync_point raises

    return distributed.global_state.preemption_sync_manager is not None
