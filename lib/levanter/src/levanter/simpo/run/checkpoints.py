# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""What a SimPO checkpoint was trained with, whether it is intact, and which one a run resumes from.

Levanter's checkpoint holds the training state only, and its loader takes the newest directory with a
``metadata.json``: a resume with another objective or data continues silently, and damaged arrays load as they are.
Next to each checkpoint's arrays this module writes ``simpo_record.json``: the training-relevant configuration
(every field of ``TrainSimpoConfig`` except those in ``MAY_CHANGE``), the identity of the data, and two checksums
per saved array, computed on device as integer reductions over the array's bits. Levanter's ``metadata.json``
stays the commit marker: a checkpoint counts only when it has both files.

On resume, ``resume_verified`` walks the run's checkpoints newest first, says why it skips each unusable one
(incomplete, damaged, diverged, unreadable, checksums differ), refuses a configuration change with a diff unless
``allow_config_change`` is set, and resumes from the newest checkpoint whose arrays match their checksums, moving
the skipped newer ones into ``superseded/``.
"""

import contextlib
import datetime
import errno
import fnmatch
import json
import logging
import os
import re
from typing import Any, Callable, Iterator, Mapping, TypeVar

import draccus
import fsspec
import jax
import jax.numpy as jnp
from rigging.filesystem.atomic import atomic_rename
from rigging.filesystem.storage_path import StoragePath, prefix_join

from levanter.simpo.run.hosts import DECISION_TIMEOUT_SECONDS, agreed
from levanter.trainer_state import TrainerState
from levanter.utils.jax_utils import multihost_allgather_sync

logger = logging.getLogger(__name__)

S = TypeVar("S", bound=TrainerState)

RECORD = "simpo_record.json"

MAY_CHANGE = (
    # how long and how often: a run may be extended, evaluated or checkpointed differently
    "trainer.num_train_steps",
    "trainer.steps_per_eval",
    "trainer.max_eval_batches",
    "trainer.checkpointer",
    "trainer.load_checkpoint",
    "trainer.load_checkpoint_path",
    "trainer.id",
    # where it runs and what it reports
    "trainer.tracker",
    "trainer.wandb",
    "trainer.log_dir",
    "trainer.log_jaxprs",
    "trainer.log_xla_hlo",
    "trainer.profiler",
    "trainer.xla_dump_upload",
    "trainer.progress_watchdog",
    "trainer.watch",
    "trainer.jax_compilation_cache_dir",
    "trainer.distributed",
    "trainer.require_accelerator",
    "trainer.shutdown_at_exit",
    "trainer.crash_on_nan",
    "trainer.crash_on_inf",
    "run_initial_eval",
    "samples",
    # the device mesh: Levanter reshards a checkpoint onto another one
    "trainer.mesh",
    "trainer.per_device_parallelism",
    "trainer.per_device_eval_parallelism",
    # where the data cache lives (what is in it is the data identity's business)
    "data.cache_dir",
    "data.cache_catalog",
    "data.cache_options",
    "data.auto_build_caches",
    "data.components.*.cache_dir",
    "data.components.*.source.cache_dir",
    # exports
    "hf_save_path",
    "hf_upload",
    "hf_save_steps",
    "hf_save_dtype",
    "hf_generation_eos_token_ids",
    "peft_save_path",
    "peft_hf_upload",
    "merged_hf_save_path",
    "merged_hf_upload",
    # the run's safety switches
    "divergence",
    "allow_config_change",
)
"""The ``TrainSimpoConfig`` fields a resume may change freely (dotted names, ``*`` matching any one part, each
covering the fields under it): every other field is part of what the checkpoint was trained with."""


class CheckpointMismatchError(ValueError):
    """The run's configuration differs from the one its checkpoint was trained with."""


class NoUsableCheckpointError(RuntimeError):
    """The run has checkpoints, but none is complete, intact and healthy."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat
    return {prefix[:-1]: tree}


def _may_change(field: str) -> bool:
    # a pattern covers the fields nested under it too
    return any(fnmatch.fnmatchcase(field, p) or fnmatch.fnmatchcase(field, f"{p}.*") for p in MAY_CHANGE)


def training_identity(config, data_identity: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``config`` a resume must keep, flattened to dotted names, and ``data_identity`` (what the data
    cache was built from) under ``data_identity.``."""
    encoded = json.loads(json.dumps(draccus.encode(config), default=str))
    identity = {k: v for k, v in _flatten(encoded).items() if not _may_change(k)}
    identity |= _flatten(json.loads(json.dumps(dict(data_identity), default=str)), "data_identity.")
    return identity


