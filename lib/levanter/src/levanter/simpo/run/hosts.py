# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Several JAX processes as one run: what they must agree on is decided once and shared, and a failure on any of
them ends all of them within seconds.

- ``agreed(what, decide)``: process 0 runs ``decide()`` and every process receives its outcome, the value or the
  error, through JAX's distributed key-value store (Levanter's ``multihost_broadcast_sync``): every process then
  returns the same value or raises the same error. Decisions that read storage (the lease, the data cache's
  identity, which checkpoint to resume) go through it, since hosts may see an object store differently.
- ``failing_together()``: a process that fails announces its error in the key-value store and exits 1; a watcher
  thread on every other process sees the announcement, prints the same ``SimPO run failed: ...`` line and exits 1
  too, instead of waiting in its next collective until JAX's shutdown barrier gives up minutes later. A process
  that loses the coordinator (process 0 killed) or whose peer stops beating (killed) also exits 1, saying which.

With one process both do nothing beyond calling ``decide`` and running the body.
"""

import contextlib
import importlib
import json
import logging
import os
import sys
import threading
import time
from typing import Callable, Iterator, TypeVar, cast

import jax

from levanter.utils.jax_utils import multihost_broadcast_sync

logger = logging.getLogger(__name__)

T = TypeVar("T")

FAILED_KEY = "simpo/failed"
"""Where the first failing process writes its message (JSON: process, message)."""
SEEN_KEY = "simpo/failed_seen"
ALIVE_KEY = "simpo/alive"
"""Each process's beat, the time of its latest poll, or ``DONE`` once it ended cleanly."""
DONE = "done"
POLL_SECONDS = 2.0
PEER_SILENCE_SECONDS = float(os.environ.get("SIMPO_PEER_SILENCE_SECONDS", "30"))
"""A peer whose beat has not changed for this long is gone (``SIMPO_PEER_SILENCE_SECONDS``). The watcher thread
beats whatever the main thread does (compiling, saving, waiting in a collective), so only a dead or frozen process,
or one starved of its interpreter for that long, stays silent; a peer that never beat is gone after twice that."""
DECISION_TIMEOUT_SECONDS = 24 * 3600.0
"""How long followers wait for process 0's decision. Long: process 0 may first build a large data cache; a failure
of process 0 reaches them through the failure watcher much sooner."""
FAILURE_EXIT_CODE = 1
ACK_WAIT_SECONDS = 10.0
"""How long a failing process 0 waits for the others to acknowledge before it exits (and its store goes)."""
EXIT_GRACE_SECONDS = 1.0


def _client():
    from jax._src import distributed  # the key-value store has no public API; Levanter reaches it the same way

    return distributed.global_state.client


def _describe(error: BaseException) -> dict:
    return {"module": type(error).__module__, "type": type(error).__qualname__, "message": str(error)}


def _rebuild(described: dict) -> BaseException:
    """The error process 0 raised, as an instance of the same class where it takes a message."""
    try:
        cls = getattr(importlib.import_module(described["module"]), described["type"])
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(described["message"])
    except Exception:  # a class that needs other arguments or cannot be imported: the message still travels
        pass
    return RuntimeError(f"{described['type']}: {described['message']}")


def agreed(what: str, decide: Callable[[], T]) -> T:
    """``decide()`` on process 0; every process returns its (JSON-serialisable) value or raises its error.
    ``what`` names the decision in the log of a follower that waits for it."""
    if jax.process_count() == 1:
        return decide()
    if jax.process_index() == 0:
        try:
            value = decide()
        except Exception as error:
            multihost_broadcast_sync({"error": _describe(error)}, timeout=DECISION_TIMEOUT_SECONDS)
            raise
        multihost_broadcast_sync({"value": value}, timeout=DECISION_TIMEOUT_SECONDS)
        return json.loads(json.dumps(value))  # what the others received, tuples and all, so all act on the same
    logger.debug(f"Waiting for process 0 to decide: {what}")
    outcome: dict = cast(dict, multihost_broadcast_sync(None, timeout=DECISION_TIMEOUT_SECONDS))
    if "error" in outcome:
        raise _rebuild(outcome["error"])
    return outcome["value"]


