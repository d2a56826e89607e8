# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""What |y| counts under each ``completion_tokens`` setting, token by token on a Llama-3-style chat, the
BOS / EOS checks that fail a data build naming the row, and rows that spell special tokens out, which are
dropped rather than trusted."""

import re

import numpy as np
import pytest
from preference_build import build_and_check, build_records
from preference_chat_fixtures import BOS, EOS, EOT, LLAMA3_TEMPLATE, llama3_style_tokenizer, preference_row

from levanter.data.simpo.pair_build import PAIR_INFO
from levanter.data.simpo.rows import PreferenceRowError

# (token, trained under final_turn, trained under generation); the last token exists under final_turn only
SAY_RED_TWICE = [
    (BOS, 0, 0),
    ("<|start_header_id|>", 0, 0),
    ("user", 0, 0),
    ("<|end_header_id|>", 0, 0),
    ("\n\n", 0, 0),
    ("say", 0, 0),
    ("red", 0, 0),
    ("two", 0, 0),
    ("times", 0, 0),
    (".", 0, 0),
    (EOT, 0, 0),
    ("<|start_header_id|>", 1, 0),
    ("assistant", 1, 0),
    ("<|end_header_id|>", 1, 0),
    ("\n\n", 1, 0),
    ("red", 1, 1),
    ("red", 1, 1),
    (".", 1, 1),
    (EOT, 1, 1),
    (EOS, 1, None),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return llama3_style_tokenizer(tmp_path_factory.mktemp("llama3_style"))


def _chosen(tokenizer, rows, **format_settings) -> tuple[list[str], np.ndarray, int]:
    """The first row's cached chosen tokens, trained mask and prompt length."""
    record = build_records(tokenizer, rows, **format_settings)[0]
    tokens = tokenizer.convert_ids_to_tokens(record["chosen_input_ids"].tolist())
    return tokens, record["chosen_assistant_masks"], int(record["pair_info"][PAIR_INFO.index("prompt_length")])


_scan = build_and_check


@pytest.mark.parametrize("completion_tokens, column", [("final_turn", 1), ("generation", 2)])
def test_trained_positions_token_by_token(tokenizer, completion_tokens, column):
    tokens, trained, prompt_length = _chosen(
        tokenizer, [preference_row("say red two times .", "red red .", "red .")], completion_tokens=completion_tokens
    )
    expected = [(row[0], row[column]) for row in SAY_RED_TWICE if row[column] is not None]

    assert list(zip(tokens, trained.tolist())) == expected
    assert prompt_length == 11
    # |y|: the reference counts header, content, end-of-turn and the appended EOS; Levanter's mask content and EOT
    assert int(trained.sum()) == {"final_turn": 9, "generation": 4}[completion_tokens]


def _raises_for_row(tokenizer, rows, match, **format_settings):
    with pytest.raises(PreferenceRowError, match=match):
        _scan(tokenizer, rows, **format_settings)


GOOD = preference_row("say red .", "red .", "blue .", prompt_id="good")


def test_a_template_without_bos_fails_naming_the_row(tokenizer):
    no_bos = LLAMA3_TEMPLATE.replace("{{ bos_token }}", "")
    _raises_for_row(
        tokenizer,
        [GOOD],
        r"train row 0: preference row with prompt_id good: chosen sequence: it has BOS at positions \[\]",
        chat_template=no_bos,
    )


def test_a_template_writing_bos_twice_fails(tokenizer):
    _raises_for_row(tokenizer, [GOOD], r"BOS at positions \[0, 1\]", chat_template="{{ bos_token }}" + LLAMA3_TEMPLATE)


def test_bos_written_in_a_message_drops_the_row(tokenizer):
    # the text would tokenize as a second BOS: the row is dropped and counted, the run goes on
    row = preference_row(f"{BOS} say red .", "red .", "blue .")
    assert _scan(tokenizer, [GOOD, row]).rows_dropped_for("special_token_text") == [1]


def test_a_tokenizer_that_adds_bos_does_not_double_the_templates_bos(tmp_path):
    # the known pitfall (template BOS + tokenizer BOS) cannot happen here: chats are encoded without special tokens
    tokenizer = llama3_style_tokenizer(tmp_path, adds_bos=True)
    assert tokenizer.encode("red", add_special_tokens=True)[0] == tokenizer.bos_token_id
    scan = _scan(tokenizer, [GOOD])
    assert scan.stats.pairs == 1


@pytest.mark.parametrize("completion_tokens", ["final_turn", "generation"])
def test_an_end_of_turn_written_in_a_completion_drops_the_row(tokenizer, completion_tokens):
    row = preference_row("say red .", f"red {EOT} red .", "blue .", prompt_id="eot-inside")
    built = _scan(tokenizer, [GOOD, row], completion_tokens=completion_tokens)
    assert built.rows_dropped_for("special_token_text") == [1]


def test_a_template_ending_turns_twice_fails(tokenizer):
    # the template, not the text, writes a second end-of-turn token: every row would be wrong, so the build stops
    doubled = LLAMA3_TEMPLATE.replace("<|eot_id|>{% endgeneration %}", "<|eot_id|><|eot_id|>{% endgeneration %}")
    _raises_for_row(
        tokenizer,
        [GOOD],
        rf"train row 0: .*chosen sequence: its completion holds '{re.escape(EOT)}' 2 times",
        chat_template=doubled,
    )


def test_a_generation_span_without_the_end_of_turn_token(tokenizer):
    outside = LLAMA3_TEMPLATE.replace("<|eot_id|>{% endgeneration %}", "{% endgeneration %}<|eot_id|>")
    _raises_for_row(
        tokenizer,
        [GOOD],
        "its completion ends with '.', not EOS or an end-of-turn token",
        chat_template=outside,
        completion_tokens="generation",
    )
    # the reference's |y| appends EOS, so the same template trains under final_turn
    assert _scan(tokenizer, [GOOD], chat_template=outside).stats.pairs == 1


def test_a_turn_ending_with_eos_gets_no_second_one(tokenizer):
    eos_ended = LLAMA3_TEMPLATE.replace("<|eot_id|>{% endgeneration %}", "{{ eos_token }}{% endgeneration %}")
    tokens, _, _ = _chosen(tokenizer, [GOOD], chat_template=eos_ended)
    assert tokens[-3:] == ["red", ".", EOS]


def test_generation_needs_a_generation_block(tokenizer):
    plain = LLAMA3_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(ValueError, match="has none"):
        build_records(tokenizer, [GOOD], chat_template=plain, completion_tokens="generation")
    assert _scan(tokenizer, [GOOD], chat_template=plain).stats.chosen_tokens.max == 8
