# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""What a parsed ``TrainSimpoConfig`` trains when a YAML leaves the optimizer out (the SimPO reference recipe), and
that the shipped tiny YAML still trains the optimizer it trained before that default changed."""

import io
from pathlib import Path

import draccus

from levanter.main.train_simpo import TrainSimpoConfig, reference_optimizer
from levanter.optim.config import AdamConfig

TINY_YAML = Path(__file__).resolve().parents[3] / "lib" / "levanter" / "config" / "simpo_tiny_gpt2.yaml"

DATA_AND_MODEL = """
data:
  tokenizer: lib/levanter/data/tiny_simpo/tokenizer
model:
  type: gpt2
  max_seq_len: 64
"""


def _load(yaml_text: str) -> TrainSimpoConfig:
    return draccus.load(TrainSimpoConfig, io.StringIO(yaml_text))


def test_a_yaml_without_an_optimizer_trains_the_reference_llama3_base_recipe():
    optimizer = _load(DATA_AND_MODEL).optimizer
    # spelled out rather than compared with reference_optimizer() alone, so a wrong number there fails here
    expected = AdamConfig(
        learning_rate=6e-7,
        weight_decay=0.0,
        beta1=0.9,
        beta2=0.999,
        epsilon=1e-8,
        warmup=0.1,
        lr_schedule="cosine",
        min_lr_ratio=0.0,
        max_grad_norm=1.0,
    )
    assert optimizer == expected == reference_optimizer()
    # the fields where the recipe departs from Levanter's pretraining defaults, so the test shows it is not them
    levanter = AdamConfig()
    assert (levanter.learning_rate, levanter.weight_decay, levanter.beta2) == (6e-4, 0.1, 0.95)
    assert (levanter.warmup, levanter.min_lr_ratio) == (0.01, 0.1)


def test_the_tiny_yaml_trains_the_optimizer_it_trained_before_the_default_changed():
    with open(TINY_YAML) as f:
        optimizer = draccus.load(TrainSimpoConfig, f).optimizer
    # the fields the YAML set before, on Levanter's AdamConfig defaults, which it trained with for the rest
    before = AdamConfig(learning_rate=3e-3, weight_decay=0.0, warmup=0.1, lr_schedule="cosine")
    assert optimizer == before
    assert (optimizer.beta2, optimizer.min_lr_ratio) == (0.95, 0.1)


def test_an_optimizer_block_starts_from_levanters_defaults_not_the_reference_recipe():
    # draccus decodes a new AdamConfig for the block, as reference_optimizer's docstring warns; configs that change
    # one optimizer field therefore state the recipe's others
    optimizer = _load(DATA_AND_MODEL + "optimizer:\n  learning_rate: 1e-6\n").optimizer
    assert optimizer == AdamConfig(learning_rate=1e-6)
    assert optimizer != reference_optimizer()
