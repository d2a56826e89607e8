# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Ties a preference cache to the source files it was built from, so a run never trains on the wrong data.

Levanter identifies a cache by its directory alone: point a config at other files, or edit a file after a first
run, and the old cache is reused as it is; a cache whose build stopped half-way is resumed from whatever shards
it holds. Around Levanter's cache builder (``build_caches``), for each component of a split:

- a keyed cache (below) whose record of its sources is missing or differs is removed and built again; a finished
  cache of a component's own ``cache_dir`` whose recorded sources differ (a file added, removed, resized or with
  other content) is refused, naming what changed;
- an unfinished cache directory is removed and built again from scratch;
- a finished cache whose files changed since it was built (a chunk overwritten, a file truncated or removed) is
  removed and built again;
- a cache this run built gets ``source_identity.json``: every source file's name, size and a content digest
  (local files) or the object store's version tag (generation, ETag, checksum), read before the build; and
  ``cache_contents.json``, the same for every file of the cache. A cache found without them is never labelled
  with today's sources.

The format settings, tokenizer and chat template are the other half of a cache's identity; they are in the
cache's ledger and checked when it is opened (``levanter.data.simpo.cache``).

A component whose cache location derives from ``data.cache_dir`` (it sets no ``cache_dir`` of its own) and whose
source is a list of files has its caches keyed by what they are built from: ``<cache_dir>/<component>/<key>/<split>``,
where ``key`` is a short digest of the split's source identity and the format's cache settings (the preprocessor's
metadata: tokenizer, chat template, fields, budgets). Other files or settings build or reuse their own cache beside
the others, and switching back reuses the earlier one. A component with its own ``cache_dir`` (Marin's tokenized
caches) is used where it says, as before.

A cache is built under a build lock (``<split>.build_lock.json`` beside it, a lease naming its holder): a second
process that needs the same cache waits for the first to finish it, then reads it, instead of removing it as
unfinished.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from typing import Iterator

import fsspec
import jax
from rigging.filesystem.storage_path import prefix_join

from levanter.data.text.datasets import DatasetComponent, UrlDatasetSourceConfig, _component_cache_path
from levanter.data.text.preference import PreferenceLmDataConfig
from levanter.simpo.run.hosts import agreed
from levanter.simpo.run.lease import RunLease, held_by
from levanter.store.cache import TreeCache

from .sources import _display_name, build_caches_naming_bad_lines

logger = logging.getLogger(__name__)

IDENTITY_FILE = "source_identity.json"
CONTENTS_FILE = "cache_contents.json"
LEDGER_FILE = "shard_ledger.json"
# object-store metadata that changes whenever an object's content does
_VERSION_KEYS = ("generation", "ETag", "etag", "md5Hash", "crc32c", "content_md5", "version_id")