def identity_diff(saved: Mapping[str, Any], current: Mapping[str, Any], limit: int = 12) -> list[str]:
    """One line per differing field, ``field: saved -> current``."""
    missing = object()
    lines = [
        f"{k}: {saved.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}"
        for k in sorted(saved.keys() | current.keys())
        if saved.get(k, missing) != current.get(k, missing)
    ]
    return lines if len(lines) <= limit else lines[:limit] + [f"... and {len(lines) - limit} more"]


def _bits_checksum(x: jax.Array) -> jax.Array:
    # integer sums wrap identically on any device and sharding; the position-weighted sum catches moved values
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}")).astype(jnp.uint32)
    weights = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
    return [_bits_checksum(leaf) for leaf in leaves]


def state_checksums(tree) -> dict[str, list[int]]:
    """Two 32-bit checksums per array of ``tree`` (what Levanter saves of a trainer state), by tree path."""
    paths_and_leaves = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]
    arrays = [(p, x) for p, x in paths_and_leaves if isinstance(x, jax.Array)]
    sums = jax.device_get(_checksums([x for _, x in arrays]))
    return {p: [int(v) for v in s] for (p, _), s in zip(arrays, sums)}


def _exists(path: str) -> bool:
    return StoragePath(path).exists()


def _read_json(path: str) -> dict | None:
    if not _exists(path):
        return None
    return json.loads(StoragePath(path).read_text())


def _write_json(path: str, content: dict) -> None:
    storage = StoragePath(path)
    if storage.is_remote:
        # an object store publishes the object whole when the write closes
        storage.write_text(json.dumps(content))
    else:
        with atomic_rename(path) as temporary:
            StoragePath(temporary).write_text(json.dumps(content))


_STEP_DIR = re.compile(r"step-(\d+)$")


def checkpoint_dirs(roots: list[str]) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``step-N`` directory under ``roots``, complete or not, newest first."""
    found = []
    for root in roots:
        named = _STEP_DIR.match(os.path.basename(root.rstrip("/")))
        if named and _exists(root):  # a root that is one checkpoint, e.g. trainer.load_checkpoint_path
            found.append((int(named.group(1)), root))
            continue
        fs, plain = fsspec.core.url_to_fs(root)
        try:
            entries = fs.ls(plain, detail=True)
        except FileNotFoundError:
            continue
        for entry in entries:
            name = os.path.basename(entry["name"].rstrip("/"))
            match = _STEP_DIR.match(name)
            if entry["type"] == "directory" and match:
                found.append((int(match.group(1)), prefix_join(root, name)))
    return sorted(found, reverse=True)


class CheckpointRecords:
    """Makes ``simpo_record.json`` part of every save of Levanter's checkpointer.

    The checkpointer decides whether to save at a step on process 0 and tells every process; each save then comes
    through ``save_checkpoint`` on every process. Wrapped here, every process computes the checksums of the tree
    being saved (a reduction over the sharded state) and process 0 writes the record into the step's directory
    before the arrays' asynchronous write begins. Levanter writes ``metadata.json`` last, so a committed checkpoint
    always has its record, whatever a later hook of the same step does."""

    def __init__(self, checkpointer, roots: list[str], identity: Mapping[str, Any]):
        self._roots = roots
        self._identity = dict(identity)
        self._base_path = checkpointer.base_path
        self._save = checkpointer.save_checkpoint
        # an attribute of this one instance, not a change to Levanter's class
        checkpointer.save_checkpoint = self._save_with_record

    def _save_with_record(
        self, tree, step, destination, commit_callback=None, *, is_temporary=False, base_path_override=None
    ):
        base = base_path_override if base_path_override is not None else self._base_path
        path = prefix_join(base, destination)
        record = {"step": int(step), "identity": self._identity, "checksums": state_checksums(tree)}
        if jax.process_index() == 0:
            fs, plain = fsspec.core.url_to_fs(path)
            fs.makedirs(plain, exist_ok=True)
            _write_json(prefix_join(path, RECORD), record)
        return self._save(
            tree, step, destination, commit_callback, is_temporary=is_temporary, base_path_override=base_path_override
        )

    def mark_diverged(self, step: int) -> None:
        """Marks the checkpoints holding the parameters that made step ``step``'s loss diverge, and later ones, so
        no resume starts from them."""
        if jax.process_index() != 0:
            return
        for saved_step, path in checkpoint_dirs(self._roots):
            record_path = prefix_join(path, RECORD)
            record = _read_json(record_path) if saved_step >= step - 1 else None
            if record is not None:
                _write_json(record_path, {**record, "diverged_at_step": step})


def _problem(path: str) -> tuple[str | None, dict | None]:
    """Why the checkpoint at ``path`` cannot be resumed from (None if it may be), and its record."""
    try:
        record = _read_json(prefix_join(path, RECORD))
    except ValueError as e:
        return f"damaged: its {RECORD} is not valid JSON ({e})", None
    if record is not None and not isinstance(record, dict):
        return f"damaged: its {RECORD} is not a JSON object", None
    if not _exists(prefix_join(path, "metadata.json")):
        # Levanter writes metadata.json last: without it the save never finished, whatever else is there
        return "incomplete: no metadata.json (its save never finished, or the file was removed)", None
    if record is None:
        return f"unverifiable: no {RECORD} (the run stopped before recording it)", None
    if "diverged_at_step" in record:
        return f"diverged: saved after the loss diverged at step {record['diverged_at_step']}", record
    return None, record


def _checksum_problem(saved: Mapping[str, list[int]], loaded: Mapping[str, list[int]]) -> str | None:
    if saved.keys() != loaded.keys():
        return f"damaged: it holds arrays {sorted(saved.keys() ^ loaded.keys())[:4]} the record does not list"
    differing = [k for k in saved if list(saved[k]) != list(loaded[k])]
    if differing:
        shown = ", ".join(differing[:4]) + (f" and {len(differing) - 4} more" if len(differing) > 4 else "")
        return f"damaged: the checksums of {len(differing)} of {len(saved)} arrays differ ({shown})"
    return None


def _move_aside(paths: list[str]) -> None:
    """Moves checkpoints newer than the one a run resumes from into ``superseded/`` next to them: their steps are
    trained again, and Levanter cannot save into a damaged checkpoint's directory."""
    if jax.process_index() != 0:
        return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    for path in paths:
        fs, plain = fsspec.core.url_to_fs(path)
        parent, name = os.path.split(plain.rstrip("/"))
        destination = f"{parent}/superseded/{name}.{stamp}"
        fs.makedirs(f"{parent}/superseded", exist_ok=True)
        fs.mv(plain, destination, recursive=True)
        logger.warning(f"Moved {path} aside to {destination}: this run trains its step again")


