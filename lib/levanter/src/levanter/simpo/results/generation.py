# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Answers of the model being trained to a few prompts: greedy or sampled decoding for any Levanter LM.

Where Levanter's inference engine serves the model (the models with a paged KV cache, the Llama family of the 8B
recipe, on one host: Levanter's engine does not run across hosts yet), it decodes, with the KV cache in the
trainer's compute dtype. Every other model, and every model on several hosts, decodes by recomputing: every step
runs the model over the whole buffer (prompts and the answers so far) and reads the next-token logits at each
row's last position; causal attention makes the padding to the right of a row invisible to it, so each row
decodes exactly as it would alone from position 0, as Hugging Face's ``generate`` does with an unpadded prompt.
That costs ``max_new_tokens`` forward passes over a few rows, small beside the training between two evaluations,
and needs nothing of a model but ``activations`` and ``get_lm_head`` (GPT-2, the tiny default, has no KV cache).
Both give the same greedy answers (``test_simpo_samples.py``).

The recomputing decoder replicates the rows across the mesh and keeps the parameters' training sharding, so it runs
on one device, any mesh and any number of hosts: every process holds the same answers.
"""

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jax.random as jrandom
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import haliax as hax
from haliax import Axis
from haliax.partitioning import ResourceMapping
from levanter.inference.engine import InferenceEngine, InferenceEngineConfig, Request
from levanter.inference.jit_scheduler import SeqDecodingParams
from levanter.layers.attention import AttentionMask
from levanter.models.lm_model import LmHeadModel

Sample = Axis("sample", 1)  # resized to the number of prompts


@dataclasses.dataclass(frozen=True)
class Answers:
    """Per prompt: the generated tokens (a stop token, when one ended the answer, included) and whether a stop
    token ended it before the cap."""

    tokens: list[list[int]]
    stopped: list[bool]


ENGINE_ROUNDS = 32
"""Tokens a sequence gains per call of the engine's decode loop; its page size too."""


def engine_serves(model: LmHeadModel) -> bool:
    """Whether Levanter's inference engine decodes ``model`` here: a model with a paged KV cache, on one host."""
    return hasattr(model, "decode") and hasattr(model, "initial_cache") and jax.process_count() == 1


def answer_buffer_length(prompt_lengths: Sequence[int], max_new_tokens: int, max_length: int) -> int:
    """Positions of the decoding buffer: the longest prompt and its answer, within the model's ``max_length``."""
    longest = max(prompt_lengths)
    if longest >= max_length:
        raise ValueError(f"a sample prompt of {longest} tokens leaves no room to answer in {max_length} positions")
    return min(longest + max_new_tokens, max_length)


def _decode(model: LmHeadModel, tokens, prompt_lengths, limits, stop_ids, key, *, vocab_size: int, temperature: float):
    """The jitted loop: ``tokens`` (rows, positions) holds the prompts left-aligned; each row writes its next token
    after its last one until a stop token or its limit (``limits``: positions a row may fill)."""
    rows, length = tokens.shape
    Rows, Pos = Sample.resize(rows), model.Pos.resize(length)
    mask = AttentionMask.causal()
    head = model.get_lm_head()
    real_vocab = jnp.arange(model.Vocab.size) < vocab_size
    row_index = jnp.arange(rows)

    def next_logits(tokens, ends):
        x = model.activations(hax.named(tokens, (Rows, Pos)), mask, key=None)
        if isinstance(x, tuple):  # models with an auxiliary loss return it beside the activations
            x = x[0]
        last = x.rearrange((Rows, Pos, model.Embed)).array[row_index, ends - 1]
        logits = last @ head.rearrange((model.Embed, model.Vocab)).array
        return jnp.where(real_vocab, logits.astype(jnp.float32), -jnp.inf)

    def body(state):
        tokens, ends, done, key = state
        logits = next_logits(tokens, ends)
        if temperature == 0.0:
            chosen = jnp.argmax(logits, axis=-1)
        else:
            key, sub = jrandom.split(key)
            chosen = jrandom.categorical(sub, logits / temperature, axis=-1)
        chosen = chosen.astype(tokens.dtype)
        writes = ~done & (ends < limits)
        position = jnp.minimum(ends, length - 1)
        tokens = tokens.at[row_index, position].set(jnp.where(writes, chosen, tokens[row_index, position]))
        done = done | (writes & jnp.isin(chosen, stop_ids)) | ~writes
        return tokens, ends + writes.astype(ends.dtype), done, key

    def cond(state):
        return ~jnp.all(state[2])

    done = prompt_lengths >= limits
    tokens, ends, _, _ = jax.lax.while_loop(cond, body, (tokens, prompt_lengths, done, key))
    return tokens, ends


