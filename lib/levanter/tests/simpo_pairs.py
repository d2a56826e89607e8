# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Random preference-pair batches for loss-level tests: random tokens, a prompt shared by both sides, and
completions of different lengths, masked and segmented the way ``PreferencePairDataset`` serves one pair a row
(the ``padded`` layout, ``PADDED``)."""

import jax.numpy as jnp
import numpy as np

import haliax as hax
from levanter.data.text.preference import DpoExample
from levanter.models.lm_model import LmExample
from levanter.simpo.objective.layouts import pair_layout

PADDED = pair_layout("padded", 1)


def _side(rng, Batch: hax.Axis, Pos: hax.Axis, high: int, prompts, first_token: int | None) -> LmExample:
    tokens = rng.integers(1, high, size=(Batch.size, Pos.size)).astype(np.int32)
    if first_token is not None:
        tokens[0, 0] = first_token
    mask = np.zeros((Batch.size, Pos.size), np.float32)
    segments = np.full((Batch.size, Pos.size), -1, np.int32)
    for i, prompt in enumerate(prompts):
        end = rng.integers(prompt + 2, Pos.size + 1)
        tokens[i, end:] = 0
        mask[i, prompt:end] = 1
        segments[i, :end] = i  # as Levanter's PreferencePairDataset: the pair's index on its tokens
    tokens_n = hax.named(jnp.asarray(tokens), (Batch, Pos))
    weight = hax.roll(hax.named(jnp.asarray(mask), (Batch, Pos)), -1, Pos)  # weight t scores token t+1
    segments_n = hax.named(jnp.asarray(segments), (Batch, Pos))
    return hax.vmap(lambda t, w, s: LmExample.causal(t, loss_weight=w, segment_ids=s), Batch)(
        tokens_n, weight, segments_n
    )


def random_pairs(
    seed: int, Batch: hax.Axis, Pos: hax.Axis, *, high: int, max_prompt: int, first_token: int | None = None
) -> DpoExample:
    """Tokens are drawn from [1, high); ``first_token`` replaces the chosen side's first token of the first pair."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(2, max_prompt, size=Batch.size)
    return DpoExample(
        chosen=_side(rng, Batch, Pos, high, prompts, first_token), rejected=_side(rng, Batch, Pos, high, prompts, None)
    )
