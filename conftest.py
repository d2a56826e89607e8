# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Tests write only under temporary directories: the session fails when it leaves new files in the checkout. The
test process keeps its memory mappings under the kernel's limit (``_bounded_memory_maps``)."""

import gc
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
# what running Python and the tools leaves by design
EXPECTED = (".venv/", "__pycache__/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/")
_BEFORE = pytest.StashKey[set[str]]()


def _untracked() -> set[str]:
    listing = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if listing.returncode != 0:  # not a git checkout: nothing to compare
        return set()
    paths = {entry[3:] for entry in listing.stdout.split("\0") if entry[:2] in ("??", "!!")}
    return {p for p in paths if not any(p.startswith(e) or f"/{e}" in p for e in EXPECTED)}


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps", "rb") as maps:  # map_files/ would miss the anonymous ones, compiled code's
            return sum(1 for _ in maps)
    except OSError:  # not Linux
        return 0


def _map_limit() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 0


MAP_LIMIT = _map_limit()
_PEAK_MAPS = pytest.StashKey[int]()


@pytest.fixture(autouse=True)
def _bounded_memory_maps(request):
    """Every program XLA compiles for the CPU keeps its code mapped while JAX's caches hold it: a tiny in-process
    training run leaves 1,300 to 3,000 mappings. One pytest process runs dozens of them, and past the kernel's
    ``vm.max_map_count`` (65,530 by default) LLVM's next allocation fails and the process dies (SIGSEGV or
    SIGABRT, no traceback). Past half the limit, the caches are dropped: later tests compile again."""
    yield
    maps = _memory_maps()
    stash = request.config.stash
    stash[_PEAK_MAPS] = max(stash.get(_PEAK_MAPS, 0), maps)
    if MAP_LIMIT and maps > MAP_LIMIT // 2 and "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
        gc.collect()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if MAP_LIMIT:
        peak = config.stash.get(_PEAK_MAPS, 0)
        terminalreporter.write_line(f"memory maps: peak {peak} after a test, limit {MAP_LIMIT}")


def pytest_sessionstart(session):
    session.config.stash[_BEFORE] = _untracked()


def pytest_sessionfinish(session, exitstatus):
    left = sorted(_untracked() - session.config.stash.get(_BEFORE, set()))
    if left:
        shown = ", ".join(left[:10]) + (f" and {len(left) - 10} more" if len(left) > 10 else "")
        print(f"\nThe tests left files in the checkout (they must write under temporary directories): {shown}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
