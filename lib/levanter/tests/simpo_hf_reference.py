# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The reference for what a run's model writes: transformers' greedy ``generate`` from the run's HF export."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from levanter.simpo.results.samples import SamplesConfig, read_samples


def transformers_greedy(model, stops, prompt_ids: list[int]) -> list[int]:
    """transformers' greedy ``generate``, one unpadded prompt, stopping at ``stops``."""
    room = min(SamplesConfig().max_new_tokens, model.config.n_positions - len(prompt_ids))  # within the model
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=room, eos_token_id=stops)
    return out[0, len(prompt_ids) :].tolist()


def check_against_the_export(run_dir: Path, export: Path, step: int) -> list[dict]:
    """The run's samples of ``step`` (the default 8) are what transformers generates from ``export``, stopping
    where the export's generation_config says."""
    _, records = read_samples(run_dir, step)
    assert len(records) == 8 and json.loads((export / "generation_config.json").read_text())["eos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    stops = GenerationConfig.from_pretrained(export).eos_token_id
    for record in records:
        assert record["answer_ids"] == transformers_greedy(model, stops, record["prompt_ids"]), record
    return records
