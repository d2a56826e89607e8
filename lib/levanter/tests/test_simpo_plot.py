# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The run as a picture: a tiny run records its metrics, logs loss and accuracy progress lines and draws its PNG;
the command line redraws it for a run directory."""

import contextlib
import logging
import subprocess
import sys

import yaml
from simpo_tiny_run import REPO, TINY_CONFIG, TrackedMetrics, run, tiny_config

from levanter.main import simpo_plot
from levanter.simpo.results import picture as run_picture
from levanter.simpo.results.samples import describe, read_samples, sampled_steps

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _small_config(tmp):
    """The tiny config on its first 64 training and 16 held-out pairs (caching all 2750 takes longer than the run)."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    source = next(iter(config["data"]["components"].values()))["source"]
    for key, rows in (("train_urls", 64), ("validation_urls", 16)):
        lines = (REPO / source[key][0]).read_text().splitlines(keepends=True)[:rows]
        path = tmp / f"{key}.jsonl"
        path.write_text("".join(lines))
        source[key] = [str(path)]
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_tiny_run_writes_its_picture_from_its_metrics(tmp_path, capsys):
    overrides = ["--trainer.id", "plot", "--trainer.num_train_steps", "6", "--trainer.steps_per_eval", "3"]
    overrides += ["--trainer.log_dir", str(tmp_path / "logs"), "--hf_save_path", "null"]
    with contextlib.chdir(REPO):
        config = tiny_config(tmp_path, *overrides, config_path=_small_config(tmp_path))
        tracked = TrackedMetrics()
        # the progress lines and the picture's path are logged by the picture module
        plot_log = logging.getLogger(run_picture.__name__)
        plot_log.addHandler(tracked)
        try:
            run(config, tracked)
        finally:
            plot_log.removeHandler(tracked)

    run_dir = tmp_path / "logs" / "plot"
    picture = run_dir / run_picture.PICTURE_FILE
    data = picture.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
    assert f"SimPO run picture (13 series): {picture}" in tracked.messages

    # the recorded history is what the run logged through its configured (json_logger) tracker
    series = run_picture.collect_series(run_dir / run_picture.HISTORY_FILE)
    for name in ["train/loss", "train/rewards/accuracies", "eval/loss", "eval/logps/rejected"]:
        logged = {step: m[name] for step, m in tracked.by_step.items() if name in m}
        assert series[name] == logged
    assert sorted(series["train/loss"]) == list(range(6))
    assert sorted(series["eval/rewards/margins"]) == [2, 5]
    drawn = run_picture.plot_series(series, tmp_path / "again.png", "again")
    assert drawn == [
        "train/loss",
        "eval/loss",
        "train/rewards/accuracies",
        "eval/rewards/accuracies",
        "train/rewards/margins",
        "eval/rewards/margins",
        "train/logps/chosen",
        "eval/logps/chosen",
        "train/logps/rejected",
        "eval/logps/rejected",
        "samples/length_over_chosen",
        "samples/stopped",
        "samples/repetition",
    ]
    # the answers at evaluations: written whole per step, their metrics logged with the evaluation's
    assert sorted(series["samples/repetition"]) == [2, 5]
    assert sampled_steps(run_dir) == [2, 5]

    # the progress line, written whatever the trackers: 6 steps log every step
    step4 = tracked.by_step[4]
    line = (
        f"SimPO step 4/6: loss {step4['train/loss']:.4f}, accuracy {step4['train/rewards/accuracies']:.3f}, "
        f"margin {step4['train/rewards/margins']:.3f}"
    )
    assert line in tracked.messages
    assert sum(m.startswith("SimPO step ") for m in tracked.messages) == 6

    # on demand, for the run directory
    picture.unlink()
    cli = [sys.executable, "-m", "levanter.main.simpo_plot"]
    done = subprocess.run([*cli, str(run_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    wrote, shown = done.stdout.split("\n", 1)
    assert wrote == f"wrote {picture} (13 series)"
    _, newest = read_samples(run_dir)
    assert shown.startswith("What the model wrote at step 5 (python -m levanter.main.simpo_samples for any step):")
    assert describe(newest[0]) in shown and describe(newest[1]) in shown and describe(newest[2]) not in shown

    # any step's samples, of a finished or running run
    samples_cli = [sys.executable, "-m", "levanter.main.simpo_samples", str(run_dir)]
    done = subprocess.run([*samples_cli, "--step", "2", "--count", "3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _, at_2 = read_samples(run_dir, 2)
    assert done.stdout == "3 of the 8 samples of step 2 (steps with samples: 2, 5)\n" + "".join(
        describe(r) + "\n" for r in at_2[:3]
    )
    done = subprocess.run([*samples_cli, "--step", "3"], capture_output=True, text=True)
    assert done.returncode == 1 and f"{run_dir} has no samples of step 3; it has steps [2, 5]" in done.stderr
    assert picture.read_bytes().startswith(PNG_SIGNATURE)

    assert simpo_plot.main([str(tmp_path)]) == 1
    assert f"{tmp_path / run_picture.HISTORY_FILE} does not exist" in capsys.readouterr().err


def test_a_torn_history_line_is_skipped_naming_it_and_never_fails_the_run(tmp_path, capsys):
    """A process killed while appending to simpo_metrics.jsonl leaves a torn last line: the next run resumes, trains,
    saves and draws its picture with the line skipped and named (it used to exit 1 with a bare JSONDecodeError
    after training), and simpo_plot redraws it."""
    overrides = ["--trainer.id", "torn", "--trainer.steps_per_eval", "100", "--hf_save_path", "null"]
    with contextlib.chdir(REPO):
        config_path = _small_config(tmp_path)
        run(tiny_config(tmp_path, *overrides, "--trainer.num_train_steps", "5", config_path=config_path))
        run_dir = tmp_path / "logs" / "torn"
        history = run_dir / run_picture.HISTORY_FILE
        lines = history.read_text().splitlines(keepends=True)
        with open(history, "a") as f:
            f.write(lines[-1][: len(lines[-1]) // 2])  # torn mid-write: no end, no newline
        torn_line = len(lines) + 1
        (run_dir / run_picture.PICTURE_FILE).unlink()

        tracked = TrackedMetrics()
        plot_log = logging.getLogger(run_picture.__name__)
        plot_log.addHandler(tracked)
        try:
            run(tiny_config(tmp_path, *overrides, "--trainer.num_train_steps", "8", config_path=config_path), tracked)
        finally:
            plot_log.removeHandler(tracked)

    skipped = [m for m in tracked.messages if m.startswith(f"Skipping line {torn_line} of {history}: ")]
    assert skipped and "not a metrics record (JSONDecodeError" in skipped[0], tracked.messages[-20:]
    picture = run_dir / run_picture.PICTURE_FILE
    assert picture.read_bytes().startswith(PNG_SIGNATURE)
    # the resumed run's steps were appended after the torn line, and every step is there
    assert sorted(run_picture.collect_series(history)["train/loss"]) == list(range(8))

    picture.unlink()
    done = subprocess.run(
        [sys.executable, "-m", "levanter.main.simpo_plot", str(run_dir)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert f"Skipping line {torn_line} of {history}" in done.stderr
    assert picture.read_bytes().startswith(PNG_SIGNATURE)


def test_a_history_that_cannot_be_read_is_logged_not_raised(tmp_path):
    """The picture is a by-product: at the end of a run that trained, any failure to draw it is logged."""
    (tmp_path / run_picture.HISTORY_FILE).mkdir()  # unreadable as a file
    tracked = TrackedMetrics()
    plot_log = logging.getLogger(run_picture.__name__)
    plot_log.addHandler(tracked)
    try:
        assert run_picture.write_run_picture(tmp_path) is None
    finally:
        plot_log.removeHandler(tracked)
    assert any(
        m.startswith(f"Could not draw the run picture from {tmp_path / run_picture.HISTORY_FILE}: IsADirectoryError")
        for m in tracked.messages
    ), tracked.messages
