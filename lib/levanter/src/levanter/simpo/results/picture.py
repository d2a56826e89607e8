# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The run as a picture: train and held-out loss, preference accuracy, reward margin and chosen/rejected
log-probs over steps, and how the model's own answers at evaluations degenerate (``samples/``), from the run's own
metrics, whatever trackers the run is configured with.

``record_run`` adds two trackers next to the configured ones: one appends every step's metrics as JSON lines to
``<trainer.log_dir>/<run id>/simpo_metrics.jsonl`` (Levanter's directory for the run's artifacts; appending keeps
the history of a resumed run), the other logs a progress line with the current loss and accuracy, which Levanter's
progress bar leaves out. ``write_run_picture`` draws ``simpo_run.png`` beside that file at the end of a run
(training series per step and as a running mean, held-out ones at each evaluation);
the ``levanter.main.simpo_plot`` command draws it again for any run directory holding the history.
"""

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import jax
import numpy as np

import levanter.tracker
from levanter.tracker import CompositeTracker, Tracker
from levanter.tracker.json_logger import _flatten, _to_jsonable

if TYPE_CHECKING:  # importing the trainer would double the command line's start-up time
    from levanter.trainer import TrainerConfig

logger = logging.getLogger(__name__)

HISTORY_FILE = "simpo_metrics.jsonl"
PICTURE_FILE = "simpo_run.png"

# panel title and the metrics plotted in it, as named under train/ and eval/ (or eval/<set name>/ with several
# sets), or whole names for the samples' metrics, logged at sampling evaluations only
PANELS: list[tuple[str, list[str]]] = [
    ("loss", ["loss"]),
    ("preference accuracy (chosen beats rejected)", ["rewards/accuracies"]),
    ("reward margin (beta * (avg logp chosen - rejected))", ["rewards/margins"]),
    ("average log-prob of the completion tokens", ["logps/chosen", "logps/rejected"]),
    ("answers: mean length over the chosen answers' (rising past 1: growing)", ["samples/length_over_chosen"]),
    ("answers: ended by a stop token; repeated 4-grams", ["samples/stopped", "samples/repetition"]),
]


def run_directory(trainer: "TrainerConfig") -> Path:
    """Where a run's metric history and picture go: Levanter's directory for the run's artifacts."""
    return Path(trainer.log_dir) / str(trainer.id)


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    flat = _to_jsonable(_flatten(metrics))
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _StepMetricsTracker(Tracker):
    """A tracker that only reads per-step metrics: everything else Levanter hands trackers is ignored."""

    def log_hyperparameters(self, hparams: dict[str, Any]):
        pass

    def log_summary(self, metrics: dict[str, Any]):
        pass

    def log_artifact(self, artifact_path, *, name: Optional[str] = None, type: Optional[str] = None):
        pass

    def finish(self):
        pass


class MetricHistory(_StepMetricsTracker):
    """Appends each ``log`` call's scalar metrics to a JSON-lines file, one ``{"step", "metrics"}`` a line."""

    name: str = "simpo_metric_history"

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # a process killed mid-line left a torn last line: end it, so this run's first record gets a line of its own
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb+") as f:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def log(self, metrics: Mapping[str, Any], *, step: Optional[int], commit: Optional[bool] = None):
        scalars = _scalars(metrics)
        if step is None or not scalars:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "metrics": scalars}) + "\n")


_PROGRESS = ("train/loss", "train/rewards/accuracies", "train/rewards/margins")


