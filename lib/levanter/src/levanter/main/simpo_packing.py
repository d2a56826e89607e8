# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Per-pair SimPO log-prob sums for rows holding several pairs (``levanter.data.text.preference_packing``).

Both functions return ``(logp_sum, count)`` with axes ``{preference_side, ..., pair_in_row}``, the shape
``train_simpo.simpo_loss`` averages, pairs and metrics over; an empty slot (a row with fewer pairs) has count 0
and is left out like the loader's padding pairs.
"""

import haliax as hax
import jax.numpy as jnp
from haliax import Axis, NamedArray

from levanter.data.text.preference_packing import CHOSEN, REJECTED, PrefixSharedPairs
from levanter.layers.attention import AttentionMask
from levanter.models.lm_model import LmExample, LmHeadModel, split_activations
from levanter.models.loss import maybe_fused_next_token_loss


def pairs_axis(max_pairs_per_row: int) -> Axis:
    return Axis("pair_in_row", max_pairs_per_row)


def _per_pair_sum(values: NamedArray, pair_ids: NamedArray, Pairs: Axis, Pos: Axis) -> NamedArray:
    # one-hot, then an elementwise sum: a dot here would run at the accelerator's reduced default precision
    onehot = hax.nn.one_hot(pair_ids, Pairs, dtype=jnp.float32)  # -1 (padding) gives an all-zero row
    return hax.sum(values.astype(jnp.float32) * onehot, axis=Pos)


def packed_logp_sums_and_counts(
    model: LmHeadModel, stacked: LmExample, Pairs: Axis, *, key=None
) -> tuple[NamedArray, NamedArray]:
    """``stacked`` holds chosen and rejected rows on the side axis, packed by ``packed_pair_dataset``."""
    Pos = stacked.tokens.resolve_axis(model.Pos.name)
    if stacked.attn_mask.segment_ids is None:
        raise ValueError("packed pairs need the segment ids Levanter's packer puts in the attention mask")
    segment_ids = stacked.attn_mask.segment_ids[0]
    # the packer numbers segments by global pair index; renumber 0, 1, ... within each row
    valid = segment_ids >= 0
    first = hax.min(hax.where(valid, segment_ids, jnp.iinfo(jnp.int32).max), axis=Pos)
    local = hax.where(valid, segment_ids - first, -1)
    # per-position NLL already multiplied by the shifted completion mask; the prediction at t of token t+1
    # belongs to t's segment, and a trained t+1 is never a segment's first token
    nll = model.compute_next_token_loss(stacked, reduction=None, reduction_axis=(), key=key)
    return -_per_pair_sum(nll, local, Pairs, Pos), _per_pair_sum(stacked.loss_weight, local, Pairs, Pos)


def prefix_shared_attention(rows: PrefixSharedPairs, Pos: Axis) -> AttentionMask:
    """Causal within a pair; the rejected completion sees the prompt but not the chosen completion."""
    KPos = Pos.alias("key_position")
    q_pair, k_pair = rows.pair_ids, rows.pair_ids.rename({Pos.name: KPos.name})
    q_role, k_role = rows.roles, rows.roles.rename({Pos.name: KPos.name})
    allowed = (q_pair.broadcast_axis(KPos) == k_pair) & ~((q_role == REJECTED).broadcast_axis(KPos) & (k_role == CHOSEN))
    return AttentionMask(is_causal=True, explicit_mask=allowed)


def prefix_shared_logp_sums_and_counts(
    model: LmHeadModel, rows: PrefixSharedPairs, Pairs: Axis, *, Side: Axis, key=None
) -> tuple[NamedArray, NamedArray]:
    """One forward pass over ``prompt, chosen, rejected`` rows; per pair, the two completions' sums and counts."""
    Pos = rows.tokens.resolve_axis(model.Pos.name)
    # an auxiliary (mixture-of-experts) loss is not part of the SimPO objective and is not added here
    activations, _ = split_activations(
        model.activations(rows.tokens, prefix_shared_attention(rows, Pos), key=key, pos_ids=rows.pos_ids)
    )
    # the slot before the first rejected token takes the last prompt token's state (see PrefixSharedPairs)
    h = activations.rearrange((..., Pos, model.Embed))
    index = rows.predictor.rearrange(h.axes[:-1]).array
    h = hax.named(jnp.take_along_axis(h.array, index[..., None], axis=-2), h.axes)
    weight = rows.chosen_weight + rows.rejected_weight
    nll = maybe_fused_next_token_loss(
        Pos,
        model.Embed,
        model.Vocab,
        h,
        model.get_lm_head(),
        rows.tokens,
        loss_weight=weight,
        reduction=None,
        reduction_axis=(),
    )
    sums = [-_per_pair_sum(nll * w, rows.pair_ids, Pairs, Pos) for w in (rows.chosen_weight, rows.rejected_weight)]
    counts = [_per_pair_sum(w, rows.pair_ids, Pairs, Pos) for w in (rows.chosen_weight, rows.rejected_weight)]
    return hax.stack(Side, sums), hax.stack(Side, counts)
