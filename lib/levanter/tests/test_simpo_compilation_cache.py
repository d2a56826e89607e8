# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The persistent JAX compilation cache is on by default for SimPO runs, settable, and can be turned off."""

import os
import subprocess
import sys

from levanter.simpo.run.compilation_cache import default_compilation_cache_dir, with_compilation_cache
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


def test_the_default_cache_receives_compiled_programs(tmp_path):
    # a fresh process: JAX sets its compilation cache up once per process
    program = (
        "import jax, jax.numpy as jnp\n"
        "from levanter.simpo.run.compilation_cache import with_compilation_cache\n"
        "from levanter.trainer import TrainerConfig\n"
        "with_compilation_cache(TrainerConfig())._initialize_jax_config()\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "jax.jit(lambda x: jnp.sin(x) * 3 + x.sum())(jnp.arange(7.0)).block_until_ready()\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", program], env=env, check=True, timeout=300)
    assert any((tmp_path / "levanter" / "jax_compilation_cache").iterdir())
