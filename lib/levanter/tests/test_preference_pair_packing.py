# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Which pairs share a row (first-fit decreasing), which layout ``auto`` takes, and how a batch of pairs becomes
rows. The layouts' losses and gradients are compared in ``test_simpo_layouts.py``."""

import dataclasses
import logging

import numpy as np
import pytest

from levanter.data.simpo.packing import PACKING_WINDOW, first_fit_decreasing
from levanter.schedule import ScheduleStep
from levanter.simpo.objective.layouts import (
    PairLengths,
    log_rows_per_step,
    resolve_pair_layout,
    rows_per_step,
    trainer_in_rows,
)
from levanter.trainer import TrainerConfig

SEQ = 2048


def ultrafeedback_like_lengths(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token counts with UltraFeedback-like log-normal lengths (means 170 / 330 / 280, long tails), keeping pairs
    whose prompt and both completions fit one row, as the benchmark's pairs do."""
    rng = np.random.default_rng(seed)
    parts = {}
    for part, mean, sigma in (("prompt", 170, 0.9), ("chosen", 330, 0.7), ("rejected", 280, 0.75)):
        parts[part] = np.maximum(1, rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, 2 * n).astype(np.int64))
    prompt = parts["prompt"] + 1  # BOS
    chosen, rejected = prompt + parts["chosen"] + 1, prompt + parts["rejected"] + 1  # EOS
    fits = chosen + rejected - prompt <= SEQ
    return {"prompt": prompt[fits][:n], "chosen": chosen[fits][:n], "rejected": rejected[fits][:n]}


def _check_plan(groups: list[np.ndarray], sizes: np.ndarray, capacity: int, max_items: int, window: int) -> None:
    sizes = sizes.reshape(len(sizes), -1)
    everything = np.concatenate(groups)
    assert np.array_equal(np.sort(everything), np.arange(len(sizes)))  # every item exactly once
    for g in groups:
        assert 1 <= len(g) <= max_items
        assert np.all(sizes[g].sum(axis=0) <= capacity)
        assert np.all(np.diff(g) > 0)  # in their original order
        assert g[0] // window == g[-1] // window  # within one window of consecutive items
    firsts = [int(g[0]) for g in groups]
    assert firsts == sorted(firsts)


def test_first_fit_decreasing_fills_rows_to_ninety_percent_at_2048():
    lengths = ultrafeedback_like_lengths(4000)
    both_sides = np.stack([lengths["chosen"], lengths["rejected"]], axis=1)
    packed = first_fit_decreasing(both_sides, SEQ, 8)
    _check_plan(packed, both_sides, SEQ, 8, PACKING_WINDOW)
    packed_fill = both_sides.sum() / (2 * SEQ * len(packed))

    shared_lengths = lengths["chosen"] + lengths["rejected"] - lengths["prompt"]
    shared = first_fit_decreasing(shared_lengths, SEQ, 8)
    _check_plan(shared, shared_lengths, SEQ, 8, PACKING_WINDOW)
    shared_fill = shared_lengths.sum() / (SEQ * len(shared))
    assert packed_fill >= 0.90 and shared_fill >= 0.90, (packed_fill, shared_fill)

    # Levanter's greedy prepacking of consecutive pairs on the same lengths, for comparison: the check can fail
    rows, room = 1, np.array([SEQ, SEQ])
    for sides in both_sides:
        if np.any(sides > room):
            rows, room = rows + 1, np.array([SEQ, SEQ])
        room -= sides
    assert both_sides.sum() / (2 * SEQ * rows) < 0.85


def test_first_fit_decreasing_puts_the_longest_first_and_respects_its_limits():
    sizes = np.array([5, 9, 3, 7, 1, 1, 10, 2])
    first = first_fit_decreasing(sizes, 10, 3, window=4)
    _check_plan(first, sizes, 10, 3, 4)
    # the longest first: 9 and 7 open rows, 5 cannot join either, 3 joins 7; rows in the order of their first item
    assert [g.tolist() for g in first[:3]] == [[0], [1], [2, 3]]
    with pytest.raises(ValueError, match="item 1 is longer than 8"):
        first_fit_decreasing(np.array([[3, 3], [2, 9]]), 8, 4)


