# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""What an HF export needs so a client serves the trained chat model as it was trained: the chat template the
preference data was rendered with, and generation stopping at that template's end-of-turn token as well as EOS
(a Llama-3 chat model ends its turns with ``<|eot_id|>``, not ``<|end_of_text|>``)."""

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any, cast

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from levanter.callbacks import StepInfo
from levanter.data.simpo.splits import component_format
from levanter.data.text.preference import PreferenceLmDataConfig
from levanter.tokenizers import MarinTokenizer

logger = logging.getLogger(__name__)

# rendered as the assistant's content to find where the template closes the turn
_MARKER = "simpo export marker"


def training_chat_template(data: PreferenceLmDataConfig, tokenizer: MarinTokenizer) -> str | None:
    """The chat template the preference components render with: the formats' own, else the tokenizer's."""
    templates = {
        getattr(component_format(name, c), "chat_template", None) or tokenizer.chat_template
        for name, c in data.components.items()
    }
    templates.discard(None)
    if len(templates) > 1:
        logger.warning(
            "The preference components use %d different chat templates; the HF export keeps the tokenizer's",
            len(templates),
        )
        return tokenizer.chat_template
    return next(iter(templates), None)


def end_of_turn_token_ids(tokenizer: MarinTokenizer) -> list[int]:
    """The special tokens the tokenizer's chat template writes after an assistant message's content."""
    if tokenizer.chat_template is None:
        return []
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _MARKER}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(rendered).__name__}, not the text")
    if _MARKER not in rendered:
        logger.warning("The chat template does not render the assistant's content; no end-of-turn token found")
        return []
    after_content = rendered[rendered.rindex(_MARKER) + len(_MARKER) :]
    special = set(tokenizer.all_special_ids)
    return [t for t in dict.fromkeys(tokenizer.encode(after_content, add_special_tokens=False)) if t in special]


def generation_eos_token_ids(tokenizer: MarinTokenizer, explicit: Iterable[int] | None) -> list[int] | None:
    """``explicit`` when set; otherwise the template's end-of-turn tokens and EOS (None if there are neither)."""
    if explicit is not None:
        return list(explicit)
    ids = [*end_of_turn_token_ids(tokenizer)]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids)) or None


def export_tokenizer(data: PreferenceLmDataConfig, tokenizer: MarinTokenizer) -> MarinTokenizer:
    """The tokenizer to save with HF exports: the training one, carrying the chat template training used."""
    template = training_chat_template(data, tokenizer)
    if template is None or template == tokenizer.chat_template:
        return tokenizer
    return tokenizer.with_chat_template(template)


def replicated(model, mesh: Mesh):
    """``model`` with every array that a mesh axis splits gathered whole onto every device (the others as they are)."""
    whole = NamedSharding(mesh, PartitionSpec())

    def gather(x):
        if not isinstance(x, jax.Array) or x.sharding.is_fully_replicated:
            return x
        return jax.jit(lambda a: a, out_shardings=whole)(x)

    return jax.tree.map(gather, model)


class _WithModel:
    """A step's information with another model to export."""

    def __init__(self, info: StepInfo, model):
        self._info, self.eval_model = info, model

    def __getattr__(self, name):
        return getattr(self._info, name)


@dataclasses.dataclass
class WholeArrayExports:
    """The trainer as the export hooks see it: each hook gets the step's model with its split arrays gathered.

    Levanter's HF export gathers each tensor with ``jax.sharding.reshard(x, P())`` and writes the first addressable
    copy; on a mesh whose axes are ``Auto`` (Levanter's) that reshard leaves the array as it was sharded, so every
    tensor split over a mesh axis (FSDP's embed, tensor parallelism's heads) was written as one device's slice, and
    transformers refused the export. Gathering the model first costs one whole copy of it per device while the
    export runs (none on a data-parallel mesh, whose parameters are already whole everywhere)."""

    trainer: Any

    def __getattr__(self, name):
        return getattr(self.trainer, name)

    def add_hook(self, fn: Callable[[StepInfo], Any], *, every: int):
        def export(info: StepInfo):
            fn(cast(StepInfo, _WithModel(info, replicated(info.eval_model, self.trainer.device_mesh))))

        return self.trainer.add_hook(export, every=every)
