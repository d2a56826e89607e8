# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0
"""A pod job's set-up syncs this workspace with its accelerator's extra from the lock, with one JAX throughout.

The sync command is the one Marin's job submission builds (resources -> extras -> Fray environment -> Iris
set-up script), run here with ``--dry-run``, offline and with an empty uv cache, so nothing is downloaded.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest
from fray.iris_backend import convert_environment
from fray.types import ResourceConfig, create_environment

from marin.training.run_environment import dependency_groups_for_resources

REPO = Path(__file__).resolve().parents[3]

# resources -> the extras Marin picks for them (CPU jobs name theirs, as `iris job run --extra cpu` does)
JOBS = {
    "tpu": (ResourceConfig.with_tpu("v5p-32"), None),
    "gpu": (ResourceConfig.with_gpu("H100", count=8), None),
    "cpu": (ResourceConfig.with_cpu(), ["cpu"]),
}
# what each extra must bring, beyond the base install
ACCELERATOR_PACKAGES = {
    "tpu": {"libtpu", "jaxlib"},
    "gpu": {"jax-cuda13-plugin", "jax-cuda13-pjrt"},
    "cpu": {"jaxlib"},
}


def _job_sync_command(resources: ResourceConfig, groups: list[str] | None) -> str:
    extras = dependency_groups_for_resources(resources, groups)
    spec = convert_environment(create_environment(extras=extras), resources.device)
    setup, *_ = spec.to_proto().setup_scripts
    (sync,) = [line for line in setup.splitlines() if line.startswith("uv sync")]
    return sync


def _dry_run(command: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "UV_OFFLINE": "1",
        "UV_CACHE_DIR": str(tmp_path / "empty-uv-cache"),
        "UV_PROJECT_ENVIRONMENT": str(tmp_path / "venv"),
    }
    return subprocess.run(
        ["bash", "-c", f"{command} --dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def _would_install(output: str) -> dict[str, str]:
    # "name==version" from the registry, "name @ file://..." for the workspace's own members
    return dict(re.findall(r"^ \+ ([A-Za-z0-9_.-]+)(?:==| @ )(\S+)$", output, flags=re.M))


@pytest.mark.parametrize("extra", sorted(JOBS))
def test_the_job_sync_command_resolves_each_extra_from_the_lock(extra, tmp_path):
    command = _job_sync_command(*JOBS[extra])
    assert command.split()[:2] == ["uv", "sync"]
    assert "--all-packages --no-dev" in command and command.endswith(f"--extra {extra}")
    assert "--frozen" in command  # the $(...) guard, which picks --frozen when uv.lock exists

    result = _dry_run(command, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "Would install" in out
    packages = _would_install(out)
    assert packages["jax"] == "0.11.1"
    assert ACCELERATOR_PACKAGES[extra] <= packages.keys(), sorted(packages)
    assert {"simpo-levanter", "simpo-marin", "marin-levanter", "marin-core"} <= packages.keys()
    assert not (tmp_path / "venv").exists()
    assert not any((tmp_path / "empty-uv-cache").rglob("*.whl"))


def test_an_undefined_extra_still_fails_the_same_check(tmp_path):
    # the check above would catch the original failure: a sync for an extra no member defines
    result = _dry_run(_job_sync_command(ResourceConfig.with_cpu(), ["no-such-accelerator"]), tmp_path)
    assert result.returncode != 0
    assert "no-such-accelerator" in result.stderr


def test_the_base_install_locks_the_extras_jax():
    lock = (REPO / "uv.lock").read_text()
    for name in ("jax", "jaxlib"):
        versions = re.findall(rf'^name = "{name}"\nversion = "([^"]+)"', lock, flags=re.M)
        assert versions == ["0.11.1"], (name, versions)
    assert not re.search(r'^name = "libtpu"\nversion = "(?!0\.0\.46\.)', lock, flags=re.M)
