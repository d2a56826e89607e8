# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The pipeline's sequences, trained positions and cut counts against an independent re-implementation of the
SimPO reference trainer's tokenization (princeton-nlp/SimPO ``tokenize_row`` after alignment-handbook's chat
rendering), on a few hundred generated rows with prompts and completions over both budgets."""

import random

import jinja2
import numpy as np
import pytest
from preference_build import build_and_check
from preference_chat_fixtures import LLAMA3_TEMPLATE, WORDS, llama3_style_tokenizer, preference_row
from tokenizers import Tokenizer

MAX_LENGTH, MAX_PROMPT_LENGTH = 96, 40
ROWS = 300


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS[3:]) for _ in range(rng.randint(low, high)))


def generated_rows(seed: int = 0) -> list[dict]:
    """Short and long prompts and completions, some after an earlier exchange, so pairs fit, need a prompt cut,
    or need both cuts."""
    rng = random.Random(seed)
    rows = []
    for i in range(ROWS):
        long_prompt, long_completion = rng.random() < 0.4, rng.random() < 0.4
        history = ()
        if rng.random() < 0.2:
            history = (
                {"role": "system", "content": _text(rng, 1, 8)},
                {"role": "user", "content": _text(rng, 1, 10)},
                {"role": "assistant", "content": _text(rng, 1, 10)},
            )
        rows.append(
            preference_row(
                _text(rng, 30, 120) if long_prompt else _text(rng, 1, 25),
                _text(rng, 40, 110) if long_completion else _text(rng, 1, 30),
                _text(rng, 1, 110),
                prompt_id=f"row{i}",
                history=history,
            )
        )
    return rows


class ReferenceTrainer:
    """What the reference does with a row: alignment-handbook renders the prompt turns and, on its own, the final
    assistant turn (BOS text stripped); ``tokenize_row`` tokenizes them, adds BOS to the prompt and EOS to each
    answer unless present, then cuts in its order and labels the prompt -100."""

    def __init__(self, tokenizer_json: str, bos: str, eos: str, mode: str):
        self.tokenizer = Tokenizer.from_file(tokenizer_json)
        self.bos, self.eos = bos, eos
        self.bos_id, self.eos_id = self.tokenizer.token_to_id(bos), self.tokenizer.token_to_id(eos)
        plain = LLAMA3_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        self.template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(plain)
        self.mode = mode

    def render(self, messages: list[dict]) -> str:
        return self.template.render(messages=messages, bos_token=self.bos, eos_token=self.eos)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def answer(self, prompt_text: str, message: dict) -> list[int]:
        text = self.render([message])
        if text.startswith(self.bos):
            text = text[len(self.bos) :]
        # build_tokenized_answer: tokenize prompt + answer together and split after the prompt's tokens
        prompt_ids, full = self.encode(prompt_text), self.encode(prompt_text + text)
        assert full[: len(prompt_ids)] == prompt_ids
        answer = full[len(prompt_ids) :]
        return answer if answer and answer[-1] == self.eos_id else [*answer, self.eos_id]

    def tokenize_row(self, row: dict) -> tuple[dict[str, tuple[list[int], list[int]]], bool, bool]:
        prompt_text = self.render(row["chosen"][:-1])
        prompt = self.encode(prompt_text)
        if not prompt or prompt[0] != self.bos_id:
            prompt = [self.bos_id, *prompt]
        answers = {"chosen": self.answer(prompt_text, row["chosen"][-1])}
        answers["rejected"] = self.answer(prompt_text, row["rejected"][-1])
        answer_lengths = {side: len(a) for side, a in answers.items()}
        longer = max(answer_lengths.values())
        prompts = dict.fromkeys(answers, prompt)
        for side, p in prompts.items():
            if len(p) + longer > MAX_LENGTH:
                prompts[side] = p[:MAX_PROMPT_LENGTH] if self.mode == "keep_start" else p[-MAX_PROMPT_LENGTH:]
        for side, p in prompts.items():
            if len(p) + longer > MAX_LENGTH:
                answers[side] = answers[side][: MAX_LENGTH - MAX_PROMPT_LENGTH]
        prompt_cut = len(prompts["chosen"]) < len(prompt)
        completions_cut = any(len(answers[side]) < n for side, n in answer_lengths.items())
        sequences = {side: (prompts[side] + a, [-100] * len(prompts[side]) + a) for side, a in answers.items()}
        return sequences, prompt_cut, completions_cut


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_masks_and_counts_match_the_reference_trainer(tmp_path, mode):
    tokenizer = llama3_style_tokenizer(tmp_path)
    rows = generated_rows()
    built = build_and_check(
        tokenizer, rows, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, truncation_mode=mode
    )
    reference = ReferenceTrainer(str(tmp_path / "tokenizer.json"), tokenizer.bos_token, tokenizer.eos_token, mode)

    assert built.stats.pairs == ROWS
    cuts = {"prompt": 0, "completions": 0, "pairs": 0}
    for row, record in zip(rows, built.records):
        expected, prompt_cut, completions_cut = reference.tokenize_row(row)
        cuts["prompt"] += prompt_cut
        cuts["completions"] += completions_cut
        cuts["pairs"] += prompt_cut or completions_cut
        for side in ("chosen", "rejected"):
            ours, ours_trained = record[f"{side}_input_ids"], record[f"{side}_assistant_masks"] != 0
            tokens, labels = expected[side]
            trained = np.asarray(labels) != -100
            np.testing.assert_array_equal(ours_trained, trained, err_msg=f"{row['prompt_id']} {side}")
            if mode == "keep_end" and prompt_cut:
                # the one deliberate difference: the reference's keep_end cut drops BOS, ours keeps it in place
                # of the prompt's earliest kept token
                assert ours[0] == tokenizer.bos_token_id and tokens[0] != tokenizer.bos_token_id
                np.testing.assert_array_equal(ours[1:], tokens[1:])
            else:
                np.testing.assert_array_equal(ours, tokens, err_msg=f"{row['prompt_id']} {side}")
            assert len(ours) <= MAX_LENGTH

    assert built.stats.cut == cuts
    # every branch is exercised: pairs that fit, prompt-only cuts, completion-only cuts and both
    both = cuts["prompt"] + cuts["completions"] - cuts["pairs"]
    assert min(ROWS - cuts["pairs"], cuts["pairs"] - cuts["completions"], cuts["pairs"] - cuts["prompt"], both) >= 20
