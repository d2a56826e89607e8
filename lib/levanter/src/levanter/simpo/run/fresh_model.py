# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""A model from scratch, built by one program that is compiled cheaply where that matters: on the CPU.

Levanter's ``Trainer.initial_state(model_init=...)`` compiles the model's initialisers and the optimizer state as
one program at XLA's full optimisation. That program runs once, yet XLA's CPU backend spends seconds optimising
its random initialisers: 3.2 s of the small benchmark model's start (0.1 s to run), 1.6 s for the tiny default's
GPT-2, in every fresh process. Compiled without LLVM's optimisations it takes 0.7 s (0.4 s to run) and 0.6 s.
Other backends keep their defaults: TPU compiler options differ, and a GPU compiles these kernels quickly.
The weights differ from the fully optimised program's in the last bits of some values (the same draws, another
instruction order), so a run started before and after this change starts from slightly different weights.
"""

from collections.abc import Callable
from typing import TypeVar

import jax

import haliax as hax
from haliax.partitioning import ResourceMapping

M = TypeVar("M")

# XLA's CPU backend: no LLVM optimisation passes for a program that runs once
ONE_SHOT_CPU_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fresh_model(build: Callable[[], M], axis_mapping: ResourceMapping) -> M:
    """``build()``'s model, laid out on the current mesh as ``axis_mapping`` says (the trainer's parameter
    mapping), for ``Trainer.initial_state(model=...)``."""
    options = ONE_SHOT_CPU_OPTIONS if jax.default_backend() == "cpu" else None
    # named_jit hands jax.jit's keywords through (**pjit_args); its typed overloads list only some of them
    jitted = hax.named_jit(build, axis_resources=axis_mapping, compiler_options=options)  # type: ignore[call-overload]
    return jitted()
