# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Tests write only under temporary directories: the session fails when it leaves new files in the checkout."""

import subprocess
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


def pytest_sessionstart(session):
    session.config.stash[_BEFORE] = _untracked()


def pytest_sessionfinish(session, exitstatus):
    left = sorted(_untracked() - session.config.stash.get(_BEFORE, set()))
    if left:
        shown = ", ".join(left[:10]) + (f" and {len(left) - 10} more" if len(left) > 10 else "")
        print(f"\nThe tests left files in the checkout (they must write under temporary directories): {shown}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
