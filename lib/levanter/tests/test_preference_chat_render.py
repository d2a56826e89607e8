# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The cache builder's batched rendering (``ChatRenderer``: template compiled once, transcripts encoded together,
the prompt's ids read off the transcript when its tokens prove them) writes exactly the records of a plain per-row
build with Levanter's ``apply_chat_template_with_masks``, on varied rows and tokenizers."""

import json

import numpy as np
import pytest
from preference_chat_fixtures import BOS, EOS, EOT, LLAMA3_TEMPLATE, SPECIAL, llama3_style_tokenizer, preference_row
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from levanter.data.simpo.chat_render import ChatRenderer
from levanter.data.simpo.pair_build import STATUS_ERROR, build_pair, cache_record
from levanter.data.simpo.prompt_completion import PromptCompletionPreferenceFormat
from levanter.data.simpo.rows import PreferenceRowError, describe_row, parse_preference_row
from levanter.tokenizers import load_tokenizer

# a template whose user turns end without a special token: the prompt alone is always encoded on its own
PLAIN_END_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}<|eot_id|>"
    "{% endgeneration %}{% else %}{{ message['content'] | trim }}\n{% endif %}{% endfor %}"
)
CONTEXT_TEMPLATE = "{% if persona is defined %}{{ bos_token }}[{{ persona }}]{% else %}{{ bos_token }}{% endif %}" + (
    LLAMA3_TEMPLATE.removeprefix("{{ bos_token }}")
)
FAILING_TEMPLATE = "{% if messages | length > 3 %}{{ raise_exception('too long') }}{% endif %}" + LLAMA3_TEMPLATE


