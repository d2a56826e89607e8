# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Exact gradient accumulation for every pair layout.

Levanter's trainer splits a step's rows into microbatches (``trainer.per_device_parallelism`` rows a device) and
averages their losses and gradients equally (``levanter.grad_accum.microbatched``). Rows of ``packed`` and
``shared_prompt`` hold different numbers of pairs, so equal weights per microbatch would weigh the step's pairs
unequally. ``SimpoTrainer`` counts the step's trained pairs and chosen tokens from the whole batch before it is
split (no forward pass: the rows' loss weights say) and passes each microbatch its share (``StepShare``): each
microbatch's loss is its pairs' summed loss over the step's pairs times the number of microbatches, so the equal
average is the mean over the step's pairs, and the SFT term the mean over the step's chosen tokens.
"""

import haliax as hax
from levanter.simpo.objective.layouts import PairLayout
from levanter.simpo.objective.loss import StepShare
from levanter.trainer import Trainer


def microbatches_in_step(batch_rows: int, microbatch_rows: int | None) -> int:
    """How many microbatches Levanter splits a step of ``batch_rows`` rows into (1: none)."""
    if microbatch_rows is None or microbatch_rows >= batch_rows:
        return 1
    return batch_rows // microbatch_rows


class SimpoTrainer(Trainer):
    """Levanter's ``Trainer``, whose loss function also receives ``step``, the microbatch's ``StepShare``."""

    def __init__(self, config, optimizer, loss_fn, *, layout: PairLayout, **kwargs):
        super().__init__(config, optimizer, loss_fn, **kwargs)
        self.layout = layout

    def _compute_gradients_microbatched(self, loss_fn, model, *batch, **batch_kwargs):
        (example,) = batch
        batch_axis = self.config.batch_axis_name or "batch"
        rows = next(
            leaf.resolve_axis(batch_axis)
            for leaf in hax.tree_util.tree_leaves(example)
            if isinstance(leaf, hax.NamedArray)
        ).size
        microbatches = microbatches_in_step(rows, self.config.microbatch_size)
        share = StepShare.of(self.layout, model, example, microbatches)
        # a scalar keyword: Levanter's microbatching hands it unsplit to every microbatch
        return super()._compute_gradients_microbatched(loss_fn, model, *batch, step=share, **batch_kwargs)
