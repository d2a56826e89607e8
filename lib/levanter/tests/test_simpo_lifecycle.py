# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The lifecycle of a SimPO run, with real processes and real signals: a finished run exits 0 every time and without
a traceback, a rerun of it changes nothing, the final HF export is written once, SIGTERM saves a checkpoint at the
next step boundary and the resumed run ends bit-identical to an uninterrupted one, a second process with the same
run id is refused, and bad run ids, step budgets, loss scales and output paths stop the run before it starts."""

import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import jax
import numpy as np
import pytest
from simpo_child_run import ChildRuns
from simpo_tiny_run import (
    FREEZE_AT,
    REPO,
    SAVE_EVERY,
    STEPS,
    SharedSetup,
    TrackedMetrics,
    final_model,
    run_overrides,
    tiny_config,
    train_losses,
)

from levanter.main import train_simpo
from levanter.simpo.run.lease import RunLease, RunLeaseHeldError

CRASH_SIGNS = ("Traceback", "Exception ignored", "Fatal Python error", "terminate called", "Segmentation fault")


def _cli(tmp: Path, shared: SharedSetup, run_id: str, *extra: str) -> list[str]:
    """The real entry point on the shared tiny subset, writing under ``tmp``."""
    return [
        sys.executable,
        "-m",
        "levanter.main.train_simpo",
        "--config_path",
        str(shared.config),
        *shared.overrides,
        "--trainer.id",
        run_id,
        "--trainer.train_batch_size",
        "8",
        "--trainer.checkpointer.base_path",
        str(tmp / "checkpoints"),
        "--trainer.log_dir",
        str(tmp / "logs"),
        "--trainer.log_jaxprs",
        "false",
        "--trainer.log_xla_hlo",
        "false",
        # the YAML's json_file tracker writes under the checkout; a test that wants one names a temporary path
        "--trainer.tracker",
        '{"type": "json_logger"}',
        *extra,
    ]


def _run_cli(tmp: Path, name: str, command: list[str], preexec_fn=None) -> tuple[int, str]:
    result = subprocess.run(
        command,
        cwd=REPO,
        preexec_fn=preexec_fn,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "WANDB_DIR": str(tmp)},
    )
    (tmp / f"{name}.log").write_text(result.stdout)
    return result.returncode, result.stdout


def _snapshot(*roots: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p): (p.read_bytes(), p.stat().st_mtime_ns)
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---- finished runs ----

FINISHED_STEPS = 2


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, shared_setup):
    """Two short runs to the end and a rerun of the first; the second tracks with wandb (disabled), whose atexit
    teardown used to end every process with a traceback."""
    tmp = tmp_path_factory.mktemp("finished")

    def command(run_id: str, tracker: dict) -> list[str]:
        trackers = [{"type": "json_logger"}, {"type": "json_file", "output_path": str(tmp / "runs" / run_id)}, tracker]
        return _cli(
            tmp, shared_setup, run_id,
            "--trainer.num_train_steps", str(FINISHED_STEPS),
            "--trainer.tracker", json.dumps([t for t in trackers if t]),
            # the periodic export falls on the last step too, where Levanter's final forced hooks export again
            "--hf_save_path", str(tmp / "hf"),
            "--hf_save_steps", str(FINISHED_STEPS),
        )  # fmt: skip

    runs = {"first": _run_cli(tmp, "first", command("first", {}))}
    outputs = (tmp / "checkpoints" / "first", tmp / "hf" / "first", tmp / "runs" / "first")
    before_rerun = _snapshot(*outputs)
    runs["rerun"] = _run_cli(tmp, "rerun", command("first", {}))
    runs["second"] = _run_cli(tmp, "second", command("second", {"type": "wandb", "mode": "disabled", "tags": ["dpo"]}))
    return {"tmp": tmp, "runs": runs, "before_rerun": before_rerun, "after_rerun": _snapshot(*outputs)}


def test_finished_runs_exit_0_without_a_traceback(finished_runs):
    for name, (status, output) in finished_runs["runs"].items():
        assert status == 0, f"{name} exited {status}:\n{output[-4000:]}"
        assert not [s for s in CRASH_SIGNS if s in output], f"{name}:\n{output[-4000:]}"


def test_rerunning_a_finished_run_says_so_and_changes_nothing(finished_runs):
    _, output = finished_runs["runs"]["rerun"]
    assert f"Run first already finished: its checkpoint holds {FINISHED_STEPS} steps of {FINISHED_STEPS}" in output
    assert "Saving checkpoint" not in output and "Saving HF-compatible checkpoint" not in output
    before, after = finished_runs["before_rerun"], finished_runs["after_rerun"]
    assert any(path.endswith("eval_results.json") for path in before)
    assert after == before
    results = json.loads((finished_runs["tmp"] / "runs" / "first" / "eval_results.json").read_text())
    assert results["train/loss"] > 0


def test_the_final_hf_export_is_written_once(finished_runs):
    _, output = finished_runs["runs"]["first"]
    last = finished_runs["tmp"] / "hf" / "first" / f"step-{FINISHED_STEPS - 1}"
    assert output.count(f"Saving HF-compatible checkpoint to {last}\n") == 1
    assert (last / "config.json").exists()


# ---- preemption ----


@pytest.fixture(scope="module")
def preempted_runs(tmp_path_factory, shared_setup):
    """A run SIGTERMed while step FREEZE_AT's hooks run, then resumed; and an uninterrupted run to compare."""
    tmp = tmp_path_factory.mktemp("preempted")
    preempted = run_overrides("preempted")
    child = ChildRuns(tmp, shared_setup, [{"name": "sigtermed", "overrides": preempted, "freeze_at_step": FREEZE_AT}])
    child.wait_for_freeze()
    child.process.send_signal(signal.SIGTERM)
    sigtermed = child.collect()["sigtermed"]
    status, log = child.process.returncode, child.log()
    checkpoints = sorted(p.name for p in (tmp / "checkpoints" / "preempted").glob("step-*"))
    later = tmp / "later"
    later.mkdir()
    (later / "checkpoints").symlink_to(tmp / "checkpoints")
    resuming = ChildRuns(later, shared_setup, [
        {"name": "resumed", "overrides": preempted},
        {"name": "reference", "overrides": run_overrides("reference")},
    ])  # fmt: skip
    results = resuming.collect()
    return {
        "tmp": later, "status": status, "log": log, "sigtermed": sigtermed["steps"], "checkpoints": checkpoints,
        "resumed": results["resumed"]["steps"], "resumed_log": resuming.log(),
        "reference": results["reference"]["steps"],
    }  # fmt: skip