def byte_level_bpe(directory, *, strip_eot: bool = False):
    """A small byte-level BPE (Llama-3's kind of tokenizer) with its special tokens; ``strip_eot`` gives the
    end-of-turn token ``rstrip``, which turns the read-off of the prompt's ids off."""
    words = "say red blue green cat dog owl please answer the question one two three colours animals".split()
    corpus = [" ".join(words[i:] + words[:i]) + " . , ? \n\n" for i in range(len(words))] * 20
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    if strip_eot:
        tokenizer.add_special_tokens([AddedToken(EOT, rstrip=True, normalized=False)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": "<|pad|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(vocab[t]): {"content": t, "special": True} for t in SPECIAL},
        "chat_template": LLAMA3_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(str(directory))


def varied_rows() -> list[dict]:
    history = (
        {"role": "user", "content": "say one ."},
        {"role": "assistant", "content": "one ."},
    )
    rows = [
        preference_row("say red two times .", "red red .", "red .", prompt_id="plain"),
        preference_row("please answer : the cat ?", "yes , the cat .", "no .", prompt_id="q", history=history),
        preference_row("say blue .", "blue .", "blue .", prompt_id="identical"),  # dropped before rendering
        preference_row("say  green\n\nowl .", "  green owl .  ", "owl\n\n.", prompt_id="spaces"),
        preference_row("count to three .", "one two three .", "one two .", prompt_id="long", history=history * 2),
        {
            **preference_row("say cat .", "cat .", "dog .", prompt_id="persona"),
            "chat_template_kwargs": {"persona": "fox"},
        },
        {**preference_row("say dog .", "dog .", "cat .", prompt_id="system"), "system": "be nice ."},
        {"prompt_id": "broken", "chosen": "not a list", "rejected": []},
    ]
    return rows


def reference_records(tokenizer, fmt: PromptCompletionPreferenceFormat, rows: list[dict]) -> list[dict]:
    """The cache records built row by row with Levanter's ``apply_chat_template_with_masks``, three calls a row."""
    processor = fmt.build_preprocessor(tokenizer)  # for its policy, special-token pattern and kwargs checks
    template = fmt.chat_template or tokenizer.chat_template
    out = []
    for source in rows:
        try:
            row = parse_preference_row(
                source, system_prompt_field=fmt.system_prompt, special_tokens=processor.special_tokens
            )
            kwargs = processor._template_kwargs(source)
        except PreferenceRowError as e:
            out.append(cache_record(STATUS_ERROR, error=str(e)))
            continue
        if row.drop:
            out.append(cache_record(int(row.drop)))
            continue
        try:
            rendered = [
                tokenizer.apply_chat_template_with_masks([conversation], chat_template=template, **kwargs)
                for conversation in (row.prompt, [*row.prompt, row.chosen], [*row.prompt, row.rejected])
            ]
        except Exception as e:  # the template's error
            out.append(cache_record(STATUS_ERROR, error=f"{describe_row(source)}: the chat template fails on it: {e}"))
            continue
        prompt, chosen, rejected = [(r["input_ids"][0], r["assistant_masks"][0]) for r in rendered]
        try:
            for field, (ids, _) in (("chosen", chosen), ("rejected", rejected)):
                if ids[: len(prompt[0])] != prompt[0] or len(ids) == len(prompt[0]):
                    raise PreferenceRowError(
                        "the chat template's tokens for the prompt alone are not a proper prefix of its tokens for "
                        f"the {field!r} transcript, so the completion's first token is unknown"
                    )
            out.append(build_pair(len(prompt[0]), chosen, rejected, processor.policy, tokenizer.decode))
        except PreferenceRowError as e:
            out.append(cache_record(STATUS_ERROR, error=f"{describe_row(source)}: {e}"))
    return out


TOKENIZERS = {
    "word-level": lambda d: llama3_style_tokenizer(d),
    "word-level, adds BOS": lambda d: llama3_style_tokenizer(d, adds_bos=True),
    "byte-level BPE": lambda d: byte_level_bpe(d),
    "byte-level BPE, rstrip end-of-turn": lambda d: byte_level_bpe(d, strip_eot=True),
}
SETTINGS = {
    "final_turn": dict(
        completion_tokens="final_turn", system_prompt="system", chat_template_kwargs="chat_template_kwargs"
    ),
    "generation, cut": dict(completion_tokens="generation", max_length=24, max_prompt_length=12),
    "plain-end template": dict(chat_template=PLAIN_END_TEMPLATE),
    "template kwargs": dict(chat_template=CONTEXT_TEMPLATE, chat_template_kwargs="chat_template_kwargs"),
    "failing template": dict(chat_template=FAILING_TEMPLATE),
}


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("which", TOKENIZERS)
def test_batched_rendering_writes_the_per_row_records(tmp_path, which, settings):
    tokenizer = TOKENIZERS[which](tmp_path / "tokenizer")
    fmt = PromptCompletionPreferenceFormat(**SETTINGS[settings])
    rows = varied_rows()
    got = list(fmt.build_preprocessor(tokenizer)(rows))
    expected = reference_records(tokenizer, fmt, rows)

    assert len(got) == len(expected) == len(rows)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.keys() == e.keys()
        for field in g:
            assert np.array_equal(g[field], e[field]), (i, field, g[field], e[field])
    statuses = [int(r["pair_info"][5]) for r in got]
    assert statuses.count(0) >= 3 or settings == "failing template", statuses  # most rows train


@pytest.mark.parametrize("which", TOKENIZERS)
def test_the_prompt_is_read_off_the_transcript_only_when_proven(tmp_path, which):
    tokenizer = TOKENIZERS[which](tmp_path / "tokenizer")
    renderer = ChatRenderer(tokenizer, LLAMA3_TEMPLATE)
    row = preference_row("please answer : the cat ?", "yes , the cat .", "no .")
    prompt, chosen, rejected = row["chosen"][:-1], row["chosen"], row["rejected"]
    encodings = []
    renderer._encode = lambda texts, encode=renderer._encode: encodings.append(texts) or encode(texts)

    [(prompt_ids, _, _)] = renderer.render_rows([(prompt, chosen, rejected, {})])

    alone = tokenizer.apply_chat_template_with_masks([prompt], chat_template=LLAMA3_TEMPLATE)["input_ids"][0]
    assert prompt_ids == alone
    # Llama-3's turns end with <|eot_id|>: read off the transcript, unless the token strips what follows it
    assert len(encodings) == (2 if "rstrip" in which else 1)