class _FailureWatcher:
    """Ends this process when another one announces a failure, when process 0's coordinator is gone, or when a
    peer process stops beating (killed: JAX's own heartbeat notices only after 100 s). Every failing process leaves
    through ``fail``: followers acknowledge and exit at once; process 0, whose coordination service the others'
    JAX clients need until they are gone (they abort without it), waits for their acknowledgements first."""

    def __init__(self):
        self._client = _client()
        self._index = jax.process_index()
        self._count = jax.process_count()
        self._stopping = threading.Event()
        self._failing = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="simpo-failure-watcher", daemon=True)
        # per peer: its last beat and when (this host's monotonic clock) it changed, so clocks need not agree
        self._beats: dict[int, tuple[str | None, float]] = {}
        self._cleanups: list[Callable[[], None]] = []

    def at_failure(self, cleanup: Callable[[], None]) -> None:
        """Runs ``cleanup`` (best effort) before this process exits for a failure: ``os._exit`` skips every
        ``finally`` and ``__exit__`` still pending, e.g. the lease's release."""
        self._cleanups.append(cleanup)

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """A clean end: peers stop expecting this process's beats."""
        self._stopping.set()
        self._thread.join(timeout=2 * POLL_SECONDS + 5)
        with contextlib.suppress(Exception):
            self._client.key_value_set(f"{ALIVE_KEY}/{self._index}", DONE, allow_overwrite=True)

    def announce(self, message: str) -> None:
        """This process failed: tells the others (the first announcement stands), then leaves through ``fail``."""
        self._stopping.set()  # this process's watcher must not take the announcement for another's
        with contextlib.suppress(Exception):  # another process announced first, or the coordinator is gone
            self._client.key_value_set(FAILED_KEY, json.dumps({"process": self._index, "message": message}))
        self.fail(f"SimPO run failed: {message}")

    def fail(self, message: str, gone: int = 0) -> None:
        """Prints ``message`` and exits 1, once, from whichever thread comes first. ``gone``: peers known dead,
        which will not acknowledge."""
        if not self._failing.acquire(blocking=False):
            threading.Event().wait()  # the other thread is exiting the process
        self._stopping.set()
        logger.error(message)
        for cleanup in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        if self._index == 0 and self._count - 1 - gone > 0:
            deadline = time.monotonic() + ACK_WAIT_SECONDS
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    if int(self._client.key_value_try_get(SEEN_KEY)) >= self._count - 1 - gone:
                        break
                time.sleep(0.1)
            time.sleep(EXIT_GRACE_SECONDS)  # the last follower is between its acknowledgement and its exit
        elif self._index != 0 and gone < self._count:  # with the coordinator gone, the call could hang
            with contextlib.suppress(Exception):
                self._client.key_value_increment(SEEN_KEY, 1)
        print(message, file=sys.stderr, flush=True)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        sys.stdout.flush()
        os._exit(FAILURE_EXIT_CODE)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            try:
                self._client.key_value_set(f"{ALIVE_KEY}/{self._index}", str(time.time()), allow_overwrite=True)
                announced = self._client.blocking_key_value_get(FAILED_KEY, int(POLL_SECONDS * 1000))
            except Exception as e:
                if self._stopping.is_set():
                    return
                if "DEADLINE_EXCEEDED" not in str(e) and "deadline" not in str(e).lower():
                    first_line = str(e).splitlines()[0][:200] if str(e) else ""
                    message = f"process {self._index} lost the run's coordinator on process 0 ({first_line})"
                    self.fail(f"SimPO run failed: {message}", gone=self._count)
                self._check_peers()
                continue
            failure = json.loads(announced)
            if self._stopping.is_set() or failure["process"] == self._index:
                return
            logger.error(f"Process {failure['process']} of this run failed; stopping process {self._index} too")
            self.fail(f"SimPO run failed: {failure['message']}")

    def _check_peers(self) -> None:
        now = time.monotonic()
        for peer in range(self._count):
            if peer == self._index:
                continue
            last, since = self._beats.get(peer, (None, self._started))
            try:
                beat: str | None = self._client.key_value_try_get(f"{ALIVE_KEY}/{peer}")
            except Exception as e:
                # not beating yet; any other error (the store unreachable) leaves the silence running
                beat = None if "NOT_FOUND" in str(e) else last
            if beat == DONE:
                continue
            if beat != last:
                self._beats[peer] = (beat, now)
                continue
            limit = PEER_SILENCE_SECONDS if beat is not None else 2 * PEER_SILENCE_SECONDS
            if now - since > limit:
                silence = f"no beat for {now - since:.0f} s: killed, or its host is gone"
                self.fail(f"SimPO run failed: process {peer} stopped without a word ({silence})", gone=1)


_watcher: _FailureWatcher | None = None


def at_failure(cleanup: Callable[[], None]) -> None:
    """Within ``failing_together`` with several processes, runs ``cleanup`` before a failure ends this process."""
    if _watcher is not None:
        _watcher.at_failure(cleanup)


@contextlib.contextmanager
def failing_together() -> Iterator[None]:
    """Runs the body so that a failure on one process ends every process of the run within seconds, each exiting 1
    with the failing process's message (see the module docstring). A clean exit, preemption included, stops the
    watcher."""
    if jax.process_count() == 1:
        yield
        return
    global _watcher
    watcher = _watcher = _FailureWatcher()
    watcher.start()
    try:
        yield
    except BaseException as error:
        if isinstance(error, SystemExit) and error.code in (0, None):
            watcher.stop()
            raise
        logger.exception(f"SimPO run failed on process {jax.process_index()}")
        watcher.announce(f"{type(error).__name__}: {error}")
    finally:
        _watcher = None
    watcher.stop()
