# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The persistent JAX compilation cache is on by default for SimPO runs, settable, and can be turned off."""

import jax
import jax.numpy as jnp

from levanter.main.simpo_compilation_cache import default_compilation_cache_dir, with_compilation_cache
from levanter.trainer import TrainerConfig


def test_the_cache_defaults_to_a_user_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert with_compilation_cache(TrainerConfig()).jax_compilation_cache_dir == str(
        tmp_path / "levanter" / "jax_compilation_cache"
    )
    assert default_compilation_cache_dir() == str(tmp_path / "levanter" / "jax_compilation_cache")


def test_a_set_path_or_empty_string_is_kept(tmp_path):
    chosen = TrainerConfig(jax_compilation_cache_dir=str(tmp_path))
    assert with_compilation_cache(chosen).jax_compilation_cache_dir == str(tmp_path)
    assert with_compilation_cache(TrainerConfig(jax_compilation_cache_dir="")).jax_compilation_cache_dir == ""


def test_the_default_cache_receives_compiled_programs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = with_compilation_cache(TrainerConfig())
    settings = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {k: getattr(jax.config, k) for k in settings}
    try:
        config._initialize_jax_config()
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.jit(lambda x: jnp.sin(x) * 3 + x.sum())(jnp.arange(7.0)).block_until_ready()
    finally:
        for k, v in previous.items():
            jax.config.update(k, v)
    assert any((tmp_path / "levanter" / "jax_compilation_cache").iterdir())
