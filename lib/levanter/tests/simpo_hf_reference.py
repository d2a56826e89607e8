# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The reference for what a run's model writes: transformers' greedy ``generate`` from the run's HF export.

transformers generates with torch, which the project's environment does not hold: with torch installed, every
Levanter process imports it. The generation runs in a child process, in a virtual environment of the
``hf-reference`` group's packages as ``uv.lock`` pins them."""

import atexit
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from simpo_tiny_run import REPO

from levanter.simpo.results.samples import SamplesConfig, read_samples

GREEDY = Path(__file__).with_name("hf_greedy_reference.py")


@functools.cache
def reference_python() -> str:
    """An interpreter of a new virtual environment holding exactly the ``hf-reference`` group's locked packages,
    removed at exit. uv links them from its cache: only the first build on a machine downloads them."""
    env = tempfile.mkdtemp(prefix="hf_reference_env")
    atexit.register(shutil.rmtree, env, ignore_errors=True)
    pinned = Path(env) / "requirements.txt"
    export = ["uv", "export", "--frozen", "--only-group", "hf-reference", "--no-hashes", "--no-emit-project"]
    pinned.write_text(subprocess.run(export, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    python = str(Path(env) / "venv" / "bin" / "python")
    # in the repository: a pyenv shim resolves uv by its .python-version
    venv = ["uv", "venv", "--quiet", "--python", sys.executable, str(Path(env) / "venv")]
    subprocess.run(venv, cwd=REPO, check=True)
    # the lock's resolution, overrides included, as it stands: nothing resolved again
    install = ["uv", "pip", "install", "--quiet", "--python", python, "--no-deps", "-r", str(pinned)]
    subprocess.run(install, cwd=REPO, check=True)
    return python


def transformers_greedy(jobs: list[tuple[Path, list[list[int]]]]) -> list[list[list[int]]]:
    """Each export's greedy answers to its prompts, at most the samples' default ``max_new_tokens`` each."""
    max_new = SamplesConfig().max_new_tokens
    with tempfile.TemporaryDirectory(prefix="hf_reference") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps([{"export": str(e), "prompts": p, "max_new_tokens": max_new} for e, p in jobs]))
        run = subprocess.run([reference_python(), str(GREEDY), str(spec)], cwd=tmp, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def check_against_the_exports(runs: list[tuple[Path, Path, int]]) -> list[list[dict]]:
    """Each run's samples of its step (the default 8) are what transformers generates from its export, stopping
    where the export's generation_config says. ``runs``: (run_dir, export, step) each; one child process for all."""
    records = []
    for run_dir, export, step in runs:
        assert json.loads((export / "generation_config.json").read_text())["eos_token_id"], export
        _, step_records = read_samples(run_dir, step)
        assert len(step_records) == 8, (run_dir, step)
        records.append(step_records)
    prompts = [[r["prompt_ids"] for r in step_records] for step_records in records]
    answers = transformers_greedy([(export, p) for (_, export, _), p in zip(runs, prompts)])
    assert [len(a) for a in answers] == [len(p) for p in prompts], "transformers answered other prompts"
    for step_records, step_answers in zip(records, answers):
        for record, answer in zip(step_records, step_answers):
            assert record["answer_ids"] == answer, record
    return records


def check_against_the_export(run_dir: Path, export: Path, step: int) -> list[dict]:
    """One run's ``check_against_the_exports``."""
    return check_against_the_exports([(run_dir, export, step)])[0]
