# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""A small word-level tokenizer with Llama-3's special tokens and chat layout, and preference rows in the
ultrafeedback_binarized shape, for the preference data tests (built locally, nothing downloaded)."""

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

from levanter.data.simpo.rows import RowDrop
from levanter.tokenizers import MarinTokenizer, load_tokenizer

BOS, EOS, PAD, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|unk|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL = [PAD, UNK, BOS, EOS, START_HEADER, END_HEADER, EOT]
WORDS = (
    "system user assistant say count repeat the a is it and or of to from red blue green yellow cat dog owl fox "
    "one two three four five six times words numbers please answer question yes no . , ? :"
).split() + [str(i) for i in range(50)]

# Llama-3's chat layout (the 8B config's template): BOS once, then per turn
# <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>, with the assistant content and its
# end-of-turn token marked as the {% generation %} span
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}<|eot_id|>"
    "{% endgeneration %}{% else %}{{ message['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
)


def llama3_style_tokenizer(
    directory: Path, *, chat_template: str | None = LLAMA3_TEMPLATE, adds_bos: bool = False
) -> MarinTokenizer:
    """Writes and loads the tokenizer. ``"\\n\\n"`` is a token of its own, as in Llama-3. ``adds_bos`` gives it a
    post-processor that prepends BOS when asked for special tokens, like Llama-3's own tokenizer."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tokenizer.add_special_tokens(SPECIAL)
    tokenizer.add_tokens([AddedToken("\n\n", normalized=False)])
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
        )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(vocab[t]): {"content": t, "special": True} for t in SPECIAL},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(str(directory))


def preference_row(
    prompt: str, chosen: str, rejected: str, *, prompt_id: str = "p0", history: tuple[dict, ...] = ()
) -> dict:
    """An ultrafeedback_binarized-shaped row; ``history`` are turns before the final user message."""
    turns = [*history, {"role": "user", "content": prompt}]
    return {
        "prompt": prompt,
        "prompt_id": prompt_id,
        "chosen": [*map(dict, turns), {"role": "assistant", "content": chosen}],
        "rejected": [*map(dict, turns), {"role": "assistant", "content": rejected}],
    }


def dropped_counts(**counts: int) -> dict[str, int]:
    """The statistics' ``dropped`` mapping: every reason, zero unless given."""
    reasons = [r.label for r in RowDrop if r != RowDrop.NONE] + ["no_trained_tokens"]
    return {reason: counts.get(reason, 0) for reason in reasons}
