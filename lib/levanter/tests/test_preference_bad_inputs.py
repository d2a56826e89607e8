# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The bad input catalogue (SIMPO.md): one test per kind of bad row, data set or setting. Each ends in an error
naming the row (source row index and prompt_id) or the setting, or in a counted drop; none reaches the loss."""

import copy
import dataclasses
import math
from pathlib import Path

import draccus
import pytest
from preference_build import build_and_check
from preference_chat_fixtures import LLAMA3_TEMPLATE, dropped_counts, llama3_style_tokenizer, preference_row

from haliax import Axis
from levanter.data.simpo.prompt_completion import PromptCompletionPreferenceFormat
from levanter.data.simpo.rows import PreferenceRowError
from levanter.data.simpo.splits import num_validation_pairs
from levanter.main import train_simpo
from levanter.main.train_simpo import TrainSimpoConfig, validate_config

REPO = Path(__file__).resolve().parents[3]
Pos = Axis("position", 64)
GOOD = preference_row("say red .", "red .", "blue .", prompt_id="good")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return llama3_style_tokenizer(tmp_path_factory.mktemp("llama3_style"))


def scan(tokenizer, rows, **format_settings):
    format_settings.setdefault("max_length", Pos.size)
    return build_and_check(tokenizer, rows, **format_settings)


def broken(edit) -> dict:
    row = copy.deepcopy(preference_row("say blue .", "blue .", "red .", prompt_id="bad"))
    edit(row)
    return row


def _set(path, value):
    def edit(row):
        target = row
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _on_both_sides(edit):
    def both(row):
        edit(row["chosen"])
        edit(row["rejected"])

    return both


MALFORMED = {
    "missing chosen": (lambda row: row.pop("chosen"), "missing field 'chosen'"),
    "missing rejected": (lambda row: row.pop("rejected"), "missing field 'rejected'"),
    "null rejected": (_set(["rejected"], None), "missing field 'rejected'"),
    "chosen is a string": (_set(["chosen"], "blue ."), "'chosen' is a str; expected a list"),
    "no messages": (_set(["chosen"], []), "'chosen' has no messages"),
    "message not a mapping": (_set(["chosen", 0], "say blue ."), r"chosen\[0\] is a str, not a message"),
    "null content": (_set(["chosen", 1, "content"], None), r"chosen\[1\].content is null, not a string"),
    "numeric content": (_set(["rejected", 1, "content"], 3), r"rejected\[1\].content is int, not a string"),
    "unknown role": (_set(["chosen", 0, "role"], "human"), r"chosen\[0\].role is 'human'"),
    "no assistant turn": (lambda row: row["rejected"].pop(), "the last message of 'rejected' has role 'user'"),
    "completion only, no prompt": (_on_both_sides(lambda turns: turns.pop(0)), "holds only the assistant's"),
    "two assistant turns in a row": (
        _on_both_sides(lambda turns: turns.insert(1, {"role": "assistant", "content": "hi"})),
        "follows a 'assistant' message",
    ),
    "different prompts": (_set(["rejected", 0, "content"], "say red ."), "differ before their final turn"),
    "not UTF-8 (lone surrogate)": (
        _set(["chosen", 1, "content"], "blue \ud800 ."),
        r"chosen\[1\].content is not valid Unicode",
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_rows_fail_naming_row_and_field(tokenizer, case):
    edit, message = MALFORMED[case]
    with pytest.raises(PreferenceRowError, match=rf"train row 2: preference row with prompt_id bad: .*{message}"):
        scan(tokenizer, [GOOD, GOOD, broken(edit)])


def test_a_chat_template_error_names_the_row(tokenizer):
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
    row = broken(_on_both_sides(lambda turns: turns.insert(0, {"role": "system", "content": "be nice ."})))
    with pytest.raises(PreferenceRowError, match="train row 1: .*prompt_id bad: the chat template fails on it"):
        scan(tokenizer, [GOOD, row], chat_template=no_system + LLAMA3_TEMPLATE)


DROPPED = {
    "empty completion": ("chosen", "", "empty_completion"),
    "whitespace completion": ("rejected", "  \n", "empty_completion"),
    "identical completions": ("rejected", "blue .", "identical_completions"),
    "NUL character": ("chosen", "blue \x00 .", "control_characters"),
    "escape character": ("rejected", "red \x1b[0m .", "control_characters"),
}


@pytest.mark.parametrize("case", DROPPED)
def test_useless_rows_are_dropped_and_counted(tokenizer, case):
    side, content, reason = DROPPED[case]
    bad = broken(_set([side, 1, "content"], content))
    result = scan(tokenizer, [GOOD, bad, GOOD])
    assert result.stats.pairs == 2 and result.stats.rows == 3
    assert result.stats.dropped == dropped_counts(**{reason: 1})
    assert result.rows_dropped_for(reason) == [1]
    assert result.kept.tolist() == [0, 2]


def test_a_prompt_longer_than_the_sequence_is_cut_and_trains(tokenizer):
    long_prompt = preference_row(" ".join(["red"] * 200), "blue .", "red .", prompt_id="long")
    result = scan(tokenizer, [long_prompt])
    assert result.stats.pairs == 1
    assert result.stats.cut == {"prompt": 1, "completions": 0, "pairs": 1}
    assert result.stats.prompt_tokens.max == Pos.size // 2  # the default prompt budget: half the sequence


def test_a_completion_cut_to_no_trained_token_is_dropped(tokenizer):
    # 3 completion tokens: the assistant header only, so the {% generation %} span loses every token
    long_prompt = preference_row(" ".join(["red"] * 40), "blue .", "red .", prompt_id="long")
    result = scan(tokenizer, [GOOD, long_prompt], completion_tokens="generation", max_length=24, max_prompt_length=21)
    assert result.stats.dropped == dropped_counts(no_trained_tokens=1)
    assert result.rows_dropped_for("no_trained_tokens") == [1]
    # under the reference's |y| the header is trained, so three tokens per side remain: the same three on both
    # sides, which would train with zero gradient (the reference trainer keeps such pairs)
    header_only = scan(tokenizer, [GOOD, long_prompt], max_length=24, max_prompt_length=21)
    assert header_only.rows_dropped_for("identical_after_cut") == [1]
    assert header_only.stats.pairs == 1


def test_a_tokenizer_without_a_chat_template(tmp_path):
    bare = llama3_style_tokenizer(tmp_path, chat_template=None)
    with pytest.raises(ValueError, match="has no chat template and the data format sets none"):
        PromptCompletionPreferenceFormat().build_preprocessor(bare)
    assert scan(bare, [GOOD], chat_template=LLAMA3_TEMPLATE).stats.pairs == 1


def test_an_empty_data_set(tokenizer):
    with pytest.raises(ValueError, match="The train preference data holds no rows"):
        scan(tokenizer, [])


def test_a_data_set_with_no_trainable_pair(tokenizer):
    identical = broken(_set(["rejected", 1, "content"], "blue ."))
    with pytest.raises(ValueError, match="None of the 2 train preference rows trains.*'identical_completions': 2"):
        scan(tokenizer, [identical, identical])


@pytest.mark.parametrize("pairs", [1, 2, 3, 10, 1000])
@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_a_validation_split_always_leaves_training_pairs(pairs, fraction):
    held_out = num_validation_pairs(pairs, fraction)
    assert pairs - held_out >= 1
    assert held_out >= (1 if pairs > 1 else 0)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"beta": 0.0}, "beta must be a positive finite number"),
        ({"beta": -1.0}, "beta must be a positive finite number"),
        ({"beta": math.nan}, "beta must be a positive finite number"),
        ({"gamma_beta_ratio": math.inf}, "gamma_beta_ratio must be finite"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing applies to the sigmoid loss only"),
        ({"label_smoothing": 0.6}, r"label_smoothing must be in \[0, 0.5\]"),
        ({"sft_weight": -1.0}, "sft_weight must be a non-negative"),
        ({"validation_split_fraction": 1.0}, r"validation_split_fraction must be in \[0, 1\)"),
    ],
)
def test_impossible_loss_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        validate_config(dataclasses.replace(TrainSimpoConfig(), **settings))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_length": 100, "max_prompt_length": 100}, r"max_prompt_length must be in \[1, max_length\)"),
        ({"max_prompt_length": 0}, "max_prompt_length must be at least 1"),
        ({"max_length": 1}, "max_length must be at least 2"),
        ({"truncation_mode": "keep_middle"}, "truncation_mode must be 'keep_end' or 'keep_start'"),
        ({"completion_tokens": "content"}, "completion_tokens must be 'final_turn' or 'generation'"),
    ],
)
def test_impossible_budgets(settings, message):
    with pytest.raises(ValueError, match=message):
        PromptCompletionPreferenceFormat(**settings)


def test_a_prompt_budget_must_leave_the_completions_a_token():
    with pytest.raises(ValueError, match=r"max_prompt_length must be in \[1, max_length\)"):
        PromptCompletionPreferenceFormat(max_length=64, max_prompt_length=64)


def test_no_pair_reaches_the_loss_without_trained_tokens(tokenizer):
    rows = [GOOD, *(broken(_set([side, 1, "content"], content)) for side, content, _ in DROPPED.values())]
    rows.append(preference_row(" ".join(["red"] * 40), "blue .", "red .", prompt_id="long"))
    result = scan(tokenizer, rows, completion_tokens="generation", max_length=24, max_prompt_length=21)
    assert result.kept.tolist() == [0]
    for record in result.records:
        # what the cache holds is what trains: every average log-prob is over at least one token
        chosen, rejected = record["chosen_assistant_masks"], record["rejected_assistant_masks"]
        assert (chosen.sum() >= 1 and rejected.sum() >= 1) or (chosen.sum() == rejected.sum() == 0)


@pytest.mark.parametrize("text", ["<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>"])
def test_a_special_token_written_in_the_text_is_dropped(tokenizer, text):
    quoting = preference_row(f"what does {text} mean ?", "red .", "blue .", prompt_id="quoting")
    result = scan(tokenizer, [GOOD, quoting, GOOD])
    assert result.rows_dropped_for("special_token_text") == [1]
    assert result.stats.dropped == dropped_counts(special_token_text=1)


def test_a_training_sequence_longer_than_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the tiny config's paths are relative to the repository root
    config = draccus.parse(
        TrainSimpoConfig,
        config_path=str(REPO / "lib/levanter/config/simpo_tiny_gpt2.yaml"),
        args=[
            "--train_seq_len",
            "4096",
            "--data.cache_dir",
            str(tmp_path / "cache"),
            "--trainer.tracker",
            '{"type": "json_logger"}',
            "--trainer.checkpointer.base_path",
            str(tmp_path / "checkpoints"),
            "--trainer.log_dir",
            str(tmp_path / "logs"),
        ],
    )
    with pytest.raises(ValueError, match=r"train_seq_len must be in \[1, model max_seq_len=\d+\], got 4096"):
        train_simpo.main(config)
    assert not (tmp_path / "cache").exists()  # rejected before any data is read
