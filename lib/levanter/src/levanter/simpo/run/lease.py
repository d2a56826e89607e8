# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The lease that makes one process the only writer of a run's checkpoint directory: ``lease.json``, created
exclusively (``O_EXCL`` on local disk; object stores through fsspec with a create-if-absent open where the driver
has one, else write then read back), renewed by a thread of its own, released when the run ends, and taken over
when its holder is gone: a dead process on this host, an earlier attempt of the same scheduler job (a restarted pod
lands on other hosts, where the holder's pid means nothing), a lease not renewed for ``LEASE_STALE_AFTER``, or a
torn lease file."""

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

import fsspec
import psutil

logger = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
LEASE_RENEW_EVERY = datetime.timedelta(minutes=1)
LEASE_STALE_AFTER = datetime.timedelta(minutes=10)
"""A lease held from another host, whose process this one cannot look up, is stale when not renewed for this long.
The holder renews it every ``LEASE_RENEW_EVERY`` from a thread of its own, whatever the run is doing (building the
data cache, compiling, saving), until it releases it."""


class RunLeaseHeldError(RuntimeError):
    """Another live process holds this run's checkpoint directory."""


def job_attempt() -> tuple[str | None, str | None]:
    """The scheduler job this process runs in, the same for every attempt of it, and this attempt: ``SIMPO_JOB_ID``
    (and ``SIMPO_JOB_ATTEMPT``) when an operator sets them, else Iris's task id (``/user/job/0:2`` is attempt 2 of
    task ``/user/job/0``), else Slurm's job id and restart count; ``(None, None)`` outside a scheduler."""
    if os.environ.get("SIMPO_JOB_ID"):
        return os.environ["SIMPO_JOB_ID"], os.environ.get("SIMPO_JOB_ATTEMPT")
    iris_task = os.environ.get("IRIS_TASK_ID")
    if iris_task:
        task, _, attempt = iris_task.rpartition(":")
        return (task, attempt) if task else (iris_task, None)
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}", os.environ.get("SLURM_RESTART_COUNT", "0")
    return None, None


def _boot_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux); None where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the fields after the command name (which may hold spaces) start at field 3; starttime is field 22
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_identity(pid: int) -> dict:
    """What a lease records of its holder's process, so that a recycled pid is not taken for it."""
    return {"pid": pid, "process_started": psutil.Process(pid).create_time(), "process_ticks": _boot_ticks(pid)}


def _process_alive(pid: int, started: float | None, ticks: int | None = None) -> bool:
    # a recycled pid belongs to a process started later than the holder. The start in ticks since boot is exact;
    # psutil's create_time adds the boot time, which moves when the wall clock is stepped (seen on a VM: a live
    # holder judged gone), so it only serves a record without ticks
    now_ticks = _boot_ticks(pid) if ticks is not None else None
    if now_ticks is not None:
        return now_ticks == ticks
    try:
        process = psutil.Process(pid)
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False


