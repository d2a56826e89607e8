# Copyright The Marin Authors
# SPDX-License-Identifier: Apache-2.0

"""SimPO on UltraFeedback from the Llama-3-Base-8B SFT model, with the SimPO paper's Llama-3-Base settings.

beta 2.0, gamma/beta 0.5 (gamma 1.0), lr 6e-7, 128 pairs per step, 2048-token sequences, cosine decay after 10%
warmup, one epoch over ``train_prefs``; ``test_prefs`` is the evaluation set.

    uv run python -m experiments.exp2101_simpo_ultrafeedback --version dev          # print the plan
    uv run python -m experiments.exp2101_simpo_ultrafeedback --version dev --run    # build it

``uv run python experiments/exp2101_simpo_ultrafeedback.py ...`` works the same.
"""

import os
import sys

if __name__ == "__main__" and not __package__:
    # run as a file, Python puts experiments/ on the path rather than the repository root that `-m` uses
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fray.types import ResourceConfig
from levanter.layers.rotary import DefaultRotaryEmbeddingsConfig
from levanter.models.llama import LlamaConfig

from experiments.defaults import default_preference_tokenize, default_simpo
from experiments.simple_simpo_config import SimpleSimPOConfig
from marin.execution.lazy import ArtifactStep
from marin.experiment.cli import experiment_main
from marin.experiment.data import hf_download
from marin.training.training import LevanterCheckpoint

SFT_MODEL = "princeton-nlp/Llama-3-Base-8B-SFT"
SEQ_LEN = 2048

# Llama-3's chat layout, with the assistant turn (and its <|eot_id|>) inside {% generation %} so the
# preference loss averages over completion tokens only; the text it renders is the stock template's.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {%- if message['role'] == 'assistant' %}\n"
    "        {%- generation %}{{- message['content'] | trim }}{{- '<|eot_id|>' }}{%- endgeneration %}\n"
    "    {%- else %}\n"
    "        {{- message['content'] | trim }}{{- '<|eot_id|>' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# Llama-3-8B's architecture (the SFT model's), at the training sequence length.
llama3_8b = LlamaConfig(
    max_seq_len=SEQ_LEN,
    hidden_dim=4096,
    intermediate_dim=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    rope=DefaultRotaryEmbeddingsConfig(theta=500000.0),
    reference_checkpoint=SFT_MODEL,
    tokenizer=SFT_MODEL,
)

simpo_config = SimpleSimPOConfig(
    resources=ResourceConfig.with_tpu("v5p-32"),
    train_batch_size=128,
    num_train_epochs=1,
    learning_rate=6e-7,
    beta=2.0,
    gamma_beta_ratio=0.5,
    warmup=0.1,
    lr_schedule="cosine",
    max_seq_len=SEQ_LEN,
    validation_split_fraction=None,
    tokenizer=SFT_MODEL,
    model_name_or_path=SFT_MODEL,
    steps_per_eval=100,
    steps_per_checkpoint=200,
    steps_per_hf_export=200,
    hf_save_dtype="bfloat16",
)

# Dataset artifacts pin a calendar version so reruns reuse the caches.
DATA_VERSION = "2026.01.24"


def build() -> ArtifactStep[LevanterCheckpoint]:
    """The step graph: download -> tokenize (train_prefs, test_prefs) -> SimPO."""
    ultrafeedback = hf_download(
        "raw/ultrafeedback_binarized",
        hf_id="HuggingFaceH4/ultrafeedback_binarized",
        # no commit pinned yet: this was written without Hub access; pin one before relying on the cache
        revision="main",
        urls_glob=["data/train_prefs-*.parquet", "data/test_prefs-*.parquet"],
        version=DATA_VERSION,
    )
    train_prefs, test_prefs = (
        default_preference_tokenize(
            f"tokenized/ultrafeedback_binarized_{split}_llama3",
            tokenizer=SFT_MODEL,
            raw=ultrafeedback,
            glob=f"data/{split}-*.parquet",
            validation=split == "test_prefs",
            chat_template=LLAMA3_CHAT_TEMPLATE,
            version=DATA_VERSION,
        )
        for split in ("train_prefs", "test_prefs")
    )
    return default_simpo(
        "checkpoints/simpo/ultrafeedback_llama3_8b_base",
        train_prefs,
        llama3_8b,
        simpo_config,
        validation=[test_prefs],
        tags=["ultrafeedback", "llama3", "dpo"],
    )


if __name__ == "__main__":
    experiment_main(build)()
