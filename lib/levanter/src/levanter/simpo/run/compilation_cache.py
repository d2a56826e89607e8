# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""A persistent JAX compilation cache, on by default, so a restarted or repeated run skips compiling its step.

Levanter's ``trainer.jax_compilation_cache_dir`` is unset unless a config sets it, and then every start compiles
again (tens of seconds on a CPU, minutes for a large model on TPU). SimPO runs default it to a per-user cache
directory; set it to another path (a bucket path works on TPU pods), or to ``""`` to turn the cache off.
"""

import dataclasses
import os

from levanter.trainer import TrainerConfig


def default_compilation_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "levanter", "jax_compilation_cache")


def with_compilation_cache(trainer: TrainerConfig) -> TrainerConfig:
    """The trainer config with ``jax_compilation_cache_dir`` defaulted (``""`` stays: the cache is off)."""
    if trainer.jax_compilation_cache_dir is not None:
        return trainer
    return dataclasses.replace(trainer, jax_compilation_cache_dir=default_compilation_cache_dir())
