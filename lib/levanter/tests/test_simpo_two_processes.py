# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The entrypoint as a pod runs it: two JAX processes with two CPU devices each, over 127.0.0.1, launched with
Levanter's ``--trainer.distributed`` flags, in fresh processes. A run trains, evaluates (at step 0 and every few
steps) and exports like one device; SIGTERM to either process stops both at one step boundary and the rerun
resumes; a SIGKILLed process ends the other within seconds; a live foreign lease, a cache whose source changed and a
changed beta stop both processes at once with the same message. Every case asserts both exit codes and a bound on
the wall time, so a stall in a collective (JAX's 5-minute shutdown barrier) fails it."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from simpo_hf_reference import check_against_the_export
from simpo_tiny_run import REPO, STEPS, SharedSetup, run_overrides, tiny_args

from levanter.simpo.run.lease import LEASE_FILE, process_identity

PROCESSES = 2
DEVICES_PER_PROCESS = 2
EVAL_RTOL = 1e-4
"""Held-out metrics of the pod run against one device's: the training losses of a 4-device mesh stay within 1e-4
(test_simpo_multi_device), and evaluation adds one more reordered reduction."""
FAILURE_SPREAD_S = 30.0
"""Both processes of a failed run exit within this of each other (a stall in a collective would be minutes)."""
RUN_BOUND_S = 240.0
"""A launch that trains 8 tiny steps (start-up, cache, compilation, evaluation, export) ends within this on two busy
CPU cores; a stall in a collective until JAX's shutdown barrier gives up (300 s) does not."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PodRun:
    """One launch: ``PROCESSES`` processes of the entrypoint, each logging to ``<tmp>/<name>.<index>.log``."""

    def __init__(self, tmp: Path, shared: SharedSetup, name: str, *overrides: str, peer_silence_s: int | None = None):
        self.tmp, self.name = tmp, name
        port = _free_port()
        env = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
            "JAX_PLATFORMS": "cpu",
            "HF_HUB_OFFLINE": "1",
        }
        if peer_silence_s is not None:
            env["SIMPO_PEER_SILENCE_SECONDS"] = str(peer_silence_s)  # the run's default is 30 s
        self.started = time.monotonic()
        self.processes: list[subprocess.Popen] = []
        for index in range(PROCESSES):
            distributed = [
                "--trainer.distributed.coordinator_address", f"127.0.0.1:{port}",
                "--trainer.distributed.num_processes", str(PROCESSES),
                "--trainer.distributed.process_id", str(index),
            ]  # fmt: skip
            args = tiny_args(tmp, *shared.overrides, *overrides, *distributed)
            command = [sys.executable, "-m", "levanter.main.train_simpo", "--config_path", str(shared.config), *args]
            with open(self.log_path(index), "w") as log:
                self.processes.append(
                    subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
                )

    def log_path(self, index: int) -> Path:
        return self.tmp / f"{self.name}.{index}.log"

    def log(self, index: int) -> str:
        return self.log_path(index).read_text()

    def wait(self, timeout: float = 420) -> tuple[list[int], list[float]]:
        """Exit codes and exit times (seconds since the launch) of every process."""
        codes: list[int | None] = [None] * PROCESSES
        ended: list[float] = [0.0] * PROCESSES
        deadline = self.started + timeout
        while any(c is None for c in codes):
            if time.monotonic() > deadline:
                self.kill()
                logs = "\n".join(self.log(i)[-3000:] for i in range(PROCESSES))
                pytest.fail(f"{self.name}: the processes did not all exit within {timeout} s:\n{logs}")
            for i, p in enumerate(self.processes):
                if codes[i] is None and p.poll() is not None:
                    codes[i], ended[i] = p.returncode, time.monotonic() - self.started
            time.sleep(0.2)
        return [int(c) for c in codes if c is not None], ended

    def kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()

    def wait_for_step(self, run_id: str, step: int, timeout: float = 300) -> None:
        """Returns once process 0 has logged the training metrics of ``step``."""
        history = self.tmp / "logs" / run_id / "simpo_metrics.jsonl"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if history.exists() and step in _steps(history):
                return
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"{self.name}: step {step} was never logged:\n" + "\n".join(self.log(i)[-3000:] for i in range(2)))


def _steps(history: Path) -> set[int]:
    steps = set()
    for line in history.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if any(k.startswith("train/") for k in record.get("metrics", record)):
            steps.add(int(record["step"]))
    return steps


def _history(tmp: Path, run_id: str) -> dict[int, dict]:
    merged: dict[int, dict] = {}
    for line in (tmp / "logs" / run_id / "simpo_metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        merged.setdefault(int(record["step"]), {}).update(record.get("metrics", {}))
    return merged


def _assert_failed_together(pod: PodRun, codes: list[int], ended: list[float], message: str) -> None:
    logs = [pod.log(i) for i in range(PROCESSES)]
    assert codes[0] == codes[1] != 0, (codes, [log[-3000:] for log in logs])
    assert max(ended) - min(ended) < FAILURE_SPREAD_S, ended
    for log in logs:
        # the last thing each process prints, message and all (a message may span lines)
        printed = log.rfind("\nSimPO run failed: ")
        assert printed >= 0 and message in log[printed:], log[-3000:]


@pytest.fixture(scope="module")
def pod(shared_setup, tmp_path_factory):
    """A module's two-process runs: their own empty data cache (built once by the first launch), outputs under one
    temporary directory."""
    tmp = tmp_path_factory.mktemp("two_processes")
    # the first launch builds this empty cache_dir; the shared compilation cache stays
    overrides = [*shared_setup.overrides, "--data.cache_dir", str(tmp / "cache")]
    return tmp, SharedSetup(shared_setup.config, overrides)


@pytest.fixture(scope="module")
def trained_pod(pod):
    """The pod run every later case starts from: 8 steps, evaluated at step 0 and every 4 steps, exported."""
    tmp, shared = pod
    run = PodRun(tmp, shared, "trained", *run_overrides("pod"), "--run_initial_eval", "true",
                 "--hf_save_path", str(tmp / "hf"))  # fmt: skip
    codes, ended = run.wait()
    return run, codes, ended


def test_a_pod_run_trains_evaluates_and_exports_like_one_device(trained_pod, single_device_runs):
    run, codes, ended = trained_pod
    assert codes == [0, 0], [run.log(i)[-3000:] for i in range(PROCESSES)]
    assert max(ended) < RUN_BOUND_S, ended
    tmp = run.tmp
    history = _history(tmp, "pod")
    reference = single_device_runs.reference
    evaluated = sorted(s for s, m in history.items() if "eval/loss" in m)
    assert evaluated[0] == 0 and evaluated[-1] == STEPS - 1 and len(evaluated) >= 3, evaluated
    for step in evaluated:
        for name in ("eval/loss", "eval/rewards/accuracies", "eval/logps/chosen", "length/accuracy_chosen_longer"):
            key = name if name.startswith("eval/") else f"eval/{name}"
            ours, theirs = history[step][key], reference[step][key]
            assert abs(ours - theirs) <= EVAL_RTOL * max(abs(theirs), 1.0), (step, key, ours, theirs)
    for step in range(STEPS):
        ours, theirs = history[step]["train/loss"], reference[step]["train/loss"]
        assert abs(ours - theirs) <= EVAL_RTOL * abs(theirs), (step, ours, theirs)
    # the export holds whole tensors, and the samples both processes decoded are what transformers generates from it
    check_against_the_export(tmp / "logs" / "pod", tmp / "hf" / "pod" / f"step-{STEPS - 1}", STEPS - 1)
    assert "What the model writes (two held-out prompts):" in run.log(1)
    assert (tmp / "logs" / "pod" / "simpo_run.png").exists()
    records = sorted(p.parent.name for p in (tmp / "checkpoints" / "pod").glob("step-*/simpo_record.json"))
    assert records == sorted(p.name for p in (tmp / "checkpoints" / "pod").glob("step-*")), records
    # the empty cache_dir was built once, by process 0; process 1 waited for it
    assert "Built the train cache" in run.log(0) and "Built the train cache" not in run.log(1)
    assert "SimPO held-out metrics at step 7" in run.log(0) and "SimPO held-out metrics at step 7" in run.log(1)
    assert not (tmp / "checkpoints" / "pod" / LEASE_FILE).exists()


def test_a_changed_beta_stops_both_processes(trained_pod, pod):
    tmp, shared = pod
    run = PodRun(tmp, shared, "beta", *run_overrides("pod"), "--beta", "3.0", "--trainer.num_train_steps", "10")
    codes, ended = run.wait()
    _assert_failed_together(run, codes, ended, "beta: 2.0 -> 3.0")
    assert "CheckpointMismatchError" in run.log(0) and "CheckpointMismatchError" in run.log(1)


def test_a_live_foreign_lease_stops_both_processes(trained_pod, pod):
    tmp, shared = pod
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lease = tmp / "checkpoints" / "leased" / LEASE_FILE
        lease.parent.mkdir(parents=True)
        # as a holder records itself
        record = {"run_id": "leased", "host": socket.gethostname(), **process_identity(holder.pid),
                  "token": "foreign", "taken": time.time(), "renewed": time.time()}  # fmt: skip
        lease.write_text(json.dumps(record))
        run = PodRun(tmp, shared, "leased", *run_overrides("leased"))
        codes, ended = run.wait(timeout=180)
    finally:
        holder.kill()
        holder.wait()
    _assert_failed_together(run, codes, ended, "Run leased is already running")
    assert max(ended) < 120, ended
    assert json.loads(lease.read_text())["token"] == "foreign"


def test_a_cache_whose_source_changed_stops_both_processes(trained_pod, pod):
    tmp, shared = pod
    config = yaml.safe_load(shared.config.read_text())
    component = next(iter(config["data"]["components"].values()))
    source = component["source"]
    edited = tmp / "edited_train.jsonl"
    shutil.copy(source["train_urls"][0], edited)
    source["train_urls"] = [str(edited)]
    # a cache_dir of the component's own is refused when its source changes (without one, the edited file would
    # get a cache of its own beside the first)
    component["cache_dir"] = str(tmp / "edited_cache" / "own")
    config_path = tmp / "edited_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # its own cache: the module's was built from the unedited file
    edited_setup = SharedSetup(config_path, [*shared.overrides, "--data.cache_dir", str(tmp / "edited_cache")])
    first = PodRun(tmp, edited_setup, "cache_built", *run_overrides("cache", "--trainer.num_train_steps", "1"))
    codes, _ = first.wait()
    assert codes == [0, 0], first.log(0)[-3000:]
    with open(edited, "a") as f:
        f.write(edited.read_text().splitlines(keepends=True)[0])
    run = PodRun(tmp, edited_setup, "cache_changed", *run_overrides("cache_again", "--trainer.num_train_steps", "1"))
    codes, ended = run.wait(timeout=180)
    _assert_failed_together(run, codes, ended, "was built from other data")
    assert max(ended) < 120, ended


@pytest.mark.parametrize("signalled", [0, 1])
def test_sigterm_to_either_process_stops_both_at_one_step_and_the_rerun_resumes(pod, signalled):
    tmp, shared = pod
    run_id = f"sigterm{signalled}"
    run = PodRun(tmp, shared, run_id, *run_overrides(run_id))
    run.wait_for_step(run_id, 2)
    run.processes[signalled].send_signal(signal.SIGTERM)
    signalled_at = time.monotonic() - run.started
    codes, ended = run.wait()
    logs = [run.log(i) for i in range(PROCESSES)]
    assert codes == [0, 0], [log[-3000:] for log in logs]
    # the step in flight, its checkpoint and a clean exit: seconds, not a collective's time-out
    assert max(ended) - signalled_at < 60 and max(ended) - min(ended) < FAILURE_SPREAD_S, (signalled_at, ended)
    saved = [line for line in logs[0].splitlines() if f"Run {run_id} preempted: saved checkpoint" in line]
    assert saved and saved[-1] in logs[1], logs[1][-3000:]
    step = int(saved[-1].split("checkpoint step-")[1].split(" ")[0])
    assert step < STEPS - 1
    rerun = PodRun(tmp, shared, f"{run_id}_rerun", *run_overrides(run_id))
    codes, ended = rerun.wait()
    assert codes == [0, 0], rerun.log(0)[-3000:]
    assert max(ended) < RUN_BOUND_S, ended
    assert f"Resuming SimPO training from step {step + 1}" in rerun.log(0)
    assert f"Resuming SimPO training from step {step + 1}" in rerun.log(1)


def test_a_killed_process_ends_the_other_within_seconds_and_the_rerun_resumes(pod):
    tmp, shared = pod
    run = PodRun(tmp, shared, "killed", *run_overrides("killed"), peer_silence_s=10)
    run.wait_for_step("killed", 4)
    run.processes[1].kill()
    killed_at = time.monotonic() - run.started
    codes, ended = run.wait()
    assert codes[1] == -signal.SIGKILL
    # JAX's own heartbeat would take 100 s. Often gloo's next collective fails at once (the peer's socket closed);
    # where it hangs instead (seen on CI), the run's watcher notices the silence: 10 s here, plus a beat or two
    assert codes[0] == 1 and ended[0] - killed_at < FAILURE_SPREAD_S, (codes, ended, killed_at, run.log(0)[-3000:])
    assert "SimPO run failed: " in run.log(0)
    rerun = PodRun(tmp, shared, "killed_rerun", *run_overrides("killed"))
    codes, ended = rerun.wait()
    assert codes == [0, 0], rerun.log(0)[-3000:]
    assert max(ended) < RUN_BOUND_S, ended
    assert "Resuming SimPO training from step" in rerun.log(0)


def test_a_frozen_process_is_noticed_and_the_others_stop(pod):
    # a host that stops answering without closing its sockets (SIGSTOP here): its peers wait in their next
    # collective, and only the run's watcher, which misses its beats, ends them
    tmp, shared = pod
    run = PodRun(tmp, shared, "frozen", *run_overrides("frozen"), peer_silence_s=10)
    run.wait_for_step("frozen", 3)
    run.processes[1].send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic() - run.started
    try:
        while run.processes[0].poll() is None and time.monotonic() - run.started - frozen_at < 120:
            time.sleep(0.2)
        ended = time.monotonic() - run.started
    finally:
        run.kill()
    assert run.processes[0].returncode == 1, run.log(0)[-3000:]
    assert ended - frozen_at < 60, (ended, frozen_at)
    assert "SimPO run failed: process 1 stopped without a word" in run.log(0), run.log(0)[-3000:]
