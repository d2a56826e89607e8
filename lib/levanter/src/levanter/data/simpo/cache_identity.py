# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Ties a preference cache to the source files it was built from, so a run never trains on the wrong data.

Levanter identifies a cache by its directory alone: point a config at other files, or edit a file after a first
run, and the old cache is reused as it is; a cache whose build stopped half-way is resumed from whatever shards
it holds. Around Levanter's cache builder (``build_caches``), for each component of a split:

- a finished cache whose recorded sources differ from the configured ones (a file added, removed, resized or
  with other content) is refused, naming what changed;
- an unfinished cache directory is removed and built again from scratch;
- a finished cache whose files changed since it was built (a chunk overwritten, a file truncated or removed) is
  removed and built again;
- a newly built (or older, unrecorded) cache gets ``source_identity.json``: every source file's name, size and
  a content digest (local files) or the object store's version tag (generation, ETag, checksum); and
  ``cache_contents.json``, the same for every file of the cache.

The format settings, tokenizer and chat template are the other half of a cache's identity; they are in the
cache's ledger and checked when it is opened (``levanter.data.simpo.cache``).
"""

import hashlib
import json
import logging

import fsspec

from levanter.data.text.datasets import DatasetComponent, UrlDatasetSourceConfig, _component_cache_path
from levanter.data.text.preference import PreferenceLmDataConfig
from levanter.simpo.run.hosts import agreed
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


def check_or_clear(config: PreferenceLmDataConfig, name: str, split: str, identity: dict | None) -> None:
    """Refuses a finished cache built from other sources; removes an unfinished or damaged one."""
    component = config.components[name]
    if not isinstance(component, DatasetComponent):
        return
    path = _component_cache_path(name, component, config.cache_dir, split)
    if path is None:
        return
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        return
    if not _finished(fs, fs_path):
        logger.warning(f"The {split} cache at {path} was never finished (its build stopped); building it again")
        fs.rm(fs_path, recursive=True)
        return
    damage = _damage(fs, fs_path)
    if damage:
        logger.warning(
            f"The {split} cache at {path} changed since it was built ({'; '.join(damage[:3])}); building it again"
        )
        fs.rm(fs_path, recursive=True)
        return
    if identity is None or not fs.exists(f"{fs_path}/{IDENTITY_FILE}"):
        return
    with fs.open(f"{fs_path}/{IDENTITY_FILE}") as f:
        changes = _differences(json.load(f), identity)
    if changes:
        raise ValueError(
            f"The {split} cache of preference component {name!r} at {path} was built from other data: "
            f"{'; '.join(changes[:5])}{' ...' if len(changes) > 5 else ''}. Delete it to rebuild it, or set another "
            "cache_dir"
        )


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
    fs, path = fsspec.core.url_to_fs(cache.cache_dir)
    if identity is not None:
        _write_once(fs, f"{path}/{IDENTITY_FILE}", identity)
    if not fs.exists(f"{path}/{CONTENTS_FILE}"):
        _write_once(fs, f"{path}/{CONTENTS_FILE}", cache_contents(fs, path))


def build_identified_caches(config: PreferenceLmDataConfig, split: str) -> dict[str, TreeCache]:
    """Levanter's ``build_caches`` for a split, with every cache tied to its sources (see the module docstring).

    With several processes, process 0 checks and clears the caches while the others wait for its verdict (a
    refusal reaches them all); Levanter's builder then builds on process 0 while the others wait, and an error of
    process 0's build is raised on every process."""
    identities = {name: source_identity(config, name, split) for name in config.components}

    def check_all() -> None:
        for name, identity in identities.items():
            check_or_clear(config, name, split, identity)

    agreed(f"whether the {split} caches match their sources", check_all)
    try:
        caches, failure = build_caches_naming_bad_lines(config, split), None
    except Exception as e:
        caches, failure = {}, e

    def leader_outcome() -> None:
        if failure is not None:
            raise failure
        for name, cache in caches.items():
            _record(cache, identities.get(name))

    agreed(f"building the {split} caches", leader_outcome)
    if failure is not None:  # this process alone failed (process 0 built the caches)
        raise failure
    return caches
