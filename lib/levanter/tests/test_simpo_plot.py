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
    assert f"SimPO run picture (10 series): {picture}" in tracked.messages

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
    ]

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
    assert done.stdout.strip() == f"wrote {picture} (10 series)"
    assert picture.read_bytes().startswith(PNG_SIGNATURE)

    assert simpo_plot.main([str(tmp_path)]) == 1
    assert f"{tmp_path / run_picture.HISTORY_FILE} does not exist" in capsys.readouterr().err