def _lengths(prompt, chosen, rejected) -> PairLengths:
    return PairLengths(np.array(prompt), np.array(chosen), np.array(rejected))


def test_auto_takes_the_fastest_layout_that_trains_every_pair():
    # lengths as the cache keeps them, each side with its prompt; as a shared row: 200 + 150 - 100 = 250 positions,
    # and 150 + 200 - 50 = 300
    fit = _lengths([100, 50], [200, 150], [150, 200])
    layout, reason = resolve_pair_layout("auto", 512, fit, "cpu")
    assert layout == "shared_prompt" and "the prompt runs once" in reason
    assert "2 of 2 pairs (100.0%) fit a shared_prompt row of 512 positions" in reason
    # one row of 512 each for shared_prompt (250 + 300 > 512), one row pair for packed (350 tokens on each side)
    assert "positions computed: padded 2,048, packed 1,024, shared_prompt 1,024" in reason
    # a pair of 400 + 300 - 100 = 600 positions fits no shared row of 512, though each side fits: packed
    one_over = _lengths([100, 100], [200, 400], [150, 300])
    layout, reason = resolve_pair_layout("auto", 512, one_over, "cpu")
    assert layout == "packed" and "packed trains every pair" in reason
    assert "1 of 2 pairs (50.0%) fit" in reason and "shared_prompt - (drops 1 pairs)" in reason
    # the fused attention kernels of GPU and TPU take no explicit mask
    for backend in ("gpu", "tpu"):
        layout, reason = resolve_pair_layout("auto", 512, fit, backend)
        assert layout == "packed" and "2 of 2 pairs" in reason
    assert resolve_pair_layout("padded", 512, one_over, "cpu") == ("padded", "as configured")


def test_a_batch_of_pairs_becomes_the_rows_that_hold_them():
    assert rows_per_step(128, 4.2, 1) == 30
    assert rows_per_step(128, 4.2, 8) == 32  # a multiple of the data-parallel width
    assert rows_per_step(4, 9.0, 1) == 1
    trainer = trainer_in_rows(TrainerConfig(train_batch_size=128), 4.2, eval_parallelism_set=False)
    width = trainer.data_axis_size
    assert trainer.train_batch_size == rows_per_step(128, 4.2, width)
    assert trainer.per_device_parallelism == -1  # no microbatches, whatever Levanter derived from 128 pairs
    assert trainer.per_device_eval_parallelism == -(-trainer.train_batch_size // width)  # rows, as in training
    loose = TrainerConfig(train_batch_size=128, allow_nondivisible_batch_size=True)
    assert trainer_in_rows(loose, 4.2, eval_parallelism_set=False).train_batch_size == 30
    chosen = TrainerConfig(train_batch_size=128, per_device_eval_parallelism=7)
    assert trainer_in_rows(chosen, 4.2, eval_parallelism_set=True).per_device_eval_parallelism == 7
    staged = TrainerConfig(train_batch_size=[ScheduleStep(0, 64), ScheduleStep(100, 128)])
    staged_rows = trainer_in_rows(staged, 4.0, eval_parallelism_set=False)
    assert [dataclasses.astuple(p) for p in staged_rows.train_batch_size] == [(0, 16), (100, 32)]
    assert staged_rows.per_device_parallelism == -1


def test_rows_that_hold_far_more_pairs_than_asked_are_warned_about(caplog):
    asked = TrainerConfig(train_batch_size=128)
    with caplog.at_level(logging.INFO, logger="levanter.simpo.objective.layouts"):
        log_rows_per_step(asked, dataclasses.replace(asked, train_batch_size=30), 4.2)
        assert "126 pairs a step" in caplog.text and "not the 128 asked" not in caplog.text
        # 64 data-parallel devices need at least 64 rows
        log_rows_per_step(asked, dataclasses.replace(asked, train_batch_size=64), 4.2)
    assert "64 rows a step hold about 269 pairs, not the 128 asked" in caplog.text
