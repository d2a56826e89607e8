# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""``levanter.simpo.run.initial_state`` (how ``train_simpo`` starts a model from scratch) against Levanter's own
compiled initialisation, ``Trainer.initial_state(model_init=...)``, for ``test_simpo_initial_state.py``; run as a
script (``python simpo_initial_state_check.py``) it compares the two trainer states on every mesh of ``MESHES`` over
the process's devices (the test starts it with four virtual CPU devices) and prints one JSON line a mesh."""

import json
import sys

import jax
import jax.random as jrandom
import numpy as np

from haliax import Axis
from levanter.models.llama import LlamaConfig
from levanter.optim.config import AdamConfig
from levanter.simpo.run.initial_state import initial_state
from levanter.tracker import NoopConfig
from levanter.trainer import Trainer, TrainerConfig
from levanter.utils.mesh import MeshConfig

MESHES = {
    "fsdp": {"data": 4, "replica": 1, "model": 1},
    "tensor_parallel": {"model": 2, "data": 2, "replica": 1},
}
LLAMA = LlamaConfig(max_seq_len=32, hidden_dim=64, intermediate_dim=128, num_layers=2, num_heads=4, num_kv_heads=4,
                    gradient_checkpointing=False)  # fmt: skip


def check(axes: dict[str, int]) -> dict:
    config = TrainerConfig(
        mesh=MeshConfig(axes=axes), tracker=NoopConfig(), require_accelerator=False, id="fresh", load_checkpoint=False
    )
    optimizer = AdamConfig(learning_rate=1e-3).build(10)
    with Trainer(config, optimizer, lambda *a, **k: None) as trainer:  # the loss is never called here
        build = lambda: LLAMA.build(Axis("vocab", 128), key=jrandom.PRNGKey(5))  # noqa: E731
        ours = initial_state(trainer, jrandom.PRNGKey(1), build)
        levanters = trainer.initial_state(jrandom.PRNGKey(1), model_init=build)
    a, b = jax.tree.leaves(ours), jax.tree.leaves(levanters)
    assert jax.tree.structure(ours) == jax.tree.structure(levanters)
    split, worst = 0, 0.0
    for x, y in zip(a, b):
        # the train step compiles once for either: same types, weak types included (the step counter)
        assert (x.shape, x.dtype, x.weak_type) == (y.shape, y.dtype, y.weak_type)
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (axes, x.shape, x.sharding, y.sharding)
        split += not x.sharding.is_fully_replicated
        worst = max(worst, float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0)))
    assert worst < 1e-6, (axes, worst)
    return {"leaves": len(a), "split": split, "max_abs_diff": worst}


if __name__ == "__main__":
    for name, axes in MESHES.items():
        print(json.dumps({"mesh": name, **check(axes)}), flush=True)
    sys.exit(0)