class RunLease:
    """An exclusive lease on a run's checkpoint directory: ``lease.json`` names the holder's host and pid.

    Taken with an exclusive create (``open(..., "xb")``: O_EXCL on local disk, a create-if-absent precondition on
    object stores whose fsspec driver supports it). A lease whose holder is gone is taken over with a log line: on
    the same host the holder's pid (and its start time) says so at once; from another host, a lease not renewed for
    ``LEASE_STALE_AFTER``.
    """

    def __init__(self, checkpoint_dir: str, run_id: str, *, file: str = LEASE_FILE, label: str | None = None):
        self.path = f"{checkpoint_dir.rstrip('/')}/{file}"
        self.run_id = run_id
        self.label = label if label is not None else f"Run {run_id}"
        """How log lines name the holder of this lease."""
        self._fs, self._plain = fsspec.core.url_to_fs(self.path)
        self._record = {
            "run_id": run_id,
            "host": socket.gethostname(),
            **process_identity(os.getpid()),
            "token": uuid.uuid4().hex,
        }
        job, attempt = job_attempt()
        # without an attempt number, each process is an attempt of its own: a restart is never the holder itself
        self._record["job"] = job
        self._record["attempt"] = attempt if attempt is not None else f"{socket.gethostname()}:{os.getpid()}"
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> None:
        holder = self.try_acquire()
        if holder is not None:
            raise RunLeaseHeldError(
                f"Run {self.run_id} is already running: its checkpoint directory is leased by host "
                f"{holder.get('host')} pid {holder.get('pid')}{_of_job(holder)} since "
                f"{_when(holder.get('taken'))} ({self.path}). Two writers would overwrite each other's "
                "checkpoints and exports; wait for that process to end or stop it, or use another trainer.id. "
                f"A lease on another host that is not renewed is taken over after "
                f"{LEASE_STALE_AFTER.total_seconds() / 60:.0f} minutes."
            )

    def try_acquire(self) -> dict | None:
        """Takes the lease (taking over a stale one) and returns None, or returns the record of its live holder."""
        self._fs.makedirs(self._plain.rsplit("/", 1)[0], exist_ok=True)
        self._record["taken"] = time.time()
        for _ in range(3):
            if self._create():
                host, pid = self._record["host"], self._record["pid"]
                logger.info(f"{self.label}: took the lease {self.path} (host {host}, pid {pid})")
                self._renewer = threading.Thread(target=self._renew, name="simpo-run-lease", daemon=True)
                self._renewer.start()
                return None
            holder = self._read()
            if holder is None:
                continue  # released between our create and read
            stale = self._staleness(holder)
            if stale is None:
                if not holder:
                    continue  # being written or just removed: look again
                return holder
            logger.warning(
                f"{self.label}: taking over the stale lease {self.path} of host {holder.get('host')} pid "
                f"{holder.get('pid')} ({stale})"
            )
            # another contender may have taken it over meanwhile: remove only the record judged stale
            if self._read() == holder:
                with contextlib.suppress(FileNotFoundError):
                    self._fs.rm(self._plain)
        raise RunLeaseHeldError(f"{self.label}: could not take the lease {self.path}; another process keeps at it")

    def _renew(self) -> None:
        while not self._stop_renewing.wait(LEASE_RENEW_EVERY.total_seconds()):
            try:
                self._write()
            except Exception:  # a storage hiccup; the next renewal may succeed, and the lease is stale only after many
                logger.exception(f"{self.label}: could not renew the lease {self.path}")

    def release(self) -> None:
        # the renewing thread is joined here, so none is left at interpreter shutdown
        if self._renewer is not None:
            self._stop_renewing.set()
            self._renewer.join()
            self._renewer = None
        holder = self._read()
        if holder is not None and holder.get("token") == self._record["token"]:
            self._fs.rm(self._plain)

    def _create(self) -> bool:
        record = self._stamped()
        try:
            with self._fs.open(self._plain, "xb") as f:
                f.write(record)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):
            # a driver without exclusive create: write, then read back to see whose lease stands
            if self._fs.exists(self._plain):
                return False
            self._write()
            return (self._read() or {}).get("token") == self._record["token"]
        return True

    def _stamped(self) -> bytes:
        return json.dumps({**self._record, "renewed": time.time()}).encode()

    def _write(self) -> None:
        with self._fs.open(self._plain, "wb") as f:
            f.write(self._stamped())

    def _read(self) -> dict | None:
        try:
            with self._fs.open(self._plain, "rb") as f:
                record = json.loads(f.read() or b"{}")
            return record if isinstance(record, dict) else {}
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # a torn write: stale at once (``_staleness``)

    def _staleness(self, holder: dict) -> str | None:
        """Why ``holder`` no longer holds the lease, or None if it may still."""
        if not holder:
            time.sleep(1.0)  # a lease being created is empty for an instant; a torn one stays so
            if self._read() != holder:
                return None
            return "the lease file is torn (not the JSON record a holder writes)"
        if holder.get("host") == self._record["host"] and isinstance(holder.get("pid"), int):
            if _process_alive(holder["pid"], holder.get("process_started"), holder.get("process_ticks")):
                return None
            return "that process is gone"
        job, attempt = self._record["job"], self._record["attempt"]
        if job is not None and holder.get("job") == job and holder.get("attempt") != attempt:
            # a scheduler runs one attempt of a job at a time: this one replaced the holder's
            return f"it belongs to attempt {holder.get('attempt')} of this job ({job}), which this attempt replaced"
        renewed = holder.get("renewed")
        if renewed is None:
            renewed = self._fs.modified(self._plain).timestamp()
        age = time.time() - renewed
        if age > LEASE_STALE_AFTER.total_seconds():
            return f"not renewed for {age:.0f} s"
        return None


def _of_job(holder: dict) -> str:
    if holder.get("job") is None:
        return ""
    return f" (job {holder['job']}, attempt {holder.get('attempt')})"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "an unknown time"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def held_by(holder: dict) -> str:
    """``host H pid P (job J, attempt A) since T``: who holds a lease, for messages."""
    return f"host {holder.get('host')} pid {holder.get('pid')}{_of_job(holder)} since {_when(holder.get('taken'))}"
