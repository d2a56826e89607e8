# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0

"""The knobs of a SimPO run in a Marin experiment; :func:`experiments.defaults.default_simpo` builds the rest.

Defaults are the SimPO paper's Llama-3-Base settings (beta 2.0, gamma/beta 0.5, lr 6e-7, batch 128, cosine
decay after 10% warmup); the loss variants (hinge, label smoothing, SFT term) are off.
"""

from dataclasses import dataclass

from fray.types import ResourceConfig
from levanter.main.train_simpo import LossType
from levanter.schedule import IntSchedule


@dataclass(frozen=True)
class SimpleSimPOConfig:
    resources: ResourceConfig

    train_batch_size: int | IntSchedule = 128
    """Preference pairs per step."""
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
    tokenizer: str | None = None
    """The tokenizer the run expects; checked against the one the preference caches were built with.
    None takes the caches' tokenizer."""
    model_name_or_path: str | None = None
    """An HF checkpoint (hub id or path) to start from."""
    initialize_from_hf: bool | str | None = None
    """None: load ``model_name_or_path`` when set. True/False force it on/off; a string names the checkpoint."""
    initialize_from_checkpoint_path: str | None = None
    """A Levanter checkpoint to start from instead of an HF one."""

    max_seq_len: int = 2048
    """Tokens per chosen or rejected sequence; a longer pair fails the run before training."""
    weight_decay: float = 0.0
    warmup: float = 0.1
    """Fraction of the steps (or, if > 1, the number of steps) spent warming up the learning rate."""
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    validation_split_fraction: float | None = 0.1
    """Hold out this fraction of the training pairs for evaluation; None evaluates on the validation caches."""

    steps_per_eval: int = 1000
    steps_per_checkpoint: int = 1000
    """Permanent checkpoints; rolling ones for preemption are taken every 10 minutes regardless."""
    steps_per_hf_export: int | None = 500
    """HF-format exports under ``<output>/hf``; None exports nothing."""
    hf_save_dtype: str | None = None
    seed: int = 0

    def __post_init__(self):
        if (self.num_train_steps is None) == (self.num_train_epochs is None):
            raise ValueError("Set exactly one of num_train_steps and num_train_epochs.")
        if self.num_train_epochs is not None and self.num_train_epochs < 1:
            raise ValueError(f"num_train_epochs must be >= 1, got {self.num_train_epochs}")
