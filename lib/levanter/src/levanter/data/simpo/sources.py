# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Names the file and line of a JSON-lines source line that Levanter's reader cannot read.

Levanter's cache builder reads JSON-lines sources in zephyr workers; a line that is not UTF-8 or not JSON fails
the worker, which retries the shard and then fails the build with a ``ZephyrWorkerError`` carrying the worker's
traceback as text (``JSONDecodeError: Expecting value: line 2 column 1 (char 677)``): no file, no line. On such a
failure ``build_caches_naming_bad_lines`` reads the split's sources again, line by line as the reader does, and
raises one short error naming the first bad line instead.
"""

import json
from typing import Iterator

import fsspec
from zephyr.stage_io import ZephyrWorkerError

from levanter.data.sharded_datasource import _sniff_format_for_dataset
from levanter.data.simpo.rows import PreferenceRowError
from levanter.data.text.datasets import UrlDatasetSourceConfig
from levanter.data.text.preference import PreferenceLmDataConfig
from levanter.store.cache import TreeCache


def _text_lines(f) -> Iterator[bytes]:
    """The lines of a binary stream as Levanter's text-mode reader sees them: universal newlines (``\\n``,
    ``\\r\\n`` and a lone ``\\r`` each end a line), without their ends."""
    for line in f:
        line = line.removesuffix(b"\n").removesuffix(b"\r")
        yield from line.split(b"\r")


def _line_problem(line: bytes) -> str | None:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"the line is not valid UTF-8 ({e.reason} at byte {e.start})"
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return f"the line is not valid JSON ({e.msg}: column {e.colno})"
    return None


def _json_lines_files(config: PreferenceLmDataConfig, split: str) -> Iterator[fsspec.core.OpenFile]:
    """The split's source files that Levanter reads as JSON lines (globs expanded, compression inferred)."""
    for component in config.components.values():
        source = getattr(component, "source", None)
        if not isinstance(source, UrlDatasetSourceConfig):
            continue
        for url in source.urls_for_split(split):
            compression = "zstd" if url.endswith(".zstd") else "infer"  # as Levanter's reader decides
            for opened in fsspec.open_files(url, "rb", compression=compression):
                if _sniff_format_for_dataset(opened.full_name) == ".jsonl":
                    yield opened


def _display_name(opened: fsspec.core.OpenFile) -> str:
    return opened.path if "file" in opened.fs.protocol else opened.full_name


def first_bad_source_line(config: PreferenceLmDataConfig, split: str) -> tuple[str, int, str] | None:
    """The first JSON-lines source line of ``split`` that is not UTF-8 or not JSON, as (file, 1-based line
    number, reason); None if every line reads."""
    for opened in _json_lines_files(config, split):
        with opened as f:
            for number, line in enumerate(_text_lines(f), start=1):
                problem = _line_problem(line)
                if problem is not None:
                    return _display_name(opened), number, problem
    return None


def build_caches_naming_bad_lines(config: PreferenceLmDataConfig, split: str) -> dict[str, TreeCache[dict]]:
    """``config.build_caches(split)``, failing with a ``PreferenceRowError`` that names the file and line when a
    source line cannot be read."""
    try:
        return config.build_caches(split)
    except ZephyrWorkerError:
        located = first_bad_source_line(config, split)
        if located is None:
            raise
        path, number, problem = located
        # the worker's traceback is already in the log; the file and line are what the user needs
        raise PreferenceRowError(f"{split} file {path}, line {number}: {problem}") from None