class ProgressLine(_StepMetricsTracker):
    """Logs ``SimPO step s/T: loss L, accuracy A, margin M`` about twenty times a run and at its last step.

    The loss and the loss function's metrics of a step reach the trackers in separate calls (Levanter's step-info
    hook, then the trainer); the line waits until it has all three.
    """

    name: str = "simpo_progress_line"

    def __init__(self, num_train_steps: int):
        self._total = num_train_steps
        self._every = max(1, num_train_steps // 20)
        self._step: int | None = None
        self._seen: dict[str, float] = {}
        self._done = False

    def log(self, metrics: Mapping[str, Any], *, step: Optional[int], commit: Optional[bool] = None):
        if step is None or not (step % self._every == 0 or step == self._total - 1):
            return
        if step != self._step:
            self._step, self._seen, self._done = step, {}, False
        self._seen.update(_scalars(metrics))
        if self._done or any(name not in self._seen for name in _PROGRESS):
            return
        self._done = True
        loss, accuracy, margin = (self._seen[name] for name in _PROGRESS)
        logger.info(f"SimPO step {step}/{self._total}: loss {loss:.4f}, accuracy {accuracy:.3f}, margin {margin:.3f}")


def record_run(trainer: "TrainerConfig") -> Path:
    """Adds the history and progress-line trackers to the global tracker (call after ``levanter.trainer.initialize``
    and before building the ``Trainer``, which takes the global tracker); returns the run directory."""
    directory = run_directory(trainer)
    ours: list[Tracker] = [ProgressLine(trainer.num_train_steps)]
    if jax.process_index() == 0:
        ours.append(MetricHistory(directory / HISTORY_FILE))
    tracker = levanter.tracker.current_tracker()
    assert isinstance(tracker, CompositeTracker), "levanter.trainer.initialize sets a CompositeTracker"
    tracker.loggers.extend(ours)
    return directory


def collect_series(history: Path) -> dict[str, dict[int, float]]:
    """Every metric of a history file as ``{name: {step: value}}``; a step logged twice (a resumed run redoing the
    steps after its last checkpoint) keeps the later value. A line that cannot be read (torn by a process killed
    while writing it, or not a ``{"step", "metrics"}`` object) is skipped with a warning naming the file and line."""
    series: dict[str, dict[int, float]] = {}
    with open(history, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
                step, metrics = int(event["step"]), dict(event["metrics"])
                values = {str(name): float(value) for name, value in metrics.items()}
            except (ValueError, TypeError, KeyError) as e:
                logger.warning(
                    f"Skipping line {number} of {history}: not a metrics record ({type(e).__name__}: {e}); a process "
                    "killed while writing it leaves such a line"
                )
                continue
            for name, value in values.items():
                series.setdefault(name, {})[step] = value
    return series


def _panel_series(series: Mapping[str, dict[int, float]], metric: str) -> list[str]:
    """The train series of ``metric`` and every held-out one (``eval/<metric>`` or ``eval/<set>/<metric>``); a
    ``samples/`` metric is its own series."""
    if metric.startswith("samples/"):
        return [metric] if metric in series else []

    def held_out(name: str) -> bool:
        depth = name.count("/") - metric.count("/")
        return name.startswith("eval/") and name.endswith(f"/{metric}") and depth in (1, 2)

    train = [f"train/{metric}"] if f"train/{metric}" in series else []
    return train + sorted(name for name in series if held_out(name))


def _running_mean(values: list[float], window: int) -> np.ndarray:
    # the per-step training metrics of one batch are noisy; the trend is what the picture is for
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_series(series: Mapping[str, dict[int, float]], out: Path, title: str) -> list[str]:
    """Draws the panels into ``out`` (PNG); returns the names of the series drawn."""
    # imported here, at the end of a run: matplotlib adds about a second to every start before the first step
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training hosts
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(12, 12), constrained_layout=True)
    drawn = []
    for ax, (panel, metrics) in zip(axes.flat, PANELS):
        for color, metric in zip(("tab:blue", "tab:red"), metrics):
            for name in _panel_series(series, metric):
                steps = sorted(series[name])
                values = [series[name][s] for s in steps]
                if name.startswith("train/"):
                    ax.plot(steps, values, color=color, linewidth=0.6, alpha=0.3)
                    window = max(1, len(values) // 30)
                    label = name if window == 1 else f"{name} (mean of {window} steps)"
                    ax.plot(steps[window - 1 :], _running_mean(values, window), color=color, linewidth=1, label=label)
                else:
                    ax.plot(steps, values, color=color, marker="o", linewidth=1.8, label=name)
                drawn.append(name)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return drawn


def draw(directory: Path) -> tuple[Path, list[str]]:
    history = directory / HISTORY_FILE
    if not history.exists():
        raise FileNotFoundError(f"{history} does not exist; a run's directory is <trainer.log_dir>/<run id>")
    out = directory / PICTURE_FILE
    return out, plot_series(collect_series(history), out, f"SimPO run {directory.resolve().name}")


def write_run_picture(directory: Path) -> Path | None:
    """Draws ``simpo_run.png`` from the run's history in ``directory``, says where in the log and hands it to the
    trackers as an artifact (wandb uploads it). Only the process that wrote the history draws."""
    if jax.process_index() != 0:
        return None
    try:
        out, drawn = draw(directory)
    except Exception as e:  # the picture is a by-product: it never fails a run that trained
        logger.error(
            f"Could not draw the run picture from {directory / HISTORY_FILE}: {type(e).__name__}: {e}. The run's "
            "checkpoints and exports are unaffected; redraw it with python -m levanter.main.simpo_plot"
        )
        return None
    logger.info(f"SimPO run picture ({len(drawn)} series): {out}")
    levanter.tracker.current_tracker().log_artifact(str(out), name=PICTURE_FILE, type="plot")
    return out