def test_sigterm_saves_a_checkpoint_at_the_next_step_boundary_and_exits_0(preempted_runs):
    assert preempted_runs["status"] == 0, preempted_runs["log"][-4000:]
    assert f"Run preempted preempted: saved checkpoint step-{FREEZE_AT} at the step boundary" in preempted_runs["log"]
    assert sorted(train_losses(preempted_runs["sigtermed"])) == list(range(FREEZE_AT + 1))
    assert preempted_runs["checkpoints"] == [f"step-{SAVE_EVERY}", f"step-{FREEZE_AT}"]


def test_the_resume_after_sigterm_loses_no_step_and_ends_bit_identical(preempted_runs):
    assert f"Resuming SimPO training from step {FREEZE_AT + 1}" in preempted_runs["resumed_log"]
    reference = train_losses(preempted_runs["reference"])
    resumed = train_losses(preempted_runs["resumed"])
    assert sorted(resumed) == list(range(FREEZE_AT + 1, STEPS))
    assert resumed == {s: reference[s] for s in resumed}
    final = [jax.tree.leaves(final_model(preempted_runs["tmp"], run_id)) for run_id in ("reference", "preempted")]
    assert len(final[0]) == len(final[1]) > 0
    for a, b in zip(*final):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- one writer ----


def test_a_second_process_with_the_same_run_id_is_refused_with_the_holders_host_and_pid(tmp_path, shared_setup):
    holding = {"name": "holder", "overrides": run_overrides("shared"), "freeze_at_step": 0}
    holder = ChildRuns(tmp_path, shared_setup, [holding])
    try:
        holder.wait_for_freeze()
        second = _cli(tmp_path, shared_setup, "shared", "--trainer.num_train_steps", "2")
        status, output = _run_cli(tmp_path, "second", second)
    finally:
        holder.close()
    assert status != 0, output[-4000:]
    assert f"leased by host {socket.gethostname()} pid {holder.process.pid}" in output, holder.log()[-6000:]
    assert "Saving checkpoint" not in output


# ---- refused before the run starts ----


