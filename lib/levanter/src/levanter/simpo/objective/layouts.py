# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Pair layouts: how SimPO's pairs fill the rows of a batch, and how each pair's log-probs come back out.

- ``padded``: Levanter's ``PreferencePairDataset``, one pair a row pair (chosen row, rejected row);
- ``packed``: Levanter ``DpoExample``s of up to ``max_pairs_per_row`` pairs a row pair, grouped by first-fit
  decreasing (``levanter.data.simpo.packing``); segment ids keep the pairs apart in attention, and
  positions restart at each pair, so every position embedding (rotary or absolute) sees what it would see for
  the pair alone;
- ``shared_prompt``: one row of ``prompt, chosen, rejected`` per pair, several pairs a row
  (``levanter.data.simpo.shared_prompt``): the prompt runs once. Its attention needs an explicit mask
  (the rejected completion sees the prompt, not the chosen one), which TPU's splash-attention kernel does not
  take, so there it falls back to reference attention;
- ``auto`` (the default): the fastest of these for the platform that trains every pair, decided from the pairs'
  lengths in the cache (``resolve_pair_layout``, ``LayoutChoice``).

A layout is chosen once from the config (``pair_layout``) and both builds the rows and reduces the model's
per-position log-probs to per-pair sums and counts, with axes ``{preference_side, ..., pair_in_row}``. Log-probs
never include a model's auxiliary loss (a mixture-of-experts router's); the layout returns it apart, and the
loss adds it once.
"""

import abc
import dataclasses
import logging
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

import haliax as hax
from haliax import Axis, NamedArray, NamedOrNumeric
from levanter.data.simpo.cache import CachedPairs
from levanter.data.simpo.packing import first_fit_decreasing
from levanter.data.simpo.shared_prompt import CHOSEN, REJECTED, PrefixSharedPairs
from levanter.data.simpo.splits import PairRows, packed_pair_rows, padded_pair_rows, shared_prompt_rows
from levanter.data.text.preference import DpoExample
from levanter.layers.attention import AttentionMask
from levanter.models.lm_model import LmExample, LmHeadModel, split_activations
from levanter.models.loss import maybe_fused_next_token_loss
from levanter.schedule import IntSchedule, distinct_values
from levanter.trainer import TrainerConfig

logger = logging.getLogger(__name__)

PairLayoutName = Literal["auto", "padded", "packed", "shared_prompt"]
PAIR_LAYOUTS: tuple[str, ...] = ("auto", "padded", "packed", "shared_prompt")

# chosen and rejected completions run through the model as one batch along this axis
Side = Axis("preference_side", 2)


@dataclasses.dataclass(frozen=True)
class PairLogps:
    """Per pair and side: the summed log-prob of the trained tokens, how many there are, and the sum of their
    mean logit (over the vocabulary, what the reference trainer logs as ``logits/*``); plus the model's auxiliary
    loss for the whole batch (0 for most models)."""

    sum: NamedArray
    count: NamedArray
    logit_sum: NamedArray
    aux_loss: NamedOrNumeric


def _per_pair_sum(values: NamedArray, pair_ids: NamedArray, Pairs: Axis, Pos: Axis) -> NamedArray:
    # one-hot, then an elementwise sum: a dot here would run at the accelerator's reduced default precision
    onehot = hax.nn.one_hot(pair_ids, Pairs, dtype=jnp.float32)  # -1 (padding) gives an all-zero row
    return hax.sum(values.astype(jnp.float32) * onehot, axis=Pos)


def _mean_logit(model: LmHeadModel, activations: NamedArray) -> NamedArray:
    # the mean over the vocabulary of h . w_v is h . (mean of w_v): no logits are materialised for it
    return hax.dot(activations, hax.mean(model.get_lm_head(), axis=model.Vocab), axis=model.Embed)


def _next_token_nll(model: LmHeadModel, activations: NamedArray, tokens: NamedArray, weight: NamedArray, Pos: Axis):
    # per position t: -log p(token t+1), times weight[t]
    return maybe_fused_next_token_loss(
        Pos,
        model.Embed,
        model.Vocab,
        activations,
        model.get_lm_head(),
        tokens,
        loss_weight=weight,
        reduction=None,
        reduction_axis=(),
    )


@dataclasses.dataclass(frozen=True)
class PairLayout(abc.ABC):
    name: str
    max_pairs_per_row: int

    @property
    def Pairs(self) -> Axis:
        return Axis("pair_in_row", self.max_pairs_per_row)

    @property
    @abc.abstractmethod
    def sequences_per_row(self) -> int:
        """Sequences of the training length one row of the dataset puts through the model."""

    @abc.abstractmethod
    def rows(self, pairs: CachedPairs, kept: np.ndarray, Pos: Axis) -> PairRows:
        """The pairs at cache rows ``kept`` laid out in rows of ``Pos``."""

    @abc.abstractmethod
    def logps(self, model: LmHeadModel, example, *, key=None) -> PairLogps: ...

    @abc.abstractmethod
    def counts(self, model: LmHeadModel, example) -> NamedArray:
        """Per pair and side, the trained tokens (``PairLogps.count``) from the rows alone, without running the model
        (whose ``Pos`` names the position axis): what a step totals before it is split into microbatches."""


def _stack_sides(example: DpoExample) -> LmExample:
    return jax.tree.map(
        lambda chosen, rejected: hax.stack(Side, [chosen, rejected]),
        example.chosen,
        example.rejected,
        is_leaf=lambda x: isinstance(x, hax.NamedArray),
    )


def _fold_sides(tree, Batch: Axis):
    """Side into the batch axis, batch-major, so each device's rows stay on it and the model sees an ordinary
    batch (mixture-of-experts layers route tokens assuming ``batch, position``)."""

    def fold(x):
        if not isinstance(x, NamedArray) or Side.name not in x.axis_names:
            return x
        others = [a.name for a in x.axes if a.name not in (Batch.name, Side.name)]
        return hax.flatten_axes(x.rearrange((Batch.name, Side.name, *others)), (Batch.name, Side.name), Batch.name)

    return jax.tree.map(fold, tree, is_leaf=lambda x: isinstance(x, NamedArray))


def _positions_within_segments(segment_ids: NamedArray, Pos: Axis) -> NamedArray:
    """0, 1, ... from the first position of each segment (segments are contiguous runs of one id)."""
    index = hax.arange(Pos, dtype=jnp.int32).broadcast_to(segment_ids.axes)
    starts = (segment_ids != hax.roll(segment_ids, 1, Pos)) | (index == 0)
    first = hax.where(starts, index, 0).rearrange(segment_ids.axes)
    segment_start = jax.lax.cummax(first.array, axis=segment_ids.axes.index(Pos))
    return index - hax.named(segment_start, segment_ids.axes)


def _segment_ids(stacked: LmExample) -> NamedArray:
    mask = stacked.attn_mask
    if not isinstance(mask, AttentionMask) or mask.segment_ids is None:
        raise ValueError("packed pair rows need an AttentionMask with segment ids, one segment a pair")
    return mask.segment_ids[0]


def _pairs_within_rows(segment_ids: NamedArray, Pos: Axis) -> NamedArray:
    """Levanter's dataset numbers a padded row's segment by its cache row; renumber 0, 1, ... within each row."""
    valid = segment_ids >= 0
    first = hax.min(hax.where(valid, segment_ids, jnp.iinfo(jnp.int32).max), axis=Pos)
    return hax.where(valid, segment_ids - first, -1)


@dataclasses.dataclass(frozen=True)
class SegmentPackedPairs(PairLayout):
    """``padded`` (Levanter's ``PreferencePairDataset``, one pair a row) and ``packed``: ``DpoExample`` rows."""

    @property
    def sequences_per_row(self) -> int:
        return 2

    def rows(self, pairs: CachedPairs, kept: np.ndarray, Pos: Axis) -> PairRows:
        if self.name == "padded":
            return padded_pair_rows(pairs, kept, Pos)
        return packed_pair_rows(pairs, kept, Pos, self.max_pairs_per_row)

    @staticmethod
    def _sides_and_pairs(model: LmHeadModel, example: DpoExample):
        """Both sides stacked, their position axis, segment ids, and each position's pair within its row."""
        stacked = _stack_sides(example)
        Pos = stacked.tokens.resolve_axis(model.Pos.name)
        segment_ids = _segment_ids(stacked)
        return stacked, Pos, segment_ids, _pairs_within_rows(segment_ids, Pos)

    def logps(self, model: LmHeadModel, example: DpoExample, *, key=None) -> PairLogps:
        stacked, Pos, segment_ids, local = self._sides_and_pairs(model, example)
        pos_ids = _positions_within_segments(segment_ids, Pos)
        (Batch,) = [a for a in example.chosen.tokens.axes if a.name != Pos.name]
        folded, folded_pos_ids = _fold_sides((stacked, pos_ids), Batch)
        activations, aux_loss = split_activations(
            model.activations(folded.tokens, folded.attn_mask, key=key, pos_ids=folded_pos_ids)
        )
        # back to the tokens' axis order: the fused loss pairs predictions with labels by position in the array
        activations = hax.unflatten_axis(activations, Batch.name, (Batch, Side)).rearrange(
            (*stacked.tokens.axes, model.Embed)
        )
        # the prediction at t of token t+1 belongs to t's segment: a pair's first token (BOS) is never trained,
        # so no weight crosses into the next pair
        nll = _next_token_nll(model, activations, stacked.tokens, stacked.loss_weight, Pos)
        weight = stacked.loss_weight
        return PairLogps(
            -_per_pair_sum(nll, local, self.Pairs, Pos),
            _per_pair_sum(weight, local, self.Pairs, Pos),
            _per_pair_sum(_mean_logit(model, activations) * weight, local, self.Pairs, Pos),
            aux_loss,
        )

    def counts(self, model: LmHeadModel, example: DpoExample) -> NamedArray:
        stacked, Pos, _, local = self._sides_and_pairs(model, example)
        return _per_pair_sum(stacked.loss_weight, local, self.Pairs, Pos)


def prefix_shared_attention(rows: PrefixSharedPairs, Pos: Axis) -> AttentionMask:
    """Causal within a pair; the rejected completion sees the prompt but not the chosen completion."""
    KPos = Pos.alias("key_position")
    q_pair, k_pair = rows.pair_ids, rows.pair_ids.rename({Pos.name: KPos.name})
    q_role, k_role = rows.roles, rows.roles.rename({Pos.name: KPos.name})
    allowed = (q_pair.broadcast_axis(KPos) == k_pair) & ~(
        (q_role == REJECTED).broadcast_axis(KPos) & (k_role == CHOSEN)
    )
    return AttentionMask(is_causal=True, explicit_mask=allowed)


@dataclasses.dataclass(frozen=True)
class SharedPromptPairs(PairLayout):
    """``shared_prompt``: ``PrefixSharedPairs`` rows, one forward pass each."""

    @property
    def sequences_per_row(self) -> int:
        return 1

    def rows(self, pairs: CachedPairs, kept: np.ndarray, Pos: Axis) -> PairRows:
        return shared_prompt_rows(pairs, kept, Pos, self.max_pairs_per_row)

    def logps(self, model: LmHeadModel, rows: PrefixSharedPairs, *, key=None) -> PairLogps:
        Pos = rows.tokens.resolve_axis(model.Pos.name)
        activations, aux_loss = split_activations(
            model.activations(rows.tokens, prefix_shared_attention(rows, Pos), key=key, pos_ids=rows.pos_ids)
        )
        # the slot before the first rejected token takes the last prompt token's state (see PrefixSharedPairs)
        h = activations.rearrange((..., Pos, model.Embed))
        index = rows.predictor.rearrange(h.axes[:-1]).array
        h = hax.named(jnp.take_along_axis(h.array, index[..., None], axis=-2), h.axes)
        nll = _next_token_nll(model, h, rows.tokens, rows.chosen_weight + rows.rejected_weight, Pos)
        weights = (rows.chosen_weight, rows.rejected_weight)
        mean_logit = _mean_logit(model, h)
        sums = [-_per_pair_sum(nll * w, rows.pair_ids, self.Pairs, Pos) for w in weights]
        counts = [_per_pair_sum(w, rows.pair_ids, self.Pairs, Pos) for w in weights]
        logits = [_per_pair_sum(mean_logit * w, rows.pair_ids, self.Pairs, Pos) for w in weights]
        return PairLogps(hax.stack(Side, sums), hax.stack(Side, counts), hax.stack(Side, logits), aux_loss)

    def counts(self, model: LmHeadModel, rows: PrefixSharedPairs) -> NamedArray:
        Pos = rows.tokens.resolve_axis(model.Pos.name)
        weights = (rows.chosen_weight, rows.rejected_weight)
        return hax.stack(Side, [_per_pair_sum(w, rows.pair_ids, self.Pairs, Pos) for w in weights])


def check_pair_layout(name: str, max_pairs_per_row: int) -> None:
    if name not in PAIR_LAYOUTS:
        raise ValueError(f"pair_layout must be one of {', '.join(PAIR_LAYOUTS)}, got {name!r}")
    if max_pairs_per_row < 1:
        raise ValueError(f"max_pairs_per_row must be at least 1, got {max_pairs_per_row}")


@dataclasses.dataclass(frozen=True)
class PairLengths:
    """Token counts of the pairs a run trains and evaluates on, from the cache: prompt, and each side with the
    prompt (what one row pair of ``padded`` or ``packed`` holds)."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray

    @staticmethod
    def of(splits: Sequence[CachedPairs]) -> "PairLengths":
        def column(name: str) -> np.ndarray:
            return np.concatenate([p.column(name)[p.kept] for p in splits]) if splits else np.zeros(0, np.int64)

        return PairLengths(column("prompt_length"), column("chosen_length"), column("rejected_length"))

    @property
    def shared(self) -> np.ndarray:
        """Positions of each pair as one shared-prompt row: prompt, chosen, rejected."""
        return self.chosen + self.rejected - self.prompt


def computed_positions(lengths: PairLengths, seq_len: int, max_pairs_per_row: int) -> dict[str, int | None]:
    """Positions each layout runs through the model for these pairs, rows times sequences a row times ``seq_len``
    (first-fit decreasing over all of them at once: about what the splits' rows come to); None for
    ``shared_prompt`` when some pair does not fit its row."""
    n = len(lengths.prompt)
    sides = np.stack([lengths.chosen, lengths.rejected], axis=1)
    packed = len(first_fit_decreasing(sides, seq_len, max_pairs_per_row)) if n else 0
    fits = bool(np.all(lengths.shared <= seq_len))
    shared = len(first_fit_decreasing(lengths.shared, seq_len, max_pairs_per_row)) if n and fits else 0
    return {
        "padded": 2 * n * seq_len,
        "packed": 2 * packed * seq_len,
        "shared_prompt": shared * seq_len if fits else None,
    }


def resolve_pair_layout(
    name: PairLayoutName, seq_len: int, lengths: PairLengths, backend: str, max_pairs_per_row: int = 8
) -> tuple[PairLayoutName, str]:
    """The layout a config's ``pair_layout`` stands for on ``backend``, and why (for the start-up log).

    ``auto`` decides from the pairs themselves, never drops one, and never pads one pair a row: packed rows give
    every model the same loss and gradients. It takes ``shared_prompt`` (the prompt runs once) where the attention
    runs on an explicit mask anyway (the CPU) and every pair, prompt and both completions, fits a row of
    ``seq_len``; ``packed`` otherwise, which trains every pair that fits the run at all: the fused attention
    kernels of GPUs and TPUs take packed pairs' segment ids but not an explicit mask. The reason says what
    fraction of the pairs fits a shared-prompt row and the positions each layout would compute.
    """
    if name != "auto":
        return name, "as configured"
    n = len(lengths.prompt)
    fitting = int(np.sum(lengths.shared <= seq_len))
    positions = computed_positions(lengths, seq_len, max_pairs_per_row)
    computed = ", ".join(
        f"{layout} {count:,}" if count is not None else f"{layout} - (drops {n - fitting} pairs)"
        for layout, count in positions.items()
    )
    facts = (
        f"{fitting} of {n} pairs ({fitting / max(n, 1):.1%}) fit a shared_prompt row of {seq_len} positions; "
        f"positions computed: {computed}"
    )
    if backend != "cpu":
        return "packed", (
            f"auto on {backend}: its fused attention kernel takes packed pairs' segment ids, not shared_prompt's "
            f"explicit mask; {facts}"
        )
    if fitting == n:
        return "shared_prompt", f"auto on cpu: the prompt runs once and every pair fits a row; {facts}"
    return "packed", f"auto on cpu: packed trains every pair, shared_prompt would drop some; {facts}"


@dataclasses.dataclass
class LayoutChoice:
    """Decides a config's ``pair_layout`` once every split's pairs are open (``build_preference_splits``'s
    ``choose_rows``), and lays their rows out with it; ``layout`` and ``reason`` say what it chose."""

    name: PairLayoutName
    max_pairs_per_row: int
    Pos: Axis
    backend: str
    layout: "PairLayout | None" = None
    reason: str = ""

    def __call__(self, splits: Sequence[CachedPairs]):
        lengths = PairLengths.of(splits) if self.name == "auto" else PairLengths.of([])
        resolved, self.reason = resolve_pair_layout(
            self.name, self.Pos.size, lengths, self.backend, self.max_pairs_per_row
        )
        layout = self.layout = pair_layout(resolved, self.max_pairs_per_row)
        logger.info(f"pair_layout {resolved} ({self.reason})")
        return lambda pairs, kept: layout.rows(pairs, kept, self.Pos)


def pair_layout(name: str, max_pairs_per_row: int) -> PairLayout:
    """The layout a config names (after ``resolve_pair_layout``); ``max_pairs_per_row`` is unused by ``padded``."""
    check_pair_layout(name, max_pairs_per_row)
    if name == "auto":
        raise ValueError("pair_layout auto stands for another layout: resolve it first (resolve_pair_layout)")
    if name == "padded":
        return SegmentPackedPairs(name, 1)
    if name == "packed":
        return SegmentPackedPairs(name, max_pairs_per_row)
    if jax.default_backend() == "tpu":
        logger.warning(
            "pair_layout shared_prompt needs an explicit attention mask, which Levanter's TPU splash-attention "
            "kernel does not take: attention falls back to the reference implementation, which can make it slower "
            "than pair_layout packed on TPU"
        )
    return SharedPromptPairs(name, max_pairs_per_row)


def rows_per_step(pairs_per_step: int, pairs_per_row: float, multiple_of: int) -> int:
    """Rows a step takes to hold ``pairs_per_step`` pairs on average: ``train_batch_size`` counts pairs whatever
    the layout, so a recipe keeps its pairs a step. Rounded to a multiple of the data-parallel width."""
    rows = max(1, round(pairs_per_step / pairs_per_row))
    return max(multiple_of, round(rows / multiple_of) * multiple_of)


def trainer_in_rows(
    trainer: TrainerConfig, pairs_per_row: float, *, eval_parallelism_set: bool, microbatch_per_device: int = -1
) -> TrainerConfig:
    """The trainer config with its batch sizes in rows of a layout holding ``pairs_per_row`` pairs on average.

    ``microbatch_per_device`` is the ``trainer.per_device_parallelism`` the config set (-1: none): in rows of the
    layout a device runs at once, a step's rows then being a multiple of that many rows times the data-parallel
    width (a row of any layout costs at most what a padded pair costs, so a setting that fits ``padded`` fits every
    layout). Gradient accumulation stays the exact mean over the step's pairs (``SimpoTrainer``). Evaluation takes
    as many rows a device as a training microbatch (all of a step's, without microbatches), unless the config set
    ``per_device_eval_parallelism``: Levanter derived it from the batch of pairs, which would be several times more
    rows."""
    width = 1 if trainer.allow_nondivisible_batch_size else trainer.data_axis_size
    batch = trainer.train_batch_size
    pairs = max(distinct_values(batch))
    largest_rows = rows_per_step(pairs, pairs_per_row, width)
    microbatching = microbatch_per_device > 0 and microbatch_per_device * trainer.data_axis_size < largest_rows
    if microbatching:
        width = microbatch_per_device * trainer.data_axis_size
    rows: int | IntSchedule
    if isinstance(batch, int):
        largest = rows = rows_per_step(batch, pairs_per_row, width)
    else:
        segments = [dataclasses.replace(p, value=rows_per_step(p.value, pairs_per_row, width)) for p in batch]
        largest = max(p.value for p in segments)
        rows = segments
    eval_per_device = microbatch_per_device if microbatching else -(-largest // trainer.data_axis_size)
    if eval_parallelism_set:
        eval_per_device = trainer.per_device_eval_parallelism
    # per_device_parallelism -1: no microbatches, whatever Levanter derived from the batch of pairs
    return dataclasses.replace(
        trainer,
        train_batch_size=rows,
        per_device_parallelism=microbatch_per_device if microbatching else -1,
        per_device_eval_parallelism=eval_per_device,
    )


def log_rows_per_step(pairs: TrainerConfig, rows: TrainerConfig, pairs_per_row: float) -> None:
    """Logs the rows a step takes for the batch of pairs asked, and its microbatches; warns when rounding to the
    data-parallel width (or the microbatch) moves the pairs a step more than 10% off (each device needs whole
    rows)."""
    microbatch = rows.microbatch_size
    for asked, got in zip(pairs.batch_schedule.segments, rows.batch_schedule.segments, strict=True):
        held = got.value * pairs_per_row
        split = ""
        if microbatch is not None and microbatch < got.value:
            split = (
                f", in {got.value // microbatch} microbatches of {microbatch} rows ({rows.per_device_parallelism} a "
                f"device, about {microbatch * pairs_per_row:.1f} pairs)"
            )
        logger.info(
            f"trainer.train_batch_size {asked.value} pairs (from step {asked.start}): {got.value} rows of "
            f"{pairs_per_row:.2f} pairs on average, {held:.0f} pairs a step{split}"
        )
        if abs(held - asked.value) > 0.1 * asked.value:
            multiple = microbatch if microbatch is not None and microbatch < got.value else None
            logger.warning(
                f"{got.value} rows a step hold about {held:.0f} pairs, not the {asked.value} asked: a step takes "
                f"whole rows, a multiple of the data-parallel width ({rows.data_axis_size}) unless "
                "trainer.allow_nondivisible_batch_size"
                + (f", and of the microbatch ({multiple} rows)" if multiple else "")
                + ". Change train_batch_size (or max_pairs_per_row, or per_device_parallelism) to come closer"
            )


def layout_note(name: str, reason: str, rows: PairRows, sequences_per_row: int, seq_len: int) -> str:
    """What the start-up log says of the layout: why it was chosen, and how full its rows are."""
    filled = rows.real_tokens / max(1, len(rows.pairs_per_row) * sequences_per_row * seq_len)
    return (
        f"pair_layout {name} ({reason}): {rows.pairs_per_row.mean():.2f} pairs a row on average; real tokens fill "
        f"{filled:.1%} of the positions"
    )
