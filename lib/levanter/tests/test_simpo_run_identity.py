# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""A resumed SimPO run continues only the training its checkpoint holds, from an intact and healthy checkpoint.

Real tiny runs through ``train_simpo.main`` on real checkpoint files: a resume with another objective is refused
with the differing fields unless ``allow_config_change`` is set; damaged checkpoints (bytes overwritten, a file
truncated, ``metadata.json`` deleted) are named and the run falls back to the newest verified one; a loss that
leaves its recent range stops the run, with no export of the diverged model, and marks the diverged checkpoints so
a rerun resumes before them.
"""

import contextlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from simpo_tiny_run import SharedSetup, TrackedMetrics, run, tiny_config, train_losses

from levanter.main import train_simpo
from levanter.simpo.run import checkpoints as simpo_checkpoints
from levanter.simpo.run.checkpoints import RECORD, CheckpointMismatchError, NoUsableCheckpointError
from levanter.simpo.run.divergence import DivergedTrainingError


class Messages(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def checkpoint_messages():
    messages = Messages()
    log = logging.getLogger(simpo_checkpoints.__name__)
    log.addHandler(messages)
    try:
        yield messages
    finally:
        log.removeHandler(messages)


class Runs:
    """Tiny in-process runs of 8 pairs a step sharing one data cache, checkpointing steps 1, 3, 5, ... and the
    last one under ``tmp/checkpoints/RUN_ID``."""

    def __init__(self, shared: SharedSetup, tmp: Path):
        self.shared = shared
        self.tmp = tmp

    def config(self, run_id: str, steps: int, *extra: str):
        return tiny_config(
            self.tmp,
            *self.shared.overrides,
            "--trainer.id",
            run_id,
            "--trainer.num_train_steps",
            str(steps),
            "--trainer.checkpointer.keep",
            '[{"every": 2}]',
            "--trainer.steps_per_eval",
            "1000",
            *extra,
            config_path=self.shared.config,
        )

    def run(self, run_id: str, steps: int, *extra: str) -> tuple[dict[int, float], str]:
        with checkpoint_messages() as messages:
            tracked = run(self.config(run_id, steps, *extra), TrackedMetrics())
        return train_losses(tracked.by_step), messages.text() + "\n" + "\n".join(tracked.messages)

    def checkpoints(self, run_id: str) -> Path:
        return self.tmp / "checkpoints" / run_id

    def saved_steps(self, run_id: str) -> list[str]:
        return sorted(p.name for p in self.checkpoints(run_id).iterdir() if p.name.startswith("step-"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_setup):
    """A finished 4-step run ("base": checkpoints step-2 and step-3) the tests copy and damage."""
    runs = Runs(shared_setup, tmp_path_factory.mktemp("identity"))
    losses, _ = runs.run("base", 4)
    assert sorted(losses) == [0, 1, 2, 3]
    assert runs.saved_steps("base") == ["step-2", "step-3"]
    return runs, losses


def copy_run(runs: Runs, run_id: str) -> Path:
    shutil.copytree(runs.checkpoints("base"), runs.checkpoints(run_id))
    return runs.checkpoints(run_id)


def test_every_checkpoint_records_its_configuration_and_checksums(finished):
    runs, _ = finished
    record = json.loads((runs.checkpoints("base") / "step-3" / RECORD).read_text())
    assert record["step"] == 3
    identity = record["identity"]
    assert identity["beta"] == 2.0 and identity["gamma_beta_ratio"] == 0.5 and identity["loss_type"] == "sigmoid"
    assert identity["trainer.train_batch_size"] == 8 and identity["model.hidden_dim"] == 128
    # pair_layout auto as the layout it stood for on this platform: another may resolve it otherwise
    assert identity["pair_layout"] == "packed" and identity["optimizer.learning_rate"] == 3e-3
    assert any(k.endswith("train_urls") for k in identity)
    # the fields a resume may change are not part of it
    assert not any(k.startswith(("trainer.num_train_steps", "trainer.checkpointer", "hf_save")) for k in identity)
    checksums = record["checksums"]
    assert ".step" in checksums and any("token_embeddings" in k for k in checksums)
    assert all(len(v) == 2 for v in checksums.values())


def test_a_resume_with_another_objective_is_refused_with_the_diff(finished):
    runs, _ = finished
    copy_run(runs, "refused")
    with pytest.raises(CheckpointMismatchError) as error:
        runs.run("refused", 6, "--beta", "10")
    message = str(error.value)
    print(message)
    assert "refused/step-3 was trained with another configuration" in message
    assert "  beta: 2.0 -> 10.0\n" in message
    assert "--allow_config_change true" in message
    assert runs.saved_steps("refused") == ["step-2", "step-3"]  # nothing trained, nothing written


def test_a_longer_run_resumes_silently_and_a_deliberate_change_resumes_logged(finished):
    runs, reference = finished
    copy_run(runs, "extended")
    losses, log = runs.run("extended", 6)
    assert sorted(losses) == [4, 5]
    assert "extended/step-3 verified: configuration and array checksums match" in log
    assert "configuration change" not in log

    losses, log = runs.run("extended", 8, "--beta", "10", "--allow_config_change", "true")
    print(log)
    assert sorted(losses) == [6, 7]
    assert "extended/step-5 with a deliberate configuration change (allow_config_change):\n  beta: 2.0 -> 10.0" in log
    # checkpoints trained on with the new value record it: the next resume needs no flag
    record = json.loads((runs.checkpoints("extended") / "step-7" / RECORD).read_text())
    assert record["identity"]["beta"] == 10.0


def _overwrite_middle(path: Path, size: int):
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\xff" * size)


def _largest_file(checkpoint: Path) -> Path:
    return max((p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path: Path, size: int):
    with open(path, "r+b") as f:
        f.truncate(size)


DAMAGE = {
    "overwritten": (lambda step: _overwrite_middle(_largest_file(step), 256), "damaged: the checksums of "),
    "truncated": (lambda step: _truncate(_largest_file(step), 1000), "unreadable: "),
    "metadata_deleted": (lambda step: (step / "metadata.json").unlink(), "incomplete: no metadata.json"),
    "record_garbled": (lambda step: _overwrite_middle(step / RECORD, 16), f"damaged: its {RECORD} is not valid JSON"),
    # valid JSON of another shape: named and passed over like any damaged record (was KeyError: 'checksums')
    "record_without_checksums": (
        lambda step: _rewrite_record(step, lambda r: {k: v for k, v in r.items() if k != "checksums"}),
        f"damaged: its {RECORD} holds no checksums",
    ),
    "record_not_an_object": (
        lambda step: _rewrite_record(step, lambda r: [r]),
        f"damaged: its {RECORD} is not a JSON object",
    ),
}


def _rewrite_record(step: Path, change) -> None:
    record = step / RECORD
    record.write_text(json.dumps(change(json.loads(record.read_text()))))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_named_and_the_run_falls_back(finished, damage):
    runs, reference = finished
    checkpoints = copy_run(runs, damage)
    damage_fn, reason = DAMAGE[damage]
    damage_fn(checkpoints / "step-3")
    losses, log = runs.run(damage, 4)
    print(log)
    assert f"Not resuming from checkpoint {checkpoints}/step-3: {reason}" in log
    assert f"Resuming from {checkpoints}/step-2, the newest verified checkpoint (step 2), instead of newer ones" in log
    # step 3 trained again from the intact step-2: the same loss as the undamaged run's, saved afresh
    assert losses == {3: reference[3]}
    assert [p.name.split(".")[0] for p in (checkpoints / "superseded").iterdir()] == ["step-3"]
    assert (checkpoints / "step-3" / "metadata.json").exists() and (checkpoints / "step-3" / RECORD).exists()


def test_a_run_whose_checkpoints_are_all_damaged_refuses_to_start_over(finished):
    runs, _ = finished
    checkpoints = copy_run(runs, "all_damaged")
    for step in ("step-2", "step-3"):
        _overwrite_middle(_largest_file(checkpoints / step), 256)
    with pytest.raises(NoUsableCheckpointError) as error:
        runs.run("all_damaged", 4)
    print(error.value)
    assert f"{checkpoints}/step-3 (damaged: the checksums" in str(error.value)
    assert f"{checkpoints}/step-2 (damaged: the checksums" in str(error.value)


def test_checkpoints_whose_saves_never_finished_are_moved_aside_and_the_run_starts_over(finished):
    """A kill (or a full disk) during a run's first saves leaves step directories without metadata.json, Levanter's
    commit marker, and possibly torn array files: nothing trained is at stake, so the rerun starts over (it used to
    refuse, forever, with 'none can be resumed from')."""
    runs, reference = finished
    checkpoints = copy_run(runs, "never_committed")
    for step in ("step-2", "step-3"):
        (checkpoints / step / "metadata.json").unlink()  # as a kill before the save's end leaves it
    _truncate(_largest_file(checkpoints / "step-3"), 100)  # and an array file cut short mid-write
    losses, log = runs.run("never_committed", 4)
    print(log)
    for step in ("step-3", "step-2"):
        assert f"Not resuming from checkpoint {checkpoints}/{step}: incomplete: no metadata.json" in log
        assert f"Moved {checkpoints}/{step} aside to {checkpoints}/superseded/{step}." in log
    assert (
        "None of this run's 2 checkpoint directories holds a finished save (no metadata.json in any: a save was "
        "interrupted); moving them aside and starting over from step 0" in log
    )
    assert losses == reference  # trained from scratch, as the uninterrupted run
    assert sorted(p.name.split(".")[0] for p in (checkpoints / "superseded").iterdir()) == ["step-2", "step-3"]
    assert runs.saved_steps("never_committed") == ["step-2", "step-3"]
    assert (checkpoints / "step-3" / "metadata.json").exists()


def test_a_diverging_loss_stops_the_run_before_the_export(finished):
    runs, _ = finished
    hf = runs.tmp / "hf_diverging"
    args = ["--optimizer.learning_rate", "1e3", "--hf_save_path", str(hf), "--hf_save_steps", "1"]
    with pytest.raises(DivergedTrainingError) as error:
        runs.run("diverging", 8, *args)
    message = str(error.value)
    print(message)
    assert error.value.step == 1 and error.value.factor > 1e4
    assert message.startswith("SimPO training step 1: the loss diverged: ")
    assert "above divergence.factor=100. Training stopped and the model was not exported." in message
    # the export hook runs after the check, so step 1's diverged model was never exported (Levanter exports no
    # step 0); the same run with the check off exports it (next test). The start-up write check may leave the
    # empty directory
    assert not [p for p in hf.rglob("*") if p.is_file()]


def test_the_check_turned_off_lets_a_diverging_run_train_on(finished):
    runs, _ = finished
    hf = runs.tmp / "hf_unchecked"
    args = ["--optimizer.learning_rate", "1e3", "--hf_save_path", str(hf), "--hf_save_steps", "1"]
    losses, _ = runs.run("unchecked", 3, *args, "--divergence.enabled", "false")
    assert sorted(losses) == [0, 1, 2]
    assert losses[1] > 1e3 * losses[0]
    assert sorted(p.name for p in (hf / "unchecked").iterdir()) == ["step-1", "step-2"]


def test_diverged_checkpoints_are_marked_and_the_rerun_resumes_before_them(finished):
    runs, reference = finished
    checkpoints = copy_run(runs, "diverged_resume")
    args = ["--optimizer.learning_rate", "1e3", "--allow_config_change", "true"]
    keep_all = ["--trainer.checkpointer.keep", '[{"every": 1}]']
    with pytest.raises(DivergedTrainingError) as error:
        runs.run("diverged_resume", 8, *args, *keep_all)
    print(error.value)
    step = error.value.step
    assert step >= 5  # step 4's loss comes from step-3's healthy parameters
    assert error.value.last_healthy_checkpoint == f"{checkpoints}/step-{step - 2}"
    assert f"the last healthy checkpoint is {checkpoints}/step-{step - 2}." in str(error.value)
    for saved in range(step - 1, step + 1):
        record = json.loads((checkpoints / f"step-{saved}" / RECORD).read_text())
        assert record["diverged_at_step"] == step

    with pytest.raises(DivergedTrainingError), checkpoint_messages() as messages:
        runs.run("diverged_resume", 8, *args, *keep_all)
    log = messages.text()
    print(log)
    assert f"Not resuming from checkpoint {checkpoints}/step-{step}: diverged: saved after the loss diverged" in log
    assert f"Resuming from {checkpoints}/step-{step - 2}, the newest verified checkpoint" in log
    moved = sorted(p.name.split(".")[0] for p in (checkpoints / "superseded").iterdir())
    assert moved == [f"step-{step - 1}", f"step-{step}"]


@pytest.mark.parametrize(
    "setting, message",
    [
        (("--divergence.factor", "1"), "divergence.factor must be a finite number above 1, got 1.0"),
        (("--divergence.window", "0"), "divergence.window must be at least 1, got 0"),
        (("--divergence.floor", "nan"), "divergence.floor must be a positive finite number, got nan"),
    ],
)
def test_impossible_divergence_settings(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        train_simpo.validate_config(tiny_config(tmp_path, *setting))
