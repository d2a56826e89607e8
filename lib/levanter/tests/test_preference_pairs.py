# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Preference pairs through Levanter's real cache: the statistics written next to the cache, drops and cuts,
the held-out split over the pairs that train, and the ``DpoExample``s served."""

import dataclasses
import json

import jax.random as jrandom
import numpy as np
import pytest
from haliax import Axis
from preference_chat_fixtures import LLAMA3_TEMPLATE, dropped_counts, llama3_style_tokenizer, preference_row

from levanter.data.text.datasets import DatasetComponent, UrlDatasetSourceConfig
from levanter.data.text.preference import PreferenceChatLmDatasetFormat, PreferenceLmDataConfig
from levanter.data.text.preference_pairs import STATS_FILE, build_preference_splits
from levanter.data.text.preference_prompt_completion import PromptCompletionPreferenceFormat
from levanter.data.text.preference_rows import PreferenceRowError

Pos = Axis("position", 48)


def _rows() -> list[dict]:
    rows = [preference_row(f"count to {i} .", " ".join(["one"] * (1 + i % 5)), "no .") for i in range(10)]
    rows[3] = preference_row("say yes .", "yes .", "yes .", prompt_id="same")  # identical: dropped
    rows[6] = preference_row("say yes .", "", "no .", prompt_id="empty")  # empty completion: dropped
    rows[9] = preference_row(" ".join(["red"] * 60), "yes .", "no .", prompt_id="long")  # over the total budget
    return rows


def _config(tmp_path, rows, format) -> PreferenceLmDataConfig:
    tokenizer_dir = tmp_path / "tokenizer"
    llama3_style_tokenizer(tokenizer_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = UrlDatasetSourceConfig(train_urls=[str(data)])
    return PreferenceLmDataConfig(
        tokenizer=str(tokenizer_dir),
        cache_dir=str(tmp_path / "cache"),
        components={"prefs": DatasetComponent(source=source, format=format)},
        shuffle=False,
    )


def test_splits_stats_and_examples_through_the_cache(tmp_path):
    config = _config(tmp_path, _rows(), PromptCompletionPreferenceFormat(max_prompt_length=24))
    splits = build_preference_splits(config, Pos, key=jrandom.PRNGKey(0), validation_split_fraction=0.2)

    stats = splits.stats["train"]
    assert (stats.rows, stats.pairs) == (10, 8)
    assert stats.dropped == dropped_counts(empty_completion=1, identical_completions=1)
    assert stats.cut == {"prompt": 1, "completions": 0, "pairs": 1}
    assert stats.max_sequence_tokens <= Pos.size
    written = json.loads((tmp_path / "cache" / "prefs" / "train" / STATS_FILE).read_text())
    assert written["stats"]["dropped"] == stats.dropped and written["stats"]["pairs"] == 8
    assert written["dropped_rows"] == {"identical_completions": [3], "empty_completion": [6]}
    assert written["policy"] == {
        "format": "preference_prompt_completion",
        "completion_tokens": "final_turn",
        "max_length": 48,
        "max_prompt_length": 24,
        "truncation_mode": "keep_end",
    }

    # the last 20% of the pairs that train are held out: cache row 9, the long one
    validation = splits.validation["prefs"].as_sync_dataset()
    train = splits.train.as_sync_dataset()
    assert len(validation) == 1 and len(train.get_batch(range(7))) == 7

    example = validation[0]
    tokens, weight = example.chosen.tokens.array, example.chosen.loss_weight.array
    # position t carries the weight of token t + 1: every completion token after the cut prompt, then padding
    trained_positions = np.flatnonzero(weight) + 1
    assert trained_positions.tolist() == list(range(24, 24 + 8))
    assert tokens[0] == config.the_tokenizer.bos_token_id
    assert tokens[31] == config.the_tokenizer.eos_token_id and not tokens[32:].any()

    # every served pair has trained tokens on both sides, so no average log-prob is 0/0 (the e2e run takes the loss)
    for pair in [*train.get_batch(range(7)), example]:
        assert min(pair.chosen.loss_weight.array.sum(), pair.rejected.loss_weight.array.sum()) >= 1


def test_levanter_preference_chat_caches_still_train(tmp_path):
    # Marin's tokenize step writes preference_chat caches: Levanter's masks, no cuts, the same checks and stats
    config = _config(tmp_path, _rows(), PreferenceChatLmDatasetFormat())
    with pytest.raises(PreferenceRowError, match="train row 9: the chosen sequence has 73 tokens, more than the"):
        build_preference_splits(config, Pos, key=jrandom.PRNGKey(0), validation_split_fraction=None)
    wide = Axis("position", 96)
    splits = build_preference_splits(config, wide, key=jrandom.PRNGKey(0), validation_split_fraction=None)
    stats = splits.stats["train"]
    # the plain format has no drop flags: the identical pair trains, the empty completion keeps its <|eot_id|>
    assert (stats.pairs, stats.chosen_tokens.max) == (10, 6)


def test_a_file_that_is_not_utf8_names_its_row(tmp_path):
    config = _config(tmp_path, _rows()[:3], PromptCompletionPreferenceFormat())
    data = tmp_path / "train.jsonl"
    data.write_bytes(data.read_bytes() + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(PreferenceRowError, match=rf"train file .*train.jsonl, row 3: the line is not valid UTF-8"):
        build_preference_splits(config, Pos, key=jrandom.PRNGKey(0), validation_split_fraction=None)


def test_a_cache_built_with_another_template_is_refused(tmp_path):
    config = _config(tmp_path, _rows()[:3], PromptCompletionPreferenceFormat())
    build_preference_splits(config, Pos, key=jrandom.PRNGKey(0), validation_split_fraction=None)
    # Levanter would reuse the cache with a warning, training on the old template's tokens
    untrimmed = PromptCompletionPreferenceFormat(chat_template=LLAMA3_TEMPLATE.replace(" | trim", ""))
    component = dataclasses.replace(config.components["prefs"], format=untrimmed)
    changed = dataclasses.replace(config, components={"prefs": component})
    with pytest.raises(ValueError, match=r"was built with other settings \(chat_template\)"):
        build_preference_splits(changed, Pos, key=jrandom.PRNGKey(0), validation_split_fraction=None)
