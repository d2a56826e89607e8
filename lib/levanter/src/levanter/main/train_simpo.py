# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""SimPO: reference-free preference optimisation (Meng et al. 2024) on Levanter's trainer.

Per pair, ``logits = avg_logp(chosen) - avg_logp(rejected) - gamma_beta_ratio`` and
``loss = -log sigmoid(beta * logits)``, where ``avg_logp`` is the mean log-probability over the completion
tokens the preference stack marks as trained. One model, no reference model. SIMPO.md maps each term to
the functions below.
"""

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import equinox as eqx
import jax
import jax.random as jrandom

import levanter
import levanter.callbacks
import levanter.config
import levanter.tracker
from haliax import Axis
from haliax.partitioning import round_axis_for_partitioning
from levanter import callbacks
from levanter.adaptor import AdaptorConfig, AdaptorExportConfig, NoAdaptorConfig
from levanter.callbacks import StepInfo
from levanter.compat.hf_checkpoints import build_generation_config
from levanter.data.simpo.shared_prompt import PrefixSharedPairs
from levanter.data.simpo.splits import build_preference_splits, component_format
from levanter.data.simpo.stats import write_pair_stats
from levanter.data.text.preference import DpoExample, PreferenceLmDataConfig
from levanter.main.model_init import load_model_from_source, prepare_model_init_context
from levanter.models.llama import LlamaConfig
from levanter.models.lm_model import LmConfig, LmHeadModel
from levanter.optim.config import AdamConfig, OptimizerConfig
from levanter.simpo.objective.accumulation import SimpoTrainer
from levanter.simpo.objective.layouts import (
    LayoutChoice,
    PairLayout,
    PairLayoutName,
    check_pair_layout,
    layout_note,
    log_rows_per_step,
    trainer_in_rows,
)
from levanter.simpo.objective.loss import LossType, StepShare, _average_logp, simpo_loss, simpo_loss_from_logps
from levanter.simpo.results import picture
from levanter.simpo.results.evaluation import HeldOutEvaluator
from levanter.simpo.results.export import WholeArrayExports, export_tokenizer, generation_eos_token_ids
from levanter.simpo.results.generation import AnswerGenerator
from levanter.simpo.results.samples import HeldOutSamples, SamplesConfig, describe, held_out_prompts
from levanter.simpo.run.checkpoints import (
    CheckpointRecords,
    disk_refusals_named,
    resume_verified,
    training_identity,
)
from levanter.simpo.run.compilation_cache import with_compilation_cache
from levanter.simpo.run.divergence import DivergenceConfig, DivergenceGuard
from levanter.simpo.run.hosts import failing_together
from levanter.simpo.run.initial_state import initial_state
from levanter.simpo.run.lifecycle import RunLifecycle, validate_run_settings
from levanter.simpo.run.nonfinite import NonFiniteGuard
from levanter.simpo.run.tags import check_run_tags, tag_preference_run
from levanter.trainer import TrainerConfig
from levanter.trainer_state import trainables_only
from levanter.utils.jax_utils import parameter_count

logger = logging.getLogger(__name__)

# the objective's public names, where users and the plan import them from
__all__ = [
    "LossType",
    "TrainSimpoConfig",
    "_average_logp",
    "main",
    "reference_optimizer",
    "simpo_loss",
    "simpo_loss_from_logps",
]


def reference_optimizer() -> AdamConfig:
    """The optimizer of the SimPO reference trainer's Llama-3-Base recipe (the ``Llama3-Base`` row of SIMPO.md's
    hyperparameter table and ``training_configs/llama-3-8b-base-simpo.yaml`` of princeton-nlp/SimPO): AdamW at lr
    6e-7, cosine decay after 10% warmup. What that recipe leaves unset comes from the Hugging Face Trainer it runs
    on: weight decay 0, Adam betas (0.9, 0.999), epsilon 1e-8, gradients clipped to norm 1.0, and a cosine that
    decays to 0. Levanter's own AdamConfig defaults (lr 6e-4, weight decay 0.1, beta2 0.95, 1% warmup, decay to
    10%) are a pretraining recipe.

    draccus decodes an ``optimizer`` block of a YAML (or any ``--optimizer.*`` flag) into a new AdamConfig with
    Levanter's defaults for the fields it does not set, not into this one: a config that changes one optimizer field
    states the others too, as ``simpo_ultrafeedback_llama3_8b.yaml`` and ``simpo_tiny_gpt2.yaml`` do."""
    return AdamConfig(
        learning_rate=6e-7,
        weight_decay=0.0,
        beta1=0.9,
        beta2=0.999,
        epsilon=1e-8,
        warmup=0.1,
        lr_schedule="cosine",
        min_lr_ratio=0.0,
        max_grad_norm=1.0,
    )


@dataclass
class TrainSimpoConfig:
    data: PreferenceLmDataConfig = field(default_factory=PreferenceLmDataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: LmConfig = field(default_factory=LlamaConfig)
    train_seq_len: int | None = None
    optimizer: OptimizerConfig = field(default_factory=reference_optimizer)
    """Without an ``optimizer`` block, the SimPO reference recipe's (:func:`reference_optimizer`)."""
    adapter: AdaptorConfig = field(default_factory=NoAdaptorConfig)

    beta: float = 2.0
    gamma_beta_ratio: float = 0.5
    """The target margin divided by beta (the reference trainer's parameter); the paper's gamma is beta times this."""
    loss_type: LossType = "sigmoid"
    label_smoothing: float = 0.0
    """Sigmoid loss only: weight on the flipped-label term, as in the reference trainer (0 to 0.5)."""
    sft_weight: float = 0.0
    """Adds this times the token-mean cross-entropy of the chosen completions."""

    initialize_from_hf: bool | str = False
    use_hf_model_config: bool = False
    initialize_from_checkpoint_path: Optional[str] = None

    pair_layout: PairLayoutName = "auto"
    """How pairs fill the sequences (``levanter.simpo.objective.layouts``): ``padded`` is one pair per chosen/rejected
    row pair; ``packed`` puts up to ``max_pairs_per_row`` pairs in each row pair as attention segments, positions
    restarting at each pair; ``shared_prompt`` puts up to ``max_pairs_per_row`` pairs in one row each as
    ``prompt, chosen, rejected``, the prompt run once; ``auto`` takes the fastest of these for the platform (the
    start-up log says which, and why). Every layout trains the same loss, the mean over a step's pairs, and
    ``trainer.train_batch_size`` counts pairs in every layout: a step takes the rows that hold that many pairs on
    average."""
    max_pairs_per_row: int = 8
    """Most pairs in one row of the ``packed`` and ``shared_prompt`` layouts (at least 1); unused by ``padded``."""

    validation_split_fraction: float | None = 0.1
    """Hold out this fraction of the training pairs; None uses the data config's validation sets instead."""

    hf_save_path: Optional[str] = None
    hf_upload: bool | str = False
    hf_save_steps: int | None = 10000
    hf_save_dtype: Optional[str] = None
    hf_generation_eos_token_ids: Optional[list[int]] = None
    """Tokens that stop generation in the export's generation_config.json; None takes the chat template's
    end-of-turn token(s) and EOS."""
    peft_save_path: Optional[str] = None
    peft_hf_upload: bool | str = False
    merged_hf_save_path: Optional[str] = None
    merged_hf_upload: Optional[str] = None

    data_seed: Optional[int] = None
    run_initial_eval: bool = False
    """Evaluate the held-out pairs once before the first step (logged at step 0), as train_dpo can."""
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    """At evaluations, the model answers the first held-out prompts (``levanter.simpo.results.samples``)."""

    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    """When the run stops because its loss diverged (docs/lifecycle.md, "Divergence"); never with
    ``--divergence.enabled false``."""
    allow_config_change: bool = False
    """Resume even though a training-relevant field differs from the checkpoint's (the change is logged). The fields
    that may change without it are ``levanter.simpo.run.checkpoints.MAY_CHANGE``."""