def _local_digest(fs, path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _file_version(fs, path: str, info: dict | None = None) -> dict:
    """A file's size and what changes with its content: a digest on local disk, the object store's version tag
    (``info``: the file's listing entry, when the caller has it)."""
    info = info if info is not None else fs.info(path)
    if "file" in fs.protocol:
        version = _local_digest(fs, path)
    else:
        version = next((str(info[k]) for k in _VERSION_KEYS if info.get(k)), str(info.get("mtime")))
    return {"size": info.get("size"), "version": version}


def source_identity(config: PreferenceLmDataConfig, name: str, split: str) -> dict[str, dict] | None:
    """``{file: {"size", "version"}}`` for a component's split, or None when its source is not a list of files."""
    component = config.components[name]
    source = component.source if isinstance(component, DatasetComponent) else None
    if not isinstance(source, UrlDatasetSourceConfig):
        return None
    files: dict[str, dict] = {}
    for url in source.urls_for_split(split):
        for opened in fsspec.open_files(url, "rb"):
            files[_display_name(opened)] = _file_version(opened.fs, opened.path)
    return files


def cache_contents(fs, path: str) -> dict[str, dict]:
    """``{relative file: {"size", "version"}}`` of everything a built cache holds (not the records beside it)."""
    root = path.rstrip("/")
    listing = fs.find(root, detail=True)  # one listing, not a request per file, on object stores
    return {
        file[len(root) + 1 :]: _file_version(fs, file, info)
        for file, info in sorted(listing.items())
        if file.rsplit("/", 1)[-1] not in (IDENTITY_FILE, CONTENTS_FILE)
    }


def _differences(built: dict[str, dict], now: dict[str, dict]) -> list[str]:
    changes = [f"{f} is no longer a source" for f in sorted(set(built) - set(now))]
    changes += [f"{f} is a new source" for f in sorted(set(now) - set(built))]
    for f in sorted(set(built) & set(now)):
        if built[f]["size"] != now[f]["size"]:
            changes.append(f"{f} changed size ({built[f]['size']} -> {now[f]['size']} bytes)")
        elif built[f]["version"] != now[f]["version"]:
            changes.append(f"{f} changed content")
    return changes


def _finished(fs, path: str) -> bool:
    ledger = f"{path}/{LEDGER_FILE}"
    if not fs.exists(ledger):
        return False
    with fs.open(ledger) as f:
        return bool(json.load(f).get("is_finished"))


def _damage(fs, path: str) -> list[str]:
    """How a finished cache's files differ from what was recorded when it was built (nothing without a record)."""
    if not fs.exists(f"{path}/{CONTENTS_FILE}"):
        return []
    with fs.open(f"{path}/{CONTENTS_FILE}") as f:
        return _differences(json.load(f), cache_contents(fs, path))


def _cache_path(config: PreferenceLmDataConfig, name: str, split: str) -> str | None:
    component = config.components[name]
    if not isinstance(component, DatasetComponent):
        return None
    return _component_cache_path(name, component, config.cache_dir, split)


def check_or_clear(
    config: PreferenceLmDataConfig, name: str, split: str, identity: dict | None, *, keyed: bool = False
) -> bool:
    """Removes an unfinished or damaged cache, and a keyed cache (see the module docstring) whose record of its
    sources is missing or differs; refuses a cache of its own ``cache_dir`` built from other sources. Returns
    whether a cache is left to reuse."""
    path = _cache_path(config, name, split)
    if path is None:
        return False
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        return False
    if not _finished(fs, fs_path):
        logger.warning(f"The {split} cache at {path} was never finished (its build stopped); building it again")
        fs.rm(fs_path, recursive=True)
        return False
    damage = _damage(fs, fs_path)
    if damage:
        logger.warning(
            f"The {split} cache at {path} changed since it was built ({'; '.join(damage[:3])}); building it again"
        )
        fs.rm(fs_path, recursive=True)
        return False
    if identity is None:
        return True
    if not fs.exists(f"{fs_path}/{IDENTITY_FILE}"):
        if keyed:
            # nothing says what it was built from: never trusted, never labelled with today's sources
            logger.warning(
                f"The {split} cache at {path} has no record of the sources it was built from (its build stopped "
                f"before recording them); building it again"
            )
            fs.rm(fs_path, recursive=True)
            return False
        return True
    with fs.open(f"{fs_path}/{IDENTITY_FILE}") as f:
        changes = _differences(json.load(f), identity)
    if changes and keyed:
        # a source changed while the cache was being built from it
        logger.warning(
            f"The {split} cache at {path} was built from other data ({'; '.join(changes[:3])}); building it again"
        )
        fs.rm(fs_path, recursive=True)
        return False
    if changes:
        raise ValueError(
            f"The {split} cache of preference component {name!r} at {path} was built from other data: "
            f"{'; '.join(changes[:5])}{' ...' if len(changes) > 5 else ''}. Its cache_dir is the component's own: "
            "delete it to rebuild it, or set another cache_dir (without one, caches are kept apart by their sources)"
        )
    return True


def recorded_identity(cache: TreeCache) -> dict | None:
    """The sources a cache was built from, as recorded beside it (None for a cache without a record)."""
    fs, path = fsspec.core.url_to_fs(cache.cache_dir)
    if not fs.exists(f"{path}/{IDENTITY_FILE}"):
        return None
    with fs.open(f"{path}/{IDENTITY_FILE}") as f:
        return json.load(f)


def _write_once(fs, path: str, record) -> None:
    if not fs.exists(path):
        with fs.open(path, "w") as f:
            json.dump(record, f, indent=2)


def _record(cache: TreeCache, identity: dict | None) -> None:
    """Records a cache this process has just built: its sources (``identity``, computed before the build) and its
    files. A cache found already built is never labelled here with today's sources."""
    fs, path = fsspec.core.url_to_fs(cache.cache_dir)
    if identity is not None:
        _write_once(fs, f"{path}/{IDENTITY_FILE}", identity)
    if not fs.exists(f"{path}/{CONTENTS_FILE}"):
        _write_once(fs, f"{path}/{CONTENTS_FILE}", cache_contents(fs, path))


KEY_LENGTH = 12
"""Hex digits of a cache key: 48 bits, for the handful of caches one cache_dir holds."""
BUILD_LOCK_SUFFIX = ".build_lock.json"
BUILD_LOCK_POLL_SECONDS = 1.0


def cache_settings(config: PreferenceLmDataConfig, component: DatasetComponent) -> dict | None:
    """What the format makes of the sources, as the cache's ledger records it (the preprocessor's metadata)."""
    build_preprocessor = getattr(component.format, "build_preprocessor", None)
    if build_preprocessor is None:
        return None
    return build_preprocessor(config.the_tokenizer).metadata


def cache_key(identity: dict, settings: dict | None) -> str:
    """A short digest of a split's sources and the format's cache settings."""
    text = json.dumps({"sources": identity, "settings": settings}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()[:KEY_LENGTH]


def _keyed_locations(config: PreferenceLmDataConfig, split: str) -> dict[str, dict]:
    """Process 0's reading of each component's sources for ``split``: ``{name: {"identity", "cache_dir"}}``, the
    ``cache_dir`` a keyed component's caches go under (None: the component's location is used as it is)."""
    locations: dict[str, dict] = {}
    for name, component in config.components.items():
        identity = source_identity(config, name, split)
        cache_dir = None
        if isinstance(component, DatasetComponent) and component.cache_dir is None and config.cache_dir and identity:
            key = cache_key(identity, cache_settings(config, component))
            cache_dir = prefix_join(prefix_join(config.cache_dir, name), key)
            earlier = _component_cache_path(name, component, config.cache_dir, split)
            if earlier is not None:
                fs, plain = fsspec.core.url_to_fs(earlier)
                if fs.exists(f"{plain}/{LEDGER_FILE}"):
                    logger.warning(
                        f"Not using the {split} cache at {earlier}: it was built before caches were kept apart by "
                        "their sources, with no record of which files it holds; delete it to free its space"
                    )
        locations[name] = {"identity": identity, "cache_dir": cache_dir}
    return locations


def _with_cache_dirs(config: PreferenceLmDataConfig, locations: dict[str, dict]) -> PreferenceLmDataConfig:
    components = dict(config.components)
    for name, location in locations.items():
        component = components[name]
        if location["cache_dir"] is not None and isinstance(component, DatasetComponent):
            components[name] = dataclasses.replace(component, cache_dir=location["cache_dir"])
    return dataclasses.replace(config, components=components)


@contextlib.contextmanager
def build_locks(paths: list[str]) -> Iterator[None]:
    """Holds a build lock beside each cache in ``paths`` (sorted, so two builders never wait on each other),
    waiting while a live process holds one; a lock whose holder is gone is taken over (the run lease's rules)."""
    held: list[RunLease] = []
    try:
        for path in sorted(paths):
            parent, name = path.rstrip("/").rsplit("/", 1)
            lock = RunLease(parent, f"cache {path}", file=name + BUILD_LOCK_SUFFIX, label=f"The cache build {path}")
            waiting_since = None
            while (holder := lock.try_acquire()) is not None:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    logger.warning(
                        f"Waiting for the cache at {path}: another process is building it (host and pid in "
                        f"{lock.path}: {held_by(holder)}); this run reads it once it is finished"
                    )
                time.sleep(BUILD_LOCK_POLL_SECONDS)
            if waiting_since is not None:
                logger.info(f"The build of {path} we waited {time.monotonic() - waiting_since:.0f} s for has ended")
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def _describe(identity: dict | None) -> str:
    if not identity:
        return "sources not recorded"
    size = sum(int(v.get("size") or 0) for v in identity.values())
    files = ", ".join(list(identity)[:3]) + (" ..." if len(identity) > 3 else "")
    return f"built from {len(identity)} source file{'s' if len(identity) != 1 else ''}, {size} bytes: {files}"


def build_identified_caches(config: PreferenceLmDataConfig, split: str) -> dict[str, TreeCache]:
    """Levanter's ``build_caches`` for a split, with every cache tied to its sources (see the module docstring).

    With several processes, process 0 reads the sources, takes the build locks, checks and clears the caches while
    the others wait for its verdict (a refusal reaches them all); Levanter's builder then builds on process 0
    while the others wait, and an error of process 0's build is raised on every process."""
    locations = agreed(f"where the {split} caches of these sources are", lambda: _keyed_locations(config, split))
    config = _with_cache_dirs(config, locations)
    identities = {name: location["identity"] for name, location in locations.items()}
    keyed = {name for name, location in locations.items() if location["cache_dir"] is not None}
    built: set[str] = set()

    def to_lock() -> list[str]:
        """The cache paths this run may remove or build: every keyed one (checked and cleared under its lock), and
        any other not yet finished."""
        paths = []
        for name in config.components:
            path = _cache_path(config, name, split)
            if path is not None:
                fs, plain = fsspec.core.url_to_fs(path)
                if name in keyed or not _finished(fs, plain):
                    paths.append(path)
        return paths

    def check_all() -> None:
        for name, identity in identities.items():
            if not check_or_clear(config, name, split, identity, keyed=name in keyed):
                built.add(name)

    locks = build_locks(to_lock()) if jax.process_index() == 0 else contextlib.nullcontext()
    with locks:
        agreed(f"whether the {split} caches match their sources", check_all)
        try:
            caches, failure = build_caches_naming_bad_lines(config, split), None
        except Exception as e:
            caches, failure = {}, e

        def leader_outcome() -> None:
            if failure is not None:
                raise failure
            for name, cache in caches.items():
                if name in built:
                    _record(cache, identities.get(name))
                verb = "Built" if name in built else "Using"
                logger.info(
                    f"{verb} the {split} cache of preference component {name!r} at {cache.cache_dir} "
                    f"({_describe(recorded_identity(cache))})"
                )

        agreed(f"building the {split} caches", leader_outcome)
    if failure is not None:  # this process alone failed (process 0 built the caches)
        raise failure
    return caches