@pytest.mark.parametrize("run_id", ["../../escaped_run", "../escaped_run", "/abs/path", "a/b", ".."])
def test_run_ids_that_are_not_plain_names_are_refused(tmp_path, run_id):
    config = tiny_config(tmp_path, "--trainer.id", run_id)
    with pytest.raises(ValueError, match=r"trainer.id .* must be a plain name"):
        train_simpo.validate_config(config)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trainer.num_train_steps", "0"], "trainer.num_train_steps must be at least 1, got 0"),
        (["--gamma_beta_ratio", "1e38"], r"gamma_beta_ratio must be within \+-100, got 1e\+38"),
        (["--gamma_beta_ratio", "-101"], r"gamma_beta_ratio must be within \+-100, got -101"),
        (["--beta", "1e4"], "beta must be at most 1000, got 10000"),
    ],
)
def test_absurd_budgets_and_loss_scales_are_config_errors(tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        train_simpo.validate_config(tiny_config(tmp_path, *args))


def test_the_edges_of_the_loss_scale_bounds_are_accepted(tmp_path):
    train_simpo.validate_config(tiny_config(tmp_path, "--beta", "1000", "--gamma_beta_ratio", "-100"))


def test_an_unwritable_export_path_stops_the_run_before_its_first_step(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    config = tiny_config(tmp_path, "--trainer.id", "unwritable", "--hf_save_path", str(blocker / "hf"))
    with pytest.raises(ValueError, match=f"hf_save_path: cannot write to {blocker / 'hf'}"):
        train_simpo.main(config)
    assert not list((tmp_path / "checkpoints").rglob("step-*"))


def _acquired_saying(lease: RunLease) -> list[str]:
    """Takes ``lease``; returns what the lease module logged meanwhile (Levanter resets the root logging handlers,
    so caplog may not see the records)."""
    said = TrackedMetrics()
    logging.getLogger("levanter.simpo.run.lease").addHandler(said)
    try:
        lease.acquire()
    finally:
        logging.getLogger("levanter.simpo.run.lease").removeHandler(said)
    return said.messages


def test_the_lease_works_through_fsspec_and_a_dead_holders_lease_is_taken_over(tmp_path):
    # fsspec's in-memory filesystem stands for an object store: the lease goes through the same fsspec calls
    directory = f"memory://{tmp_path}/checkpoints/run"
    first = RunLease(directory, "run")
    first.acquire()
    with pytest.raises(RunLeaseHeldError, match=f"leased by host {socket.gethostname()} pid {os.getpid()} since"):
        RunLease(directory, "run").acquire()
    first.release()

    # a lease naming a process that has exited: the next start takes it over and says so
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(exited.stdout)
    fs, path = fsspec.core.url_to_fs(f"{directory}/lease.json")
    record = {"run_id": "run", "host": socket.gethostname(), "pid": dead_pid, "process_started": 0.0, "renewed": 0.0}
    record["token"] = "dead"  # as a holder writes it
    fs.pipe(path, json.dumps(record).encode())
    taker = RunLease(directory, "run")
    said = _acquired_saying(taker)
    takeover = f"taking over the stale lease {directory}/lease.json of host {socket.gethostname()} pid {dead_pid}"
    assert any(takeover in m and m.endswith("(that process is gone)") for m in said), said
    assert json.loads(fs.cat(path))["pid"] == os.getpid()
    taker.release()
    assert not fs.exists(path)


def _taking_over(directory: str, monkeypatch, job: str | None, attempt: str | None) -> list[str]:
    """Takes the lease of ``directory`` as attempt ``attempt`` of job ``job``; returns what the lease logged."""
    for name, value in (("SIMPO_JOB_ID", job), ("SIMPO_JOB_ATTEMPT", attempt)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    taker = RunLease(directory, "run")
    try:
        return _acquired_saying(taker)
    finally:
        taker.release()


def test_a_restarted_job_takes_its_dead_attempts_lease_at_once_and_a_foreign_one_is_refused(tmp_path, monkeypatch):
    # a pod restarted on new hosts: the lease names a host this one cannot look into, renewed a moment ago
    directory = str(tmp_path / "checkpoints" / "run")
    os.makedirs(directory)
    path = f"{directory}/lease.json"
    now = time.time()
    held = {"run_id": "run", "host": "tpu-host-7", "pid": 12, "process_started": now - 60, "taken": now - 60,
            "renewed": now, "token": "earlier", "job": "/team/exp2101/0", "attempt": "0"}  # fmt: skip
    with open(path, "w") as f:
        json.dump(held, f)
    with pytest.raises(RunLeaseHeldError, match="leased by host tpu-host-7 pid 12"):
        _taking_over(directory, monkeypatch, "/team/other/0", "0")
    with pytest.raises(RunLeaseHeldError, match="leased by host tpu-host-7 pid 12"):
        _taking_over(directory, monkeypatch, None, None)
    said = _taking_over(directory, monkeypatch, "/team/exp2101/0", "1")
    expected = "(it belongs to attempt 0 of this job (/team/exp2101/0), which this attempt replaced)"
    assert any("taking over the stale lease" in m and m.endswith(expected) for m in said), said


def test_a_torn_lease_is_taken_over_at_once(tmp_path, monkeypatch):
    directory = str(tmp_path / "checkpoints" / "run")
    os.makedirs(directory)
    with open(f"{directory}/lease.json", "w") as f:
        f.write('{"run_id": "run", "host": "h')  # the holder was killed while writing it
    said = _taking_over(directory, monkeypatch, None, None)
    torn = "(the lease file is torn (not the JSON record a holder writes))"
    assert any("taking over the stale lease" in m and m.endswith(torn) for m in said), said


def test_sigterm_before_the_first_step_exits_0_with_nothing_to_save(tmp_path, shared_setup):
    # the run takes its lease once its SIGTERM handler is in place
    early = {"name": "early", "overrides": run_overrides("early"), "freeze_at_message": "Run early: took the lease"}
    child = ChildRuns(tmp_path, shared_setup, [early])
    child.wait_for_freeze()
    child.process.send_signal(signal.SIGTERM)
    child.collect()
    log = child.log()
    assert child.process.returncode == 0, log[-4000:]
    assert "Run early preempted (SIGTERM) before its first step here; nothing new to save" in log
    assert not list((tmp_path / "checkpoints" / "early").glob("step-*"))
    assert not (tmp_path / "checkpoints" / "early" / "lease.json").exists()


def _files_limited_to(size: int):
    """For a child process: writes past ``size`` bytes of a file fail with EFBIG, as on a disk that refuses them
    (the signal the kernel sends first, SIGXFSZ, ignored as a disk full sends none)."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))

    return limit


def test_a_disk_that_refuses_a_checkpoint_write_is_named_with_the_step_and_path(tmp_path, shared_setup):
    """Issue 21, item 7: a full disk during a save surfaced as a raw tensorstore traceback from an earlier
    asynchronous save. A file-size limit makes the disk refuse the checkpoint's array file for real (EFBIG; a full
    disk gives ENOSPC, the same path); the data cache and compilation cache are built first, unlimited."""
    built, log = _run_cli(tmp_path, "warm", _cli(tmp_path, shared_setup, "warm", "--trainer.num_train_steps", "1"))
    assert built == 0, log[-3000:]
    arrays = max(
        (p for p in (tmp_path / "checkpoints" / "warm").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    limit = arrays.stat().st_size // 2  # every other file of the run is smaller
    every_2 = ["--trainer.checkpointer.keep", '[{"every": 2}]']
    refused = _cli(tmp_path, shared_setup, "refused", "--trainer.num_train_steps", "4", *every_2)
    code, log = _run_cli(tmp_path, "refused", refused, preexec_fn=_files_limited_to(limit))
    print(log[-4000:])
    assert code == 1
    checkpoints = tmp_path / "checkpoints" / "refused"
    match = re.search(
        r"DiskRefusedWriteError: The disk refused a write: file too large \(a file-size limit\) writing checkpoint "
        rf"step-(\d+) to {re.escape(str(checkpoints))}/step-\1 \(",
        log,
    )
    assert match, log[-4000:]
    assert not (checkpoints / f"step-{match[1]}" / "metadata.json").exists()
    assert "Free space there (or point the output elsewhere) and rerun the same command" in log
    # the rerun, with room, resumes or starts over as its checkpoints allow, and finishes
    code, log = _run_cli(tmp_path, "rerun", _cli(tmp_path, shared_setup, "refused", "--trainer.num_train_steps", "4"))
    assert code == 0, log[-4000:]


def test_a_run_killed_during_its_first_save_starts_over_on_the_rerun(tmp_path, shared_setup):
    """Issue 21, item 2: SIGKILL as the run's first checkpoint save begins (its step directory and record written,
    no array, no metadata.json) made every rerun exit 1 with "none can be resumed from ... Starting over would
    overwrite them". The rerun now moves the unfinished save aside and trains from step 0."""
    first_save = {
        "name": "killed",
        "overrides": run_overrides("first_save"),
        # Levanter's "Saving checkpoint at step N to PATH", logged after the record and before the arrays
        "freeze_at_message": f" to {tmp_path / 'checkpoints' / 'first_save'}/step-",
    }
    child = ChildRuns(tmp_path, shared_setup, [first_save])
    child.wait_for_freeze()
    child.kill()
    checkpoints = tmp_path / "checkpoints" / "first_save"
    (unfinished,) = [p for p in checkpoints.iterdir() if p.name.startswith("step-")]
    assert not (unfinished / "metadata.json").exists()

    rerun = ChildRuns(tmp_path, shared_setup, [{"name": "rerun", "overrides": run_overrides("first_save")}])
    result = rerun.collect()["rerun"]
    log = "\n".join(result["messages"]) + rerun.log()
    assert f"Not resuming from checkpoint {unfinished}: incomplete: no metadata.json" in log
    assert (
        "holds a finished save (no metadata.json in any: a save was interrupted); moving them aside and starting"
        in (log)
    )
    assert f"Moved {unfinished} aside to {checkpoints}/superseded/{unfinished.name}." in log
    assert sorted(train_losses(result["steps"])) == list(range(STEPS))
    assert (checkpoints / f"step-{STEPS - 1}" / "metadata.json").exists()
