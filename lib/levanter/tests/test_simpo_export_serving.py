# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The tiny default's HF export is servable as trained: generation stops at the chat template's end of turn as well
as EOS, and the exported tokenizer carries the chat template the pairs were rendered with."""

import json

import yaml
from simpo_tiny_run import REPO, run, tiny_config, training_subset_config

from levanter.simpo.results.export import generation_eos_token_ids
from levanter.tokenizers import load_tokenizer

TOKENIZER = REPO / "lib" / "levanter" / "data" / "tiny_simpo" / "tokenizer"
# the 8B recipe's Llama-3 template: the tiny tokenizer's layout written without whitespace control, so the export
# can only carry it if it comes from the training format rather than from the tokenizer
LLAMA3_YAML = REPO / "lib" / "levanter" / "config" / "simpo_ultrafeedback_llama3_8b.yaml"


def _with_format_template(config_path, template: str):
    config = yaml.safe_load(config_path.read_text())
    next(iter(config["data"]["components"].values()))["format"]["chat_template"] = template
    config_path.write_text(yaml.safe_dump(config))
    return config_path


def test_the_export_stops_at_end_of_turn_and_carries_the_training_template(tmp_path, repo_cwd):
    template = next(iter(yaml.safe_load(LLAMA3_YAML.read_text())["data"]["components"].values()))["format"][
        "chat_template"
    ]
    tokenizer = load_tokenizer(str(TOKENIZER))
    assert template != tokenizer.chat_template
    config_path = _with_format_template(training_subset_config(tmp_path), template)
    run(
        tiny_config(
            tmp_path,
            "--trainer.id",
            "export",
            "--trainer.num_train_steps",
            "2",
            "--hf_save_steps",
            "2",
            config_path=config_path,
        )
    )

    export = tmp_path / "hf" / "export" / "step-1"
    generation = json.loads((export / "generation_config.json").read_text())
    eot, eos = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert generation["eos_token_id"] == sorted([eot, eos])
    assert json.loads((export / "tokenizer_config.json").read_text())["chat_template"] == template


def test_explicit_stop_tokens_win_over_the_derived_ones():
    tokenizer = load_tokenizer(str(TOKENIZER))
    eot, eos = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert generation_eos_token_ids(tokenizer, None) == sorted([eot, eos])
    assert generation_eos_token_ids(tokenizer, [eos]) == [eos]