def _mismatch(path: str, diff: list[str]) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"Checkpoint {path} was trained with another configuration than this run's:\n  "
        + "\n  ".join(diff)
        + "\nResuming would mix two trainings in one run. Start a new run (another --trainer.id), or pass "
        "--allow_config_change true to continue this one deliberately with the new values."
    )


def _read_checkpoints(roots: list[str], identity: Mapping[str, Any]) -> list[dict]:
    """Process 0's reading of the run's checkpoints, newest first: each with why it cannot be resumed from, or
    with its configuration diff and recorded checksums."""
    found = []
    for step, path in checkpoint_dirs(roots):
        problem, record = _problem(path)
        if problem is None and record is not None and not isinstance(record.get("checksums"), Mapping):
            problem = f"damaged: its {RECORD} holds no checksums"
        if problem is not None:
            # committed: Levanter finished its save (metadata.json, written last); an uncommitted one holds no
            # training a resume could continue
            committed = _exists(prefix_join(path, "metadata.json"))
            found.append({"step": step, "path": path, "problem": problem, "committed": committed})
        else:
            assert record is not None
            diff = identity_diff(record.get("identity") or {}, identity)
            found.append({"step": step, "path": path, "diff": diff, "checksums": record["checksums"]})
    return found


def resume_verified(
    trainer, initial_state: Callable[[bool], S], identity: Mapping[str, Any], *, allow_config_change: bool
) -> S:
    """``initial_state(resuming)`` (which calls ``trainer.initial_state``) loaded from the run's newest checkpoint
    that is complete, healthy and intact and trained with ``identity``, or from scratch when the run has no
    checkpoint. Process 0 reads the checkpoints and every process acts on that one reading; a checkpoint that fails
    to load on any process is skipped by all."""
    if trainer.config.load_checkpoint is False:
        return initial_state(False)
    roots = trainer.checkpoint_search_paths
    checkpoints = agreed("which checkpoints the run has", lambda: _read_checkpoints(roots, identity))
    if not checkpoints:
        trainer.config.load_checkpoint = False  # every process starts fresh, whatever its own view of storage
        return initial_state(False)
    skipped: list[tuple[str, str]] = []

    def skip(path: str, why: str):
        logger.warning(f"Not resuming from checkpoint {path}: {why}")
        skipped.append((path, why))

    for checkpoint in checkpoints:
        step, path = checkpoint["step"], checkpoint["path"]
        if "problem" in checkpoint:
            skip(path, checkpoint["problem"])
            continue
        diff = checkpoint["diff"]
        if diff and not allow_config_change:
            raise _mismatch(path, diff)
        if diff:
            logger.warning(
                f"Resuming from {path} with a deliberate configuration change (allow_config_change):\n  "
                + "\n  ".join(diff)
            )
        # pin Levanter's loader to this checkpoint instead of the newest directory with a metadata.json
        trainer.config.load_checkpoint_path = path
        trainer.config.load_checkpoint = True
        state, failure = None, None
        try:
            state = initial_state(True)
        except Exception as e:  # a damaged file fails inside tensorstore with many error types
            failure = f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        # the others may still be loading a large state: wait as long as for any decision
        failures = (
            multihost_allgather_sync(failure, timeout=DECISION_TIMEOUT_SECONDS)
            if jax.process_count() > 1
            else [failure]
        )
        failure = next((f for f in failures if f is not None), None)
        if failure is not None or state is None:
            skip(path, failure or "unreadable")
            continue
        problem = _checksum_problem(checkpoint["checksums"], state_checksums(state.saveable_state))
        if problem is not None:
            skip(path, problem)
            continue
        if skipped:
            logger.warning(
                f"Resuming from {path}, the newest verified checkpoint (step {step}), instead of newer ones"
            )
            _move_aside([p for p, _ in skipped])
        else:
            logger.info(f"Checkpoint {path} verified: configuration and array checksums match")
        return state
    if not any(c.get("committed", True) for c in checkpoints):
        # only saves that never finished (a kill or a full disk during the run's first save): nothing trained is at
        # stake, and refusing would stop every restart of the job
        logger.warning(
            f"None of this run's {len(skipped)} checkpoint directories holds a finished save (no metadata.json in "
            "any: a save was interrupted); moving them aside and starting over from step 0"
        )
        _move_aside([p for p, _ in skipped])
        trainer.config.load_checkpoint_path = None
        trainer.config.load_checkpoint = False
        return initial_state(False)
    raise NoUsableCheckpointError(
        "This run has checkpoints but none can be resumed from:\n  "
        + "\n  ".join(f"{p} ({why})" for p, why in skipped)
        + "\nStarting over would overwrite them: move them away or use another --trainer.id."
    )


