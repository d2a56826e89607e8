# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Checks on raw preference rows before they are rendered: what is malformed (an error naming the row and
field) and what is well formed but cannot teach a preference (a counted drop).

A row holds two chat transcripts, ``chosen`` and ``rejected``, as in ``HuggingFaceH4/ultrafeedback_binarized``:
the same prompt turns followed by one final assistant turn each. The shared turns are SimPO's ``x``, the two
final turns its ``y_w`` and ``y_l``.

Malformed rows raise, because they mean the data set is not in this shape (every row would be wrong) or a
field is broken in a way no drop would explain to a user. Rows that are well formed but useless are kept in
the cache with a reason code and left out of training; the data set counts and logs them by
source row index (Levanter's ``PreferenceChatProcessor`` instead skips empty rows with a per-batch warning,
which shifts every later row's index and leaves no count). The cache builder adds the drops that only show
after tokenization and cuts (``levanter.data.simpo.pair_build``).
"""

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")

# C0 and C1 control characters other than tab, newline and carriage return
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class PreferenceRowError(ValueError):
    """A preference row that is not two chat transcripts sharing a prompt."""


class RowDrop(enum.IntEnum):
    """Why a well-formed row does not train; the value is what the cache stores (0: it trains)."""

    NONE = 0
    EMPTY_COMPLETION = 1
    IDENTICAL_COMPLETIONS = 2
    CONTROL_CHARACTERS = 3
    SPECIAL_TOKEN_TEXT = 4
    """A message spells out a special token (``<|eot_id|>``, BOS, EOS): it would tokenize as the real token and
    end or restart the sequence where the text only mentions it."""
    NO_TRAINED_TOKENS = 5
    """A completion with no trained token, e.g. ``completion_tokens: generation`` with the span cut away."""
    IDENTICAL_AFTER_CUT = 6
    """Both completions train on the same tokens once cut to the budget (e.g. both cut inside the header)."""

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class PreferenceRow:
    prompt: list[dict[str, Any]]
    """The shared turns before the completions (with the row's system prompt first, when it has one)."""
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    drop: RowDrop


def special_token_pattern(tokens: Iterable[str | None]) -> re.Pattern | None:
    """Matches any of ``tokens`` (a tokenizer's special tokens) written out in text."""
    words = sorted({t for t in tokens if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, words))) if words else None


def describe_row(row: Mapping[str, Any]) -> str:
    """How errors name a row: its ``prompt_id`` when it has one, else the start of its prompt."""
    prompt_id = row.get("prompt_id") if isinstance(row, Mapping) else None
    if isinstance(prompt_id, str) and prompt_id:
        return f"preference row with prompt_id {prompt_id}"
    prompt = row.get("prompt") if isinstance(row, Mapping) else None
    if isinstance(prompt, str):
        return f"preference row with prompt {prompt[:60]!r}"
    return "preference row"


def _message(row, field: str, index: int, message: Any) -> dict[str, Any]:
    where = f"{field}[{index}]"
    if not isinstance(message, Mapping):
        raise PreferenceRowError(f"{describe_row(row)}: {where} is a {type(message).__name__}, not a message")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise PreferenceRowError(f"{describe_row(row)}: {where}.role is {role!r}; expected one of {ROLES}")
    if not isinstance(content, str):
        raise PreferenceRowError(
            f"{describe_row(row)}: {where}.content is {'null' if content is None else type(content).__name__}, "
            "not a string"
        )
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PreferenceRowError(
            f"{describe_row(row)}: {where}.content is not valid Unicode (character {e.start} cannot be written "
            "as UTF-8)"
        ) from None
    return dict(message)


def _transcript(row, field: str) -> list[dict[str, Any]]:
    if field not in row or row[field] is None:
        raise PreferenceRowError(f"{describe_row(row)}: missing field {field!r}")
    messages = row[field]
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__len__"):
        raise PreferenceRowError(
            f"{describe_row(row)}: {field!r} is a {type(messages).__name__}; expected a list of "
            "{role, content} messages"
        )
    messages = [_message(row, field, i, m) for i, m in enumerate(messages)]
    if not messages:
        raise PreferenceRowError(f"{describe_row(row)}: {field!r} has no messages")
    if messages[-1]["role"] != "assistant":
        raise PreferenceRowError(
            f"{describe_row(row)}: the last message of {field!r} has role {messages[-1]['role']!r}; it must be the "
            "assistant's completion"
        )
    if len(messages) == 1:
        raise PreferenceRowError(
            f"{describe_row(row)}: {field!r} holds only the assistant's completion; this format expects the whole "
            "conversation, prompt turns first, as in ultrafeedback_binarized"
        )
    if messages[-2]["role"] != "user":
        raise PreferenceRowError(
            f"{describe_row(row)}: the completion in {field!r} follows a {messages[-2]['role']!r} message; it must "
            "answer a user message"
        )
    return messages


def _system_message(row, field: str | None) -> list[dict[str, Any]]:
    if field is None or row.get(field) is None:
        return []
    system = row[field]
    message = dict(system) if isinstance(system, Mapping) else {"content": system}
    message["role"] = "system"
    return [_message(row, field, 0, message)]


def parse_preference_row(
    row: Mapping[str, Any],
    *,
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    system_prompt_field: str | None = None,
    special_tokens: re.Pattern | None = None,
) -> PreferenceRow:
    """Splits a row into its shared prompt and two completions; raises ``PreferenceRowError`` on a malformed row.

    ``special_tokens`` matches the tokenizer's special tokens written as text (``special_token_pattern``)."""
    if not isinstance(row, Mapping):
        raise PreferenceRowError(f"preference row is a {type(row).__name__}, not a mapping")
    chosen, rejected = _transcript(row, chosen_field), _transcript(row, rejected_field)
    prompt = chosen[:-1]
    if prompt != rejected[:-1]:
        raise PreferenceRowError(
            f"{describe_row(row)}: {chosen_field!r} and {rejected_field!r} differ before their final turn; both "
            "must continue the same prompt"
        )
    prompt = _system_message(row, system_prompt_field) + prompt
    chosen_final, rejected_final = chosen[-1], rejected[-1]

    drop = RowDrop.NONE
    if not chosen_final["content"].strip() or not rejected_final["content"].strip():
        drop = RowDrop.EMPTY_COMPLETION
    elif chosen_final["content"].strip() == rejected_final["content"].strip():
        drop = RowDrop.IDENTICAL_COMPLETIONS
    elif any(_CONTROL_CHARACTERS.search(m["content"]) for m in (*prompt, chosen_final, rejected_final)):
        drop = RowDrop.CONTROL_CHARACTERS
    elif special_tokens is not None and any(
        special_tokens.search(m["content"]) for m in (*prompt, chosen_final, rejected_final)
    ):
        drop = RowDrop.SPECIAL_TOKEN_TEXT
    return PreferenceRow(prompt=prompt, chosen=chosen_final, rejected=rejected_final, drop=drop)
