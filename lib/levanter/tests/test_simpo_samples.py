# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""What the model writes at evaluations: the decoder on a tiny real GPT-2, the degeneration measures, and the
answers of the session's runs on one device and on four against transformers' greedy ``generate`` from the HF
export of the same step."""

import os
import subprocess
import sys
from pathlib import Path

import jax.random as jrandom
import numpy as np
import pytest
from simpo_hf_reference import check_against_the_export, check_against_the_exports
from simpo_tiny_run import MESHES, STEPS, tiny_config

import haliax as hax
from haliax import Axis
from levanter.layers.attention import AttentionMask
from levanter.main.train_simpo import validate_config
from levanter.models.gpt2 import Gpt2Config
from levanter.models.llama import LlamaConfig
from levanter.simpo.results.generation import AnswerGenerator, Answers, engine_serves
from levanter.simpo.results.samples import SamplePrompt, repeated_ngrams, sample_metrics

SEQ = 24
VOCAB = 50  # the tokenizer's; the model's vocabulary axis is padded past it, as partitioning pads it


@pytest.fixture(scope="module")
def tiny_model():
    config = Gpt2Config(max_seq_len=SEQ, hidden_dim=32, num_layers=1, num_heads=2, gradient_checkpointing=False)
    return config.build(Axis("vocab", 64), key=jrandom.PRNGKey(3))


def _answer(model, prompts, **kwargs) -> Answers:
    settings = dict(max_new_tokens=8, stop_ids=[], vocab_size=VOCAB) | kwargs
    return AnswerGenerator(None, None)(model, prompts, **settings)


PROMPTS = [[1, 5, 9], [2, 7, 7, 7, 3, 11, 4], [4]]


def test_each_answer_is_what_its_prompt_alone_decodes(tiny_model):
    together = _answer(tiny_model, PROMPTS)
    for prompt, answer in zip(PROMPTS, together.tokens):
        assert _answer(tiny_model, [prompt]).tokens == [answer]
    assert [len(a) for a in together.tokens] == [8, 8, 8] and together.stopped == [False] * 3
    assert all(0 <= t < VOCAB for a in together.tokens for t in a)  # never a padding entry of the vocabulary
    # greedy: each token is the argmax of the model's logits after the prompt and the answer so far
    prompt, answer = PROMPTS[1], together.tokens[1]
    ids = hax.named(np.asarray(prompt + answer, dtype=np.int32), "position")
    logits = np.asarray(tiny_model(ids, attn_mask=AttentionMask.causal()).array)  # the plain forward pass
    assert answer == np.argmax(logits[len(prompt) - 1 : -1, :VOCAB], axis=-1).tolist()


def test_a_stop_token_ends_an_answer_and_the_model_length_caps_it(tiny_model):
    free = _answer(tiny_model, PROMPTS)
    first = free.tokens[0][0]
    stopped = _answer(tiny_model, PROMPTS, stop_ids=[first])
    assert stopped.tokens[0] == [first] and stopped.stopped[0]
    for full, cut in zip(free.tokens[1:], stopped.tokens[1:]):
        # the others run to the first time they write it, which ends them too
        end = full.index(first) + 1 if first in full else len(full)
        assert cut == full[:end]
    long_prompt = list(range(1, SEQ - 2))
    capped = _answer(tiny_model, [long_prompt, [1]], max_new_tokens=8)
    assert [len(a) for a in capped.tokens] == [3, 8] and capped.stopped == [False, False]
    with pytest.raises(ValueError, match="leaves no room to answer in 24 positions"):
        _answer(tiny_model, [list(range(SEQ))])


def test_levanters_engine_answers_a_llama_greedily(tiny_model):
    config = LlamaConfig(max_seq_len=SEQ, hidden_dim=32, intermediate_dim=64, num_layers=2, num_heads=2,
                         num_kv_heads=2, gradient_checkpointing=False)  # fmt: skip
    llama = config.build(Axis("vocab", VOCAB), key=jrandom.PRNGKey(5))
    assert engine_serves(llama) and not engine_serves(tiny_model)  # GPT-2 has no paged KV cache
    generate = AnswerGenerator(None, None)
    free = generate(llama, PROMPTS, max_new_tokens=8, stop_ids=[], vocab_size=VOCAB)
    assert [len(a) for a in free.tokens] == [8, 8, 8] and free.stopped == [False] * 3
    for prompt, answer in zip(PROMPTS, free.tokens):
        # each token the argmax of the plain forward pass over the prompt and the answer so far
        ids = hax.named(np.asarray(prompt + answer, dtype=np.int32), "position")
        logits = np.asarray(llama(ids, attn_mask=AttentionMask.causal()).array)
        assert answer == np.argmax(logits[len(prompt) - 1 : -1], axis=-1).tolist()
    # a stop token ends an answer and is kept; the engine, reused with the next evaluation's weights, stops again
    stop = free.tokens[1][2]
    for _ in range(2):
        stopped = generate(llama, PROMPTS, max_new_tokens=8, stop_ids=[stop], vocab_size=VOCAB)
        assert stopped.tokens[1] == free.tokens[1][: free.tokens[1].index(stop) + 1] and stopped.stopped[1]
    capped = generate(llama, [list(range(1, SEQ - 2)), [1]], max_new_tokens=8, stop_ids=[], vocab_size=VOCAB)
    assert [len(a) for a in capped.tokens] == [3, 8]
    # prompts whose tokens together pass a sequence's capacity all get answers (the engine's default prefill
    # buffer held one sequence's worth and left the others unanswered)
    many = generate(
        llama, [list(range(i, i + 12)) for i in range(1, 6)], max_new_tokens=8, stop_ids=[], vocab_size=VOCAB
    )
    assert [len(a) for a in many.tokens] == [8] * 5


def test_the_engine_answers_on_four_device_meshes(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    script = Path(__file__).with_name("simpo_llama_answers_check.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["fsdp", "tensor_parallel"]
    assert lines[0].split(": ")[1] == lines[1].split(": ")[1]  # the same answers on both meshes


def test_sampling_follows_the_seed(tiny_model):
    def sampled(seed):
        return _answer(tiny_model, PROMPTS, temperature=1.0, key=jrandom.PRNGKey(seed)).tokens

    assert sampled(0) == sampled(0)
    assert sampled(0) != sampled(1)
    assert sampled(0) != _answer(tiny_model, PROMPTS).tokens


def test_degeneration_measures():
    assert repeated_ngrams([1, 2, 3, 4, 1, 2, 3, 4]) == (1, 5)
    assert repeated_ngrams([7] * 10) == (6, 7)
    assert repeated_ngrams([1, 2, 3]) == (0, 0)
    prompts = [SamplePrompt("c", i, [1], chosen=[5] * n, rejected=[6]) for i, n in enumerate([4, 6])]
    answers = Answers(tokens=[[9] * 10, [1, 2, 3, 4, 5]], stopped=[False, True])
    assert sample_metrics(prompts, answers) == {
        "samples/length": 7.5,
        "samples/length_over_chosen": 1.5,
        "samples/stopped": 0.5,
        "samples/repetition": 6 / 9,
    }


def test_bad_sample_settings_are_named(tmp_path, repo_cwd):
    for setting, value, message in [
        ("num_prompts", "0", "samples.num_prompts, samples.max_new_tokens and samples.every must be at least 1"),
        ("temperature", "-1", "samples.temperature must be a finite number >= 0, got -1.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate_config(tiny_config(tmp_path, f"--samples.{setting}", value))


def test_one_device_samples_equal_transformers_generate_from_the_export(single_device_runs):
    tmp = single_device_runs.tmp
    last = STEPS - 1
    records = check_against_the_export(tmp / "logs" / "reference", tmp / "hf" / "reference" / f"step-{last}", last)
    # the run also sampled the starting model (run_initial_eval) and its evaluation at step 3
    assert [s for s, m in sorted(single_device_runs.reference.items()) if "samples/length" in m] == [0, 3, 7]
    assert single_device_runs.reference[STEPS - 1]["samples/length"] == np.mean([r["answer_tokens"] for r in records])


def test_each_meshs_samples_equal_transformers_generate_from_its_export(mesh_runs):
    tmp, _ = mesh_runs
    check_against_the_exports([(tmp / "logs" / m, tmp / "hf" / m / f"step-{STEPS - 1}", STEPS - 1) for m in MESHES])