class DiskRefusedWriteError(RuntimeError):
    """The disk refused a write of the run's (no space left, a quota or a file-size limit)."""


_REFUSALS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit)",
}
# as tensorstore and other C++ layers put them into their messages
_REFUSAL_TEXTS = {
    "No space left on device": "no space left on device",
    "Disk quota exceeded": "disk quota exceeded",
    "File too large": "file too large (a file-size limit)",
}


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, its causes and contexts, and errors carried in its arguments (Levanter's trainer raises its exit
    problems as a list), each once."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        e = pending.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        pending += [c for c in (e.__cause__, e.__context__) if c is not None]
        for arg in e.args:
            pending += [a for a in (arg if isinstance(arg, (list, tuple)) else [arg]) if isinstance(a, BaseException)]


def disk_refusal(error: BaseException) -> tuple[str, BaseException] | None:
    """Why the disk refused a write, if that is what ``error`` (or what caused it) is, and the error that says so."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _REFUSALS:
            return _REFUSALS[e.errno], e
        text = str(e)
        for marker, reason in _REFUSAL_TEXTS.items():
            if marker in text:
                return reason, e
    return None


def _unfinished_save(roots: list[str]) -> tuple[int, str] | None:
    """The oldest save of this run without its commit marker: the first that failed (a resumed run has moved any
    older unfinished ones aside; a later one may be in flight when the failure surfaces)."""
    for step, path in reversed(checkpoint_dirs(roots)):
        if not _exists(prefix_join(path, "metadata.json")):
            return step, path
    return None


@contextlib.contextmanager
def disk_refusals_named(roots: Callable[[], list[str]]) -> Iterator[None]:
    """Raises a ``DiskRefusedWriteError`` naming the reason, the checkpoint step and its path for an error caused by
    a full disk (or a quota, or a file-size limit), which Levanter surfaces as a tensorstore traceback from an
    earlier asynchronous save, at a later save or at the end of the run."""
    try:
        yield
    except Exception as error:
        refusal = disk_refusal(error)
        if refusal is None:
            raise
        reason, cause = refusal
        detail = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else type(cause).__name__
        try:
            unfinished = _unfinished_save(roots())
        except Exception:  # the listing may fail on the same disk; the reason is what matters
            unfinished = None
        if unfinished is not None:
            step, path = unfinished
            where = f"writing checkpoint step-{step} to {path}"
        elif isinstance(cause, OSError) and cause.filename:
            where = f"writing {cause.filename}"
        else:
            where = f"writing under {', '.join(roots()) or 'the run outputs'}"
        raise DiskRefusedWriteError(
            f"The disk refused a write: {reason} {where} ({type(cause).__name__}: {detail}). Free space there (or "
            "point the output elsewhere) and rerun the same command: it resumes from the newest finished checkpoint"
        ) from error
