# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Tiny SimPO runs in a child process, for tests that need more (virtual) JAX devices, a run killed hard, or a run
restarted the way a preempted job restarts.

``ChildRuns(tmp, shared, runs)`` starts ``python simpo_child_run.py SPEC.json``, which makes the spec's runs one
after another, each ``{"name", "overrides"}``. A run can freeze: at ``freeze_at_step`` (once that step's training
loss is logged) or at the first log line containing ``freeze_at_message``, it waits until every checkpoint it began
is written, saves its metrics so far, tells the test (``wait_for_freeze`` returns) and blocks until a signal comes.
SIGKILL then ends it with a known amount of unsaved work; a signal the run handles (SIGTERM) has its handler run,
and the run goes on.
"""

import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
from simpo_tiny_run import REPO, SharedSetup, TrackedMetrics, run, tiny_config

from levanter.simpo.run.nonfinite import NonFiniteTrainingError

FROZEN = b"frozen\n"


class ChildRuns:
    """The test's side of a child process making tiny runs (see the module docstring)."""

    def __init__(self, tmp: Path, shared: SharedSetup, runs: list[dict], *, env: dict | None = None):
        self.tmp = tmp
        self.out = tmp / "runs.json"
        frozen_read, frozen_write = os.pipe()
        runs = [{**r, "overrides": shared.overrides + list(r["overrides"])} for r in runs]
        spec = {"tmp": str(tmp), "out": str(self.out), "config": str(shared.config), "runs": runs}
        spec["frozen_fd"] = frozen_write
        (tmp / "spec.json").write_text(json.dumps(spec))
        with open(tmp / "child.log", "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, __file__, str(tmp / "spec.json")],
                cwd=REPO,
                # never written to: the child sees it close if this process goes away, and then ends a freeze
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=[frozen_write],
                env={**os.environ, **(env or {})},
            )
        os.close(frozen_write)  # the child holds the only write end: it closes when the child exits
        self._frozen: int | None = frozen_read

    def log(self) -> str:
        return (self.tmp / "child.log").read_text()

    def wait_for_freeze(self, timeout: float = 600) -> None:
        """Returns once a run froze (see the module docstring); raises if the child ended or stalled first."""
        ready, _, _ = select.select([self._frozen], [], [], timeout)
        if not ready or os.read(self._frozen, len(FROZEN)) != FROZEN:  # b"": the child exited
            self.close()
            raise RuntimeError(f"the run ended or stalled before it froze:\n{self.log()[-6000:]}")

    def frozen_metrics(self) -> dict[int, dict]:
        """What the frozen run had logged, per step."""
        return {int(s): m for s, m in json.loads(self.out.read_text())["frozen"].items()}

    def kill(self) -> None:
        self.process.kill()
        if self.process.wait(timeout=60) != -signal.SIGKILL:
            raise RuntimeError(f"the run ended with {self.process.returncode} instead of being killed:\n{self.log()}")
        self.close()

    def collect(self, timeout: float = 600) -> dict:
        """Waits for the child and returns, per run name, ``{"steps": {step: metrics}, "messages" (what the run
        logged), "error" (the message of a NonFiniteTrainingError that ended the run, or None), "devices", "mesh",
        "param_mapping"}``."""
        try:
            self.process.wait(timeout=timeout)
        finally:
            self.close()
        if not self.out.exists():
            raise RuntimeError(f"the child run failed (exit code {self.process.returncode}):\n{self.log()[-6000:]}")
        results = json.loads(self.out.read_text())
        for result in results.values():
            result["steps"] = {int(s): m for s, m in result["steps"].items()}
        return results

    def close(self) -> None:
        """Ends the child if it still runs, and closes this side's pipes."""
        self.process.kill()  # nothing once it has exited
        self.process.wait()
        self.process.stdin.close()
        if self._frozen is not None:
            os.close(self._frozen)
            self._frozen = None


# ---- in the child ----


class CheckpointWrites(logging.Handler):
    """The checkpoints Levanter has begun and not finished: it writes their arrays in background threads and their
    ``metadata.json`` last, logging "Saving checkpoint to PATH ..." and then "Saved checkpoint to PATH ..."."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self._pending: set[str] = set()
        self._changed = threading.Condition()

    def emit(self, record):
        began = re.match(r"Saving checkpoint to (\S+) for step", record.getMessage())
        ended = re.match(r"Saved checkpoint to (\S+) for step", record.getMessage())
        with self._changed:
            if began:
                self._pending.add(began[1])
            if ended:
                self._pending.discard(ended[1])
                self._changed.notify_all()

    def wait(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: not self._pending)


class FreezingMetrics(TrackedMetrics):
    """TrackedMetrics that freeze the run once, as the module docstring says. The training thread (the main
    thread) stops inside the logging call, with the steps after its last checkpoint done and unsaved."""

    def __init__(self, entry: dict, out: Path, frozen_fd: int, writes: CheckpointWrites):
        super().__init__()
        self._step = entry.get("freeze_at_step")
        self._message = entry.get("freeze_at_message")
        self._out = out
        self._frozen_fd = frozen_fd
        self._writes = writes

    def emit(self, record):
        super().emit(record)
        message = record.getMessage()
        at_step = record.name == "levanter.json_logger" and "train/loss" in self.by_step.get(self._step, {})
        if at_step or (self._message is not None and self._message in message):
            self._step = self._message = None  # once: Levanter's final forced hooks log the last step again
            self._freeze()

    def _freeze(self):
        self._writes.wait()  # in other threads, which keep running during the freeze
        self._out.write_text(json.dumps({"frozen": self.by_step}))
        # Python's C signal handler writes to the wakeup fd after marking the signal for its Python handler, which
        # therefore runs as soon as select returns
        signals, wakeup = os.pipe()
        os.set_blocking(wakeup, False)
        previous = signal.set_wakeup_fd(wakeup)
        try:
            os.write(self._frozen_fd, FROZEN)
            ready, _, _ = select.select([signals, sys.stdin], [], [])
            if signals not in ready:  # stdin closed: the test process is gone, so nobody will signal us
                os._exit(1)
        finally:
            signal.set_wakeup_fd(previous)
            os.close(signals)
            os.close(wakeup)


def _child(spec_path: str):
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    results = {}
    for entry in spec["runs"]:
        writes = CheckpointWrites()
        tracked = FreezingMetrics(entry, out, spec["frozen_fd"], writes)
        config = tiny_config(Path(spec["tmp"]), *entry["overrides"], config_path=Path(spec["config"]))
        lease_log = logging.getLogger("levanter.simpo.run.lease")
        checkpoint_log = logging.getLogger("levanter.checkpoint")
        lease_log.addHandler(tracked)
        checkpoint_log.addHandler(writes)
        if entry.get("freeze_at_message"):  # Levanter's checkpoint messages too: a run can freeze as a save begins
            checkpoint_log.addHandler(tracked)
        error = None
        try:
            run(config, tracked)
        except NonFiniteTrainingError as e:
            error = str(e)
        finally:
            lease_log.removeHandler(tracked)
            checkpoint_log.removeHandler(writes)
            checkpoint_log.removeHandler(tracked)
        results[entry["name"]] = {
            "steps": tracked.by_step,
            "messages": tracked.messages,
            "error": error,
            "devices": jax.device_count(),
            "mesh": dict(config.trainer.device_mesh.shape),
            "param_mapping": dict(config.trainer.parameter_axis_mapping),
        }
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    os.chdir(REPO)  # the YAML's data and tokenizer paths are relative to the repository root
    _child(sys.argv[1])
