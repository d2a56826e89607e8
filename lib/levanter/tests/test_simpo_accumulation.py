# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Gradient accumulation is exact on every pair layout: a step split into microbatches whose rows hold different
numbers of pairs gives the unsplit step's loss, metrics and gradients, with and without the SFT term, on one device
and on a four-device mesh; held-out batches fold the same way; and a packed run's trainer config splits its rows.
The steps run through the trainer's own microbatched gradient computation (``simpo_accumulation_check.py``)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.random as jrandom
import optax
import pytest
from simpo_accumulation_check import LAYOUTS, ROWS, compare, first_rows, model_for, trainer_config
from simpo_tiny_run import run, tiny_config

from levanter.callbacks import StepInfo
from levanter.main.train_simpo import TrainSimpoConfig, simpo_loss, validate_config
from levanter.simpo.objective.accumulation import SimpoTrainer, microbatches_in_step
from levanter.simpo.objective.layouts import trainer_in_rows
from levanter.simpo.results.evaluation import HeldOutEvaluator
from levanter.trainer import TrainerConfig

# f32 sums of the same terms in another order; measured: loss and metrics within 1e-7 relative (4e-5 for a margin
# near 0, 1e-7 in absolute terms), gradients within 6e-7 relative L2
TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("accumulation")


def assert_step_matches(result: dict) -> None:
    whole, split = result["whole"], result["split"]
    assert whole.keys() == split.keys()
    for name, value in whole.items():
        assert abs(split[name] - value) <= TOLERANCE * max(abs(value), 1.0), (name, split[name], value)
    assert result["gradient_difference"] < GRADIENT_TOLERANCE


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_microbatches_give_the_unsplit_step_on_one_device(data_dir, layout, sft_weight):
    # the last two cases also take the step through Levanter's plain Trainer, which is measurably off
    plain = (layout, sft_weight) in {("packed", 0.0), ("shared_prompt", 0.0), ("padded", 0.5)}
    result = compare(data_dir, layout, sft_weight, per_device=2, plain=plain)
    assert result["devices"] == 1 and result["microbatches"] == 4
    if layout != "padded":
        # rows of several pairs: microbatches hold different numbers of pairs
        assert len(set(result["pairs_per_microbatch"])) > 1, result["pairs_per_microbatch"]
    assert_step_matches(result)
    if plain:
        # equal weights per microbatch: pairs weighted by their microbatch's size, the SFT term a mean of
        # per-microbatch token means; measured 0.09-0.17 relative on the gradients
        assert result["plain_gradient_difference"] > 100 * GRADIENT_TOLERANCE
        assert result["plain_loss_difference"] > 10 * TOLERANCE


