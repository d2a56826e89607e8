# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""``Trainer.initial_state(model_init=...)``, with a fresh start's program compiled cheaply where that matters: on
the CPU.

Levanter initialises the model and the optimizer state by one program compiled at XLA's full optimisation. That
program runs once, yet XLA's CPU backend spends seconds optimising its random initialisers: 3.1 s of the small
benchmark model's start (0.1 s to run), 1.6 s for the tiny default's GPT-2, in every fresh process. The same
program compiled without LLVM's optimisations takes 0.8 s. A state that is loaded (a resume, or
``trainer.initialize_from``) and every other backend go through Levanter unchanged: TPU compiler options differ,
and a GPU compiles these kernels quickly. The weights differ from the fully optimised program's in the last bits
of some values (the same draws, another instruction order).
"""

from collections.abc import Callable
from typing import TypeVar

import jax

import haliax as hax
from levanter.trainer import Trainer
from levanter.trainer_state import TrainerState

M = TypeVar("M")

# XLA's CPU backend: no LLVM optimisation passes for a program that runs once
ONE_SHOT_CPU_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def initial_state(trainer: Trainer, training_key: jax.Array, model_init: Callable[[], M]) -> TrainerState[M]:
    """The state ``trainer.initial_state(training_key, model_init=model_init)`` returns, laid out alike."""
    _, loads = trainer.checkpoint_load_plan()
    if loads or jax.default_backend() != "cpu":
        return trainer.initial_state(training_key, model_init=model_init)

    def init(key):
        # Levanter's init_state_and_model, every parameter trainable
        return TrainerState.init(
            trainer.optimizer,
            model_init(),
            key=key,
            mp=trainer.mp,
            quantization=trainer.config.quantization,
            model_averaging=trainer.config.model_averaging,
        )

    # named_jit hands jax.jit's keywords through (**pjit_args); its typed overloads list only some of them
    jitted = hax.named_jit(  # type: ignore[call-overload]
        init, axis_resources=trainer.parameter_axis_mapping, compiler_options=ONE_SHOT_CPU_OPTIONS
    )
    return jitted(training_key)