class AnswerGenerator:
    """Decodes with the trainer's compute mapping on its mesh; compiled once per prompt set and settings."""

    def __init__(
        self,
        axis_mapping: ResourceMapping | None,
        mesh: jax.sharding.Mesh | None,
        compute_dtype: jnp.dtype = jnp.float32,
    ):
        self._mesh, self._axis_mapping, self._compute_dtype = mesh, axis_mapping, compute_dtype
        self._engine: InferenceEngine | None = None
        self._engine_shape: tuple | None = None
        # haliax's jit keeps the Python numbers (vocab_size, temperature) static
        self._decode = hax.named_jit(_decode, axis_resources=axis_mapping)

    def __call__(
        self,
        model: LmHeadModel,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        vocab_size: int,
        temperature: float = 0.0,
        key: jax.Array | None = None,
    ) -> Answers:
        """Answers ``prompts`` (token ids) with ``model``: greedy at ``temperature`` 0, else sampled with ``key``;
        each answer ends at a token of ``stop_ids`` or after ``max_new_tokens`` (or at the model's length).
        ``vocab_size`` is the tokenizer's: the model's vocabulary axis may be padded for partitioning, and the
        recomputing decoder never picks a padding entry (the engine has no such mask)."""
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"sample prompt {lengths.index(0)} has no tokens")
        length = answer_buffer_length(lengths, max_new_tokens, model.Pos.size)
        prompt_lengths = np.asarray(lengths, dtype=np.int32)
        limits = np.minimum(prompt_lengths + max_new_tokens, length).astype(np.int32)
        if engine_serves(model):
            return self._engine_answers(model, prompts, limits, stop_ids, length, temperature, key)
        buffer = np.zeros((len(prompts), length), dtype=np.int32)
        for row, prompt in enumerate(prompts):
            buffer[row, : len(prompt)] = prompt
        stops = np.asarray(sorted(set(stop_ids)) or [-1], dtype=np.int32)
        inputs = (buffer, prompt_lengths, limits, stops, key if key is not None else jrandom.PRNGKey(0))
        if self._mesh is not None:
            # replicated on every device of every host: each process passes the same values
            replicated = NamedSharding(self._mesh, PartitionSpec())
            inputs = tuple(jax.device_put(x, replicated) for x in inputs)
        tokens, ends = self._decode(model, *inputs, vocab_size=vocab_size, temperature=float(temperature))
        tokens, ends = np.asarray(jax.device_get(tokens)), np.asarray(jax.device_get(ends))
        stop_set = {int(s) for s in stop_ids}
        answers = [[int(t) for t in tokens[row, start : int(ends[row])]] for row, start in enumerate(lengths)]
        return Answers(answers, [bool(a) and a[-1] in stop_set for a in answers])

    def _engine_answers(self, model, prompts, limits, stop_ids, length, temperature, key) -> Answers:
        stops = sorted({int(t) for t in stop_ids})
        # the engine's loop runs max_seq_len // max_rounds calls of max_rounds tokens: a multiple of them fits all
        capacity = math.ceil(length / ENGINE_ROUNDS) * ENGINE_ROUNDS
        # every prompt in the first prefill: the engine admits only what its prefill buffer holds and leaves the
        # rest unanswered
        prefill = sum(len(p) for p in prompts)
        shape = (len(prompts), capacity, len(stops), prefill)
        if self._engine is None or self._engine_shape != shape:
            rows = len(prompts)
            config = InferenceEngineConfig(
                max_seq_len=capacity,
                page_size=ENGINE_ROUNDS,
                max_pages=rows * capacity // ENGINE_ROUNDS,
                max_rounds=ENGINE_ROUNDS,
                max_seqs=rows,
                max_seqs_in_prefill=rows,
                max_prefill_size=prefill,
                max_queued_tokens=max(rows, ENGINE_ROUNDS),
                max_stop_seqs=len(stops),
                max_stop_tokens=1 if stops else 0,
                compute_dtype=self._compute_dtype,
            )
            self._engine = InferenceEngine.from_model_with_config(model, None, config, self._axis_mapping)
            self._engine_shape = shape
        else:
            self._engine.model = model  # the weights of this evaluation; the cache and compiled loop are kept
        stop_tokens = None
        if stops:
            stop_tokens = hax.named(np.asarray([[t] for t in stops], dtype=np.int32), ("stop_seq", "position"))
        key = key if key is not None else jrandom.PRNGKey(0)
        requests = [
            Request(
                prompt_tokens=list(prompt),
                request_id=row,
                n_generations=1,
                decode_params=SeqDecodingParams(
                    max_num_tokens=jnp.asarray(limits[row], dtype=jnp.int32),
                    stop_tokens=stop_tokens,
                    temperature=jnp.asarray(temperature, dtype=jnp.float32),
                    top_p=jnp.asarray(1.0, dtype=jnp.float32),
                    key=jrandom.fold_in(key, row),
                ),
            )
            for row, prompt in enumerate(prompts)
        ]
        answers = [[int(t) for t in tokens] for tokens in self._engine.generate(requests).tokens]
        unanswered = [row for row, answer in enumerate(answers) if not answer]
        if unanswered:
            raise RuntimeError(f"Levanter's inference engine returned no token for sample prompts {unanswered}")
        return Answers(answers, [bool(a) and a[-1] in stops for a in answers])
