# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""transformers' greedy ``generate`` from HF exports, in the environment of the ``hf-reference`` group (torch,
transformers, safetensors: no Levanter). ``simpo_hf_reference`` runs it as a child process:

    python hf_greedy_reference.py SPEC.json   # SPEC: [{"export": DIR, "prompts": [[ids], ...], "max_new_tokens": N}]

prints, as one JSON line, each export's answers: the new token ids of each prompt, generated alone (unpadded) and
stopped at the export's generation_config ``eos_token_id``, within the model's positions."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, GenerationConfig


def greedy_answers(export: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    stops = GenerationConfig.from_pretrained(export).eos_token_id
    answers = []
    for ids in prompts:
        room = min(max_new_tokens, model.config.n_positions - len(ids))
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=room, eos_token_id=stops)
        answers.append(out[0, len(ids) :].tolist())
    return answers


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    print(json.dumps([greedy_answers(job["export"], job["prompts"], job["max_new_tokens"]) for job in jobs]))
