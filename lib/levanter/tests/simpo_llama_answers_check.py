# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""A tiny Llama's answers from the samples' decoder (Levanter's inference engine, which serves the Llama family)
against the plain forward pass, for ``test_simpo_samples.py``; run as a script
(``python simpo_llama_answers_check.py``) it checks them on every mesh of ``MESHES`` over the process's devices
(the test starts it with four virtual CPU devices) and prints one line a mesh."""

import sys

import jax.random as jrandom
import numpy as np

import haliax as hax
from haliax import Axis
from levanter.layers.attention import AttentionMask
from levanter.models.llama import LlamaConfig
from levanter.simpo.results.generation import AnswerGenerator, engine_serves
from levanter.trainer import TrainerConfig
from levanter.utils.mesh import MeshConfig

SEQ = 24
VOCAB = 64
PROMPTS = [[1, 5, 9], [2, 7, 7, 7, 3, 11, 4], [4]]
MESHES = {
    "fsdp": {"data": 4, "replica": 1, "model": 1},
    "tensor_parallel": {"model": 2, "data": 2, "replica": 1},
}
LLAMA = LlamaConfig(max_seq_len=SEQ, hidden_dim=32, intermediate_dim=64, num_layers=2, num_heads=4, num_kv_heads=4,
                    gradient_checkpointing=False)  # fmt: skip


def greedy_by_forward_pass(model, prompt: list[int], answer: list[int]) -> list[int]:
    """Each answer token as the argmax of the plain forward pass over the prompt and the answer before it."""
    ids = hax.named(np.asarray(prompt + answer, dtype=np.int32), "position")
    logits = hax.named_jit(lambda m, i: m(i, attn_mask=AttentionMask.causal()))(model, ids).array
    return np.argmax(np.asarray(logits)[len(prompt) - 1 : -1], axis=-1).tolist()


def check(axes: dict[str, int]) -> list[list[int]]:
    trainer = TrainerConfig(mesh=MeshConfig(axes=axes), require_accelerator=False)
    with trainer.use_device_mesh(), hax.axis_mapping(trainer.parameter_axis_mapping):
        build = hax.named_jit(lambda: LLAMA.build(Axis("vocab", VOCAB), key=jrandom.PRNGKey(5)))
        model = build()  # sharded as training shards it
        assert engine_serves(model)
        generate = AnswerGenerator(trainer.compute_axis_mapping, trainer.device_mesh)
        answers = generate(model, PROMPTS, max_new_tokens=8, stop_ids=[], vocab_size=VOCAB).tokens
        for prompt, answer in zip(PROMPTS, answers):
            assert len(answer) == 8 and answer == greedy_by_forward_pass(model, prompt, answer), (axes, answer)
    return answers


if __name__ == "__main__":
    for name, axes in MESHES.items():
        print(f"{name}: {check(axes)}", flush=True)
    sys.exit(0)