def test_microbatches_give_the_unsplit_step_on_four_devices(tmp_path):
    """Each layout with the SFT term, on four virtual CPU devices: 2 microbatches of one row a device."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    script = Path(__file__).with_name("simpo_accumulation_check.py")
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-6000:]
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(LAYOUTS)
    for layout, result in results.items():
        assert result["devices"] == 4 and result["microbatches"] == 2, layout
        assert_step_matches(result)
    assert len(set(results["packed"]["pairs_per_microbatch"])) > 1


def test_held_out_metrics_fold_exactly_over_evaluation_batches(data_dir):
    """The same held-out rows evaluated all at once and one row a batch (rows of different pair counts, the last
    batch padded by the loader)."""
    layout, _, _, Vocab, validation = first_rows(data_dir, "packed")
    model = model_for(Vocab)
    latest = {}
    for per_device in (ROWS, 1):

        def loss_fn(model, example, *, key=None, length_diagnostics=False, step=None):
            return simpo_loss(
                model,
                example,
                layout=layout,
                beta=2.0,
                gamma_beta_ratio=0.5,
                sft_weight=0.5,
                length_diagnostics=length_diagnostics,
                step=step,
                key=key,
            )

        config = dataclasses.replace(trainer_config(data_dir, per_device), max_eval_batches=None)
        with SimpoTrainer(config, optax.sgd(1.0), loss_fn, layout=layout) as trainer:
            evaluator = HeldOutEvaluator(trainer, {"tiny": validation}, loss_fn, sft_weight=0.5)
            state = trainer.initial_state(jrandom.PRNGKey(0), model=model)
            evaluator(StepInfo(dataclasses.replace(state, step=1), 0.0, 0.0))
            latest[per_device] = evaluator.latest
    whole, one_row = latest[ROWS], latest[1]
    assert "eval/loss" in whole and "eval/simpo_sft_loss" in whole
    assert whole.keys() == one_row.keys()
    for name, value in whole.items():
        # the length correlations come from folded moments (sums of squares): measured 1.5e-5 off in f32
        tolerance = 1e-4 if name.startswith("eval/length/") else TOLERANCE
        assert abs(one_row[name] - value) <= tolerance * max(abs(value), 1.0), (name, one_row[name], value)


@pytest.mark.parametrize("layout", ["auto", "padded", "packed", "shared_prompt"])
def test_every_layout_accepts_microbatches(layout):
    validate_config(
        TrainSimpoConfig(pair_layout=layout, trainer=TrainerConfig(train_batch_size=8, per_device_parallelism=2))
    )


def test_a_packed_step_is_whole_microbatches_of_rows():
    pairs = TrainerConfig(train_batch_size=128, per_device_parallelism=2, require_accelerator=False)
    # 128 pairs at 2.6 pairs a row: 49 rows; microbatches of 2 rows on this process's device(s)
    rows = trainer_in_rows(pairs, 2.6, eval_parallelism_set=False, microbatch_per_device=2)
    microbatch = 2 * rows.data_axis_size
    assert rows.per_device_parallelism == 2 and rows.microbatch_size == microbatch
    assert isinstance(rows.train_batch_size, int) and rows.train_batch_size % microbatch == 0
    assert abs(rows.train_batch_size - 128 / 2.6) <= microbatch
    assert rows.per_device_eval_parallelism == 2
    assert microbatches_in_step(rows.train_batch_size, rows.microbatch_size) == rows.train_batch_size // microbatch
    # unset (-1), or at least the step's rows: no microbatches, and evaluation takes a step's rows a device
    for asked in (-1, 64):
        whole = trainer_in_rows(pairs, 2.6, eval_parallelism_set=False, microbatch_per_device=asked)
        assert whole.per_device_parallelism == -1 and whole.microbatch_size is None
        assert microbatches_in_step(whole.train_batch_size, whole.microbatch_size) == 1  # type: ignore[arg-type]


def test_a_microbatched_run_trains_as_the_unsplit_run(tmp_path, shared_setup, repo_cwd):
    """Two steps of the tiny run (auto layout, 8 pairs a step in about 4 rows, SFT term on) through ``main``: with
    microbatches of one row a device, the same losses and metrics as without."""
    runs = {}
    for per_device in (-1, 1):
        overrides = ["--trainer.id", f"split{per_device}", "--trainer.num_train_steps", "2", "--sft_weight", "0.5"]
        overrides += ["--trainer.per_device_parallelism", str(per_device)]
        config = tiny_config(tmp_path, *shared_setup.overrides, *overrides, config_path=shared_setup.config)
        runs[per_device] = run(config)
    whole, split = runs[-1], runs[1]
    chosen = [m for m in whole.messages if m.startswith("pair_layout ") and "(auto on cpu: " in m]
    assert chosen and "fit a shared_prompt row of 64 positions; positions computed: padded " in chosen[0], chosen
    rows = [m for m in split.messages if m.startswith("trainer.train_batch_size 8 pairs (from step 0): ")]
    assert rows and " microbatches of 1 rows (1 a device, about " in rows[0], rows
    assert not any("microbatches" in m for m in whole.messages if m.startswith("trainer.train_batch_size"))
    for step in (0, 1):
        ours, theirs = split.by_step[step], whole.by_step[step]
        names = [k for k in theirs if k.startswith("train/")]
        assert "train/simpo_sft_loss" in names and "train/simpo_loss" in names
        # step 0 from the same parameters; step 1 after Adam's normalised update of nearly equal gradients
        tolerance = TOLERANCE if step == 0 else 1e-4
        for name in names:
            if name.startswith("train/") and not any(t in name for t in ("time", "throughput", "learning_rate")):
                assert abs(ours[name] - theirs[name]) <= tolerance * max(abs(theirs[name]), 1.0), (step, name)