def validate_config(config: TrainSimpoConfig) -> None:
    """Rejects settings that would train something other than SimPO, before any data or model is touched."""
    if not (math.isfinite(config.beta) and config.beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {config.beta}")
    if not math.isfinite(config.gamma_beta_ratio):
        raise ValueError(f"gamma_beta_ratio must be finite, got {config.gamma_beta_ratio}")
    if config.loss_type not in ("sigmoid", "hinge"):
        raise ValueError(f"loss_type must be 'sigmoid' or 'hinge', got {config.loss_type!r}")
    if not 0.0 <= config.label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {config.label_smoothing}")
    if config.loss_type == "hinge" and config.label_smoothing > 0:
        raise ValueError("label_smoothing applies to the sigmoid loss only; set it to 0 with loss_type='hinge'")
    if not (math.isfinite(config.sft_weight) and config.sft_weight >= 0):
        raise ValueError(f"sft_weight must be a non-negative finite number, got {config.sft_weight}")
    check_pair_layout(config.pair_layout, config.max_pairs_per_row)
    fraction = config.validation_split_fraction
    if fraction is not None and not 0 <= fraction < 1:
        raise ValueError(f"validation_split_fraction must be in [0, 1) or null, got {fraction}")
    config.divergence.validate()
    config.samples.validate()
    if config.initialize_from_hf and config.initialize_from_checkpoint_path is not None:
        raise ValueError("Specify at most one of initialize_from_hf and initialize_from_checkpoint_path")
    if config.initialize_from_hf and config.trainer.initialize_from is not None:
        raise ValueError("Cannot specify both initialize_from_hf and trainer.initialize_from")
    for name, component in config.data.components.items():
        if not getattr(component_format(name, component), "mask_user_turns", True):
            raise ValueError(
                f"data component {name!r} sets mask_user_turns: false, which trains on prompt and padding tokens; "
                "SimPO averages over completion tokens only"
            )
    check_run_tags(config.trainer)
    validate_run_settings(config)


def _restore_from_partial_checkpoint(checkpointed: LmHeadModel, source: LmHeadModel, trainable_filter):
    return eqx.combine(trainables_only(checkpointed, trainable_filter), source)


def main(config: TrainSimpoConfig):
    validate_config(config)
    config = dataclasses.replace(config, trainer=tag_preference_run(config.trainer))
    config = dataclasses.replace(config, trainer=with_compilation_cache(config.trainer))

    tokenizer = config.data.the_tokenizer
    model_context = prepare_model_init_context(
        config.model,
        tokenizer=tokenizer,
        initialize_from_hf=config.initialize_from_hf,
        use_hf_model_config=config.use_hf_model_config,
    )
    if model_context.model is not config.model:
        config = dataclasses.replace(config, model=model_context.model)

    # before Levanter derives it from the batch of pairs: packed layouts count evaluation rows, not pairs
    eval_parallelism_set = config.trainer.per_device_eval_parallelism != -1
    microbatch_per_device = config.trainer.per_device_parallelism  # -1 unless set: rows a device, for packed rows
    train_length = config.train_seq_len if config.train_seq_len is not None else config.model.max_seq_len
    if not 0 < train_length <= config.model.max_seq_len:
        raise ValueError(
            f"train_seq_len must be in [1, model max_seq_len={config.model.max_seq_len}], got {train_length}"
        )
    # auto is decided from the pairs' lengths once the caches are open (LayoutChoice); the closures below see it
    layout: PairLayout

    def loss_function(
        model: LmHeadModel,
        example: DpoExample | PrefixSharedPairs,
        *,
        key=None,
        length_diagnostics: bool = False,
        step: StepShare | None = None,
    ):
        return simpo_loss(
            model,
            example,
            layout=layout,
            beta=config.beta,
            gamma_beta_ratio=config.gamma_beta_ratio,
            loss_type=config.loss_type,
            label_smoothing=config.label_smoothing,
            sft_weight=config.sft_weight,
            length_diagnostics=length_diagnostics,
            step=step,
            key=key,
        )

    def checkpoint_roots() -> list[str]:
        checkpointer = config.trainer.checkpointer
        roots = [checkpointer.expanded_path(run.run_id)]
        return roots + [p for p in [checkpointer.expanded_temporary_path(run.run_id)] if p is not None]

    levanter.trainer.initialize(config)
    # from here a failure on any process of a multi-host run ends every process at once (levanter.simpo.run.hosts);
    # a full disk surfaces from Levanter as a tensorstore traceback of an earlier asynchronous save: named here
    with (
        failing_together(),
        RunLifecycle(config) as run,
        disk_refusals_named(checkpoint_roots),
        contextlib.ExitStack() as stack,
    ):
        # every step's metrics to the run directory and a loss/accuracy progress line, whatever the trackers
        run_dir = picture.record_run(config.trainer)
        optimizer = config.optimizer.build(config.trainer.num_train_steps)
        data_key, model_key, training_key = jrandom.split(jrandom.PRNGKey(config.trainer.seed), 3)
        if config.data_seed is not None:
            logger.info(f"Overriding data seed with {config.data_seed}")
            data_key = jrandom.PRNGKey(config.data_seed)
        adapter_key = jrandom.fold_in(model_key, ord("a"))
        Pos = config.model.max_Pos.resize(train_length)

        choice = LayoutChoice(config.pair_layout, config.max_pairs_per_row, Pos, jax.default_backend())
        splits = build_preference_splits(
            config.data,
            None,
            choose_rows=choice,
            seq_len=Pos.size,
            key=data_key,
            validation_split_fraction=config.validation_split_fraction,
        )
        assert choice.layout is not None
        layout, layout_reason = choice.layout, "auto" if config.pair_layout == "auto" else "as configured"
        # the run's identity records the layout its rows were made by: another platform may resolve auto otherwise
        config = dataclasses.replace(config, pair_layout=layout.name)  # type: ignore[arg-type]
        for split, stats in splits.stats.items():
            logger.info(f"Preference data ({split}): {stats.describe()}")
            levanter.tracker.log_summary(stats.as_metrics(f"data/{split}"))
        for name, rows in splits.train_rows.items():
            logger.info(
                f"{name}: " + layout_note(layout.name, layout_reason, rows, layout.sequences_per_row, Pos.size)
            )
        trainer_config = config.trainer
        if layout.name != "padded":
            trainer_config = trainer_in_rows(
                config.trainer,
                splits.pairs_per_row,
                eval_parallelism_set=eval_parallelism_set,
                microbatch_per_device=microbatch_per_device,
            )
        log_rows_per_step(config.trainer, trainer_config, splits.pairs_per_row if layout.name != "padded" else 1.0)
        # Levanter's Trainer takes loss functions returning (loss, metrics), as its DPO entrypoint's do; its
        # ComputeLossFunction protocol names only the LM form. SimpoTrainer makes microbatches exact (accumulation.py)
        trainer = stack.enter_context(SimpoTrainer(trainer_config, optimizer, loss_function, layout=layout))
        run.attach(trainer)
        parameter_axis_mapping = trainer.parameter_axis_mapping
        Vocab = round_axis_for_partitioning(Axis("vocab", len(tokenizer)), parameter_axis_mapping)
        gamma = config.beta * config.gamma_beta_ratio
        logger.info(f"SimPO: beta={config.beta}, gamma_beta_ratio={config.gamma_beta_ratio}, gamma={gamma}")
        levanter.tracker.log_summary({"simpo/beta": config.beta, "simpo/gamma": gamma})

        def load_source_model() -> LmHeadModel:
            if config.initialize_from_hf or config.initialize_from_checkpoint_path is not None:
                model = load_model_from_source(
                    context=model_context,
                    Vocab=Vocab,
                    model_key=model_key,
                    parameter_axis_mapping=parameter_axis_mapping,
                    compute_dtype=trainer.mp.compute_dtype,
                    cast_to_param=trainer.mp.cast_to_param,
                    hf_ref=config.initialize_from_hf,
                    checkpoint_path=config.initialize_from_checkpoint_path,
                )
            else:
                model = config.model.build(Vocab, key=model_key)
            return config.adapter.apply(model, key=adapter_key, axis_mapping=parameter_axis_mapping)

        identity = training_identity(config, data_identity=splits.sources)
        if layout.name != "padded":
            # another data-parallel width may round the rows a step otherwise, which would move every later batch
            identity["rows_per_step"] = str(trainer_config.train_batch_size)
        # every save writes its record as part of saving (Levanter's Trainer keeps its checkpointer private)
        save_roots = checkpoint_roots()
        records = CheckpointRecords(trainer._checkpointer, save_roots, identity)

        def build_state(resuming: bool):
            pretrained = bool(config.initialize_from_hf) or config.initialize_from_checkpoint_path is not None
            if pretrained and not resuming:
                initial_model = load_source_model()
                state = trainer.initial_state(
                    training_key, model=initial_model, is_trainable=config.adapter.trainable_filter(initial_model)
                )
            elif isinstance(config.adapter, NoAdaptorConfig):
                # a fresh start's initialisation compiled cheaply on the CPU; a resume loads through Levanter
                state = initial_state(trainer, training_key, lambda: config.model.build(Vocab, key=model_key))
            else:
                initial_model = config.adapter.apply(
                    config.model.build(Vocab, key=model_key), key=adapter_key, axis_mapping=parameter_axis_mapping
                )
                state = trainer.initial_state(
                    training_key, model=initial_model, is_trainable=config.adapter.trainable_filter(initial_model)
                )
            if resuming and not isinstance(config.adapter, NoAdaptorConfig):
                # adapter checkpoints hold only the trainable weights; rebuild the frozen base underneath them
                source_model = load_source_model()
                state = dataclasses.replace(
                    state,
                    model=_restore_from_partial_checkpoint(
                        state.model, source_model, config.adapter.trainable_filter(source_model)
                    ),
                )
            return state

        state = resume_verified(trainer, build_state, identity, allow_config_change=config.allow_config_change)
        if run.already_finished(state):
            return
        if jax.process_index() == 0 and config.trainer.checkpointer is not None:
            path = write_pair_stats(splits.stats, config.trainer.checkpointer.expanded_path(trainer.run_id))
            logger.info(f"Wrote the preference data statistics to {path}")
        levanter.tracker.log_summary(
            {
                "parameter_count": parameter_count(state.model),
                "trainable_parameter_count": parameter_count(state.trainable_model),
            }
        )

        # an example is two sequences of Pos tokens (one in the shared-prompt layout), run forward and backward
        sequences = layout.sequences_per_row
        flops_per_token = config.model.flops_per_token(Vocab.size, Pos.size)
        flops_per_example = sequences * 3 * flops_per_token * Pos.size if flops_per_token is not None else None
        trainer.add_hook(
            callbacks.log_performance_stats(sequences * Pos.size, trainer.config.batch_schedule, flops_per_example),
            every=1,
        )

        # exports carry the chat template the pairs were rendered with and stop at its end of turn, for serving;
        # the samples stop where a served model would
        served_tokenizer = export_tokenizer(config.data, tokenizer)
        eos_token_ids = generation_eos_token_ids(served_tokenizer, config.hf_generation_eos_token_ids)

        evaluator = None
        if splits.validation:
            samples = None
            if config.samples.enabled:
                samples = HeldOutSamples(
                    config.samples,
                    held_out_prompts(splits.held_out, config.samples.num_prompts),
                    AnswerGenerator(trainer.compute_axis_mapping, trainer.device_mesh, trainer.mp.compute_dtype),
                    tokenizer,
                    eos_token_ids or [],
                    run_dir,
                )
            evaluator = HeldOutEvaluator(trainer, splits.validation, loss_function, config.sft_weight, samples)
            trainer.add_hook(run.unless_preempted(evaluator), every=config.trainer.steps_per_eval)
        else:
            logger.warning("No held-out preference pairs: training without evaluation or samples.")

        converter = model_context.converter
        if converter is not None:
            # HF exports save the converter's tokenizer; Levanter annotates an HF tokenizer and takes its own
            converter = converter.replaced(tokenizer=served_tokenizer)  # type: ignore[arg-type]
        # before the export hooks: a diverged step is never exported
        if config.divergence.enabled:
            trainer.add_hook(DivergenceGuard(config.divergence, save_roots, records.mark_diverged), every=1)

        config.adapter.install_export_hooks(
            trainer=WholeArrayExports(run.once_per_step(trainer)),
            converter=converter,
            tokenizer=served_tokenizer,
            export=AdaptorExportConfig(
                hf_save_path=config.hf_save_path,
                hf_upload=config.hf_upload,
                hf_save_steps=config.hf_save_steps,
                hf_save_dtype=config.hf_save_dtype,
                # Levanter annotates an HF tokenizer; its MarinTokenizer has the special-token lookups it uses
                generation_config=build_generation_config(served_tokenizer, eos_token_ids),  # type: ignore[arg-type]
                peft_save_path=config.peft_save_path,
                peft_hf_upload=config.peft_hf_upload,
                merged_hf_save_path=config.merged_hf_save_path,
                merged_hf_upload=config.merged_hf_upload,
            ),
        )

        if state.step > 0:
            logger.info(f"Resuming SimPO training from step {state.step}")
        # Levanter's NaN/Inf crash names neither step nor batch and misses non-finite gradients; the guard adds both
        guard = NonFiniteGuard(trainer.config.batch_schedule)
        if config.trainer.crash_on_nan or config.trainer.crash_on_inf:
            trainer.add_hook(guard, every=1)
            guard.check_parameters(state)
        if config.run_initial_eval and evaluator is not None and state.step == 0:
            logger.info("Evaluating the starting model on the held-out pairs.")
            # StepInfo reports the step before state.step, so this logs at step 0, as train_dpo does
            evaluator(StepInfo(dataclasses.replace(state, step=1), 0.0, 0.0))
            evaluator.latest_step = None  # the trained model's evaluation after step 0 is another one, not a repeat
        batches = run.train_batches(
            trainer.data_loader(splits.train(trainer.config.batch_schedule)).iter_from_step(state.step),
            int(state.step),
        )
        train_loader = guard.track(batches, int(state.step))
        with guard.reporting():
            trainer.train(state, train_loader)

        # the trainer's own checkpointer: the last save is committed (or its error raised) inside this block
        if trainer._checkpointer is not None:
            trainer._checkpointer.wait_until_finished()
        # before the trackers finish, which receive it as an artifact
        picture.write_run_picture(run_dir)

    run.report()
    if evaluator is not None and evaluator.latest:
        summary = evaluator.summary()
        if evaluator.samples is not None and evaluator.samples.latest:
            summary += "\nWhat the model writes (two held-out prompts):\n" + "\n".join(
                describe(r) for r in evaluator.samples.latest[:2]
            )
        logger.info(summary)
        print(summary, flush=True)


if __name__ == "__main__":
    levanter.config.main(main)()
