# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0

"""The knobs of a SimPO run in a Marin experiment; :func:`experiments.defaults.default_simpo` builds the rest.

Defaults are the SimPO paper's Llama-3-Base settings (beta 2.0, gamma/beta 0.5, lr 6e-7, batch 128, cosine
decay after 10% warmup); the loss variants (hinge, label smoothing, SFT term) are off.
"""

from dataclasses import dataclass, field
from typing import Any

from fray.types import ResourceConfig

from levanter.adaptor import LoraAdaptorConfig
from levanter.data.simpo.prompt_completion import CompletionTokens, PromptCompletionPreferenceFormat
from levanter.data.simpo.splits import component_format
from levanter.data.simpo.truncation import TruncationMode
from levanter.main.train_simpo import LossType, TrainSimpoConfig
from levanter.optim.config import AdamConfig, LrSchedule
from levanter.schedule import IntSchedule
from levanter.simpo.objective.layouts import PairLayoutName
from levanter.simpo.results.samples import SamplesConfig


@dataclass(frozen=True)
class SimpleSimPOConfig:
    resources: ResourceConfig

    train_batch_size: int | IntSchedule = 128
    """Preference pairs per step (in every pair layout: packed layouts take the rows that hold this many)."""
    pair_layout: PairLayoutName = "auto"
    """How pairs fill the sequences; ``auto`` takes the fastest exact layout for the accelerator that trains every
    pair, from the pairs' lengths (``levanter.simpo.objective.layouts.resolve_pair_layout``)."""
    max_pairs_per_row: int = 8
    per_device_parallelism: int = -1
    """Rows of the pair layout each device runs at once (Levanter's ``trainer.per_device_parallelism``): below a
    step's rows a device, the step runs as microbatches of this many rows a device, gradients accumulated, the
    loss, metrics and gradients exactly the unsplit step's in every layout. -1: a step's rows at once. A row costs
    at most what a padded pair costs, so what fits ``padded`` fits every layout (docs/speed.md, "Microbatches")."""
    num_train_steps: int | None = None
    num_train_epochs: int | None = None
    """Passes over the training pairs, resolved to steps from the tokenized cache when the run starts.
    Set exactly one of this and ``num_train_steps``."""

    learning_rate: float = 6e-7
    beta: float = 2.0
    gamma_beta_ratio: float = 0.5
    """The target reward margin divided by beta (the paper's gamma is ``beta * gamma_beta_ratio``)."""
    loss_type: LossType = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0

    wandb_project: str = "marin"
    wandb_name: str | None = None
    """The W&B run's display name; None uses the run id."""
    wandb_group: str | None = None
    tokenizer: str | None = None
    """The tokenizer the run expects; checked against the one the preference caches were built with.
    None takes the caches' tokenizer."""
    model_name_or_path: str | None = None
    """An HF checkpoint (hub id or path) to start from."""
    initialize_from_hf: bool | str | None = None
    """None: load ``model_name_or_path`` when set. True/False force it on/off; a string names the checkpoint."""
    initialize_from_checkpoint_path: str | None = None
    """A Levanter checkpoint to start from instead of an HF one."""
    use_hf_model_config: bool = False
    """Take the architecture from the HF checkpoint's config rather than the model config given."""
    lora: LoraAdaptorConfig | None = None
    """Train LoRA adapters on a frozen base instead of every weight; exports are then PEFT adapters."""

    max_seq_len: int = 2048
    """Tokens per chosen or rejected sequence (the reference's ``max_length``); longer pairs are cut to it."""
    completion_tokens: CompletionTokens = "final_turn"
    """What ``|y|`` counts: ``final_turn`` (the reference trainer's: the final turn's header, content, end of turn
    and EOS) or ``generation`` (the chat template's ``{% generation %}`` span)."""
    max_prompt_length: int | None = None
    """Prompt budget of a pair over ``max_seq_len`` (the reference's ``max_prompt_length``); None is half of it."""
    truncation_mode: TruncationMode = "keep_end"
    """Which part of an over-budget prompt stays: its end (the reference's default) or its start."""
    weight_decay: float = 0.0
    warmup: float = 0.1
    """Fraction of the steps (or, if > 1, the number of steps) spent warming up the learning rate."""
    lr_schedule: LrSchedule | str = "cosine"
    """A schedule name, or a Levanter ``LrSchedule`` where the schedule takes settings (a YAML's ``type: ...``)."""
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    """Adam's moments and epsilon: the reference trainer's torch AdamW defaults (Levanter's own beta2 is 0.95)."""
    validation_split_fraction: float | None = 0.1
    """Hold out this fraction of the training pairs for evaluation; None evaluates on the validation caches."""

    steps_per_eval: int = 1000
    run_initial_eval: bool = True
    """Evaluate the starting model before the first step (logged at step 0)."""
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    """At evaluations the model answers the first held-out prompts (docs/configuration.md, "Samples")."""
    steps_per_checkpoint: int = 1000
    """Permanent checkpoints; rolling ones for preemption are taken every 10 minutes regardless."""
    steps_per_hf_export: int | None = 500
    """HF-format exports under ``<output>/hf``; None exports nothing."""
    hf_save_dtype: str | None = None
    hf_generation_eos_token_ids: list[int] | None = None
    """Tokens that stop generation in the exports' generation_config.json; None takes the chat template's
    end-of-turn token(s) and EOS."""
    seed: int = 0

    def __post_init__(self):
        if (self.num_train_steps is None) == (self.num_train_epochs is None):
            raise ValueError("Set exactly one of num_train_steps and num_train_epochs.")
        if self.num_train_epochs is not None and self.num_train_epochs < 1:
            raise ValueError(f"num_train_epochs must be >= 1, got {self.num_train_epochs}")

    def pair_format(self, chat_template: str | None = None) -> PromptCompletionPreferenceFormat:
        """The data format this recipe's pairs are built with: its |y| and budgets are fixed when the preference
        cache is built, so ``default_preference_tokenize`` takes it (``pairs=``) and training checks the cache."""
        return PromptCompletionPreferenceFormat(
            chat_template=chat_template,
            completion_tokens=self.completion_tokens,
            max_length=self.max_seq_len,
            max_prompt_length=self.max_prompt_length,
            truncation_mode=self.truncation_mode,
        )

    @classmethod
    def from_train_config(cls, config: TrainSimpoConfig, **marin_choices) -> "SimpleSimPOConfig":
        """The recipe of a Levanter SimPO config (a YAML's): loss, data format and budgets, optimizer,
        schedule, batch and pair layout, sequence length, evaluation cadence and initial checkpoint.
        ``marin_choices`` sets the rest (``resources`` at least) and may not restate a recipe field."""
        if not isinstance(config.optimizer, AdamConfig):
            raise ValueError(f"a SimPO recipe's optimizer must be adam, got {type(config.optimizer).__name__}")
        formats = [component_format(name, c) for name, c in config.data.components.items()]
        if len(formats) != 1:
            raise ValueError(f"a SimPO recipe has one data component; got {len(formats)}")
        (data_format,) = formats
        if not isinstance(data_format, PromptCompletionPreferenceFormat):
            raise ValueError(
                f"a SimPO recipe's data format is preference_prompt_completion, got {type(data_format).__name__}"
            )
        if not isinstance(config.initialize_from_hf, str):
            raise ValueError("a SimPO recipe names its initial HF checkpoint in initialize_from_hf")
        optimizer = config.optimizer
        seq_len = config.train_seq_len if config.train_seq_len is not None else config.model.max_seq_len
        if data_format.max_length not in (None, seq_len):
            raise ValueError(f"the recipe's max_length {data_format.max_length} is not its sequence length {seq_len}")
        # keyword arguments of this class, each checked by its field's type below
        recipe: dict[str, Any] = dict(
            train_batch_size=config.trainer.train_batch_size,
            pair_layout=config.pair_layout,
            max_pairs_per_row=config.max_pairs_per_row,
            per_device_parallelism=config.trainer.per_device_parallelism,
            learning_rate=optimizer.learning_rate,
            weight_decay=optimizer.weight_decay,
            warmup=optimizer.warmup,
            lr_schedule=optimizer.lr_schedule,
            min_lr_ratio=optimizer.min_lr_ratio,
            max_grad_norm=optimizer.max_grad_norm,
            beta1=optimizer.beta1,
            beta2=optimizer.beta2,
            epsilon=optimizer.epsilon,
            beta=config.beta,
            gamma_beta_ratio=config.gamma_beta_ratio,
            loss_type=config.loss_type,
            label_smoothing=config.label_smoothing,
            sft_weight=config.sft_weight,
            max_seq_len=seq_len,
            completion_tokens=data_format.completion_tokens,
            max_prompt_length=data_format.max_prompt_length,
            truncation_mode=data_format.truncation_mode,
            validation_split_fraction=config.validation_split_fraction,
            steps_per_eval=config.trainer.steps_per_eval,
            run_initial_eval=config.run_initial_eval,
            samples=config.samples,
            tokenizer=config.data.tokenizer,
            model_name_or_path=config.initialize_from_hf,
            use_hf_model_config=config.use_hf_model_config,
            hf_save_dtype=config.hf_save_dtype,
            seed=config.trainer.seed,
        )
        restated = sorted(recipe.keys() & marin_choices.keys())
        if restated:
            raise ValueError(f"{restated} come from the recipe; change them there")
        return cls(**recipe, **marin_choices)
