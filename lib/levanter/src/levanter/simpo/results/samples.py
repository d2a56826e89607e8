# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""What the model writes: at evaluations, its answers to the first held-out pairs' prompts, and how they degenerate.

SimPO at a learning rate a little too high can keep its held-out loss and accuracy while its answers grow without
bound, repeat themselves or never close the turn. Each sampling evaluation writes its answers beside the chosen and
rejected ones to ``<run dir>/samples/step-N.jsonl`` (and to wandb as a table) and logs four numbers:
``samples/length`` (mean answer tokens, the stop token included, as |y| counts EOS), ``samples/length_over_chosen``
(that over the mean chosen length of the same pairs), ``samples/stopped`` (the fraction ended by a stop token
before the cap) and ``samples/repetition`` (the fraction of the answers' 4-grams that already occurred earlier in
the same answer).
"""

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.random as jrandom
import numpy as np

import levanter.tracker
from levanter.data.simpo.cache import PAIR_FIELDS
from levanter.data.simpo.splits import HeldOutPairs
from levanter.models.lm_model import LmHeadModel
from levanter.simpo.results.generation import AnswerGenerator, Answers
from levanter.tokenizers import MarinTokenizer
from levanter.tracker import CompositeTracker

logger = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
REPEATED_NGRAM = 4


@dataclasses.dataclass(frozen=True)
class SamplesConfig:
    enabled: bool = True
    num_prompts: int = 8
    """Answer the prompts of the first this-many held-out pairs (in cache order, components by name)."""
    max_new_tokens: int = 256
    """Cap on an answer's tokens; the model's max_seq_len caps prompt and answer together."""
    every: int = 1
    """Sample at every this-many evaluations, the first included (step 0 with run_initial_eval)."""
    temperature: float = 0.0
    """0 decodes greedily; above 0 samples, with ``seed`` and the step."""
    seed: int = 0

    def validate(self) -> None:
        if self.num_prompts < 1 or self.max_new_tokens < 1 or self.every < 1:
            raise ValueError(
                "samples.num_prompts, samples.max_new_tokens and samples.every must be at least 1, got "
                f"{self.num_prompts}, {self.max_new_tokens}, {self.every}"
            )
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"samples.temperature must be a finite number >= 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class SamplePrompt:
    """A held-out pair as the samples show it: the rendered prompt (up to the assistant's turn) and both answers,
    as the cache holds their tokens (the trained ones for the answers)."""

    component: str
    row: int
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def held_out_prompts(held_out: Mapping[str, HeldOutPairs], count: int) -> list[SamplePrompt]:
    """The first ``count`` held-out pairs, components in name order."""
    prompts: list[SamplePrompt] = []
    for name in sorted(held_out):
        rows = held_out[name].rows[: count - len(prompts)]
        if len(rows) == 0:
            continue
        fields = held_out[name].pairs.pair_fields_view().get_batch_sync([int(r) for r in rows])
        for row, pair in zip(rows, fields):
            chosen_ids, chosen_mask, rejected_ids, rejected_mask = (np.asarray(pair[field]) for field in PAIR_FIELDS)
            start = int(np.argmax(chosen_mask != 0))  # the completion's first token: the cache keeps trained pairs
            prompts.append(
                SamplePrompt(
                    component=name,
                    row=int(row),
                    prompt=chosen_ids[:start].tolist(),
                    chosen=chosen_ids[chosen_mask != 0].tolist(),
                    rejected=rejected_ids[rejected_mask != 0].tolist(),
                )
            )
        if len(prompts) == count:
            break
    return prompts


def repeated_ngrams(tokens: Sequence[int], n: int = REPEATED_NGRAM) -> tuple[int, int]:
    """(n-grams that already occurred earlier in ``tokens``, n-grams in all)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def sample_metrics(prompts: Sequence[SamplePrompt], answers: Answers) -> dict[str, float]:
    """The four ``samples/`` numbers of one evaluation (the module's docstring defines them)."""
    lengths = np.asarray([len(a) for a in answers.tokens], dtype=np.float64)
    chosen = np.asarray([len(p.chosen) for p in prompts], dtype=np.float64)
    repeated, grams = np.sum([repeated_ngrams(a) for a in answers.tokens], axis=0)
    return {
        "samples/length": float(lengths.mean()),
        "samples/length_over_chosen": float(lengths.mean() / chosen.mean()),
        "samples/stopped": float(np.mean(answers.stopped)),
        "samples/repetition": float(repeated / grams) if grams else 0.0,
    }


def sample_records(
    step: int, prompts: Sequence[SamplePrompt], answers: Answers, tokenizer: MarinTokenizer
) -> list[dict[str, Any]]:
    def text(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    return [
        {
            "step": step,
            "component": p.component,
            "row": p.row,
            # the prompt as the model saw it, the chat template's special tokens included
            "prompt": tokenizer.decode(p.prompt, skip_special_tokens=False),
            "answer": text(answer),
            "chosen": text(p.chosen),
            "rejected": text(p.rejected),
            "answer_tokens": len(answer),
            "chosen_tokens": len(p.chosen),
            "stopped": stopped,
            "prompt_ids": p.prompt,
            "answer_ids": answer,
        }
        for p, answer, stopped in zip(prompts, answers.tokens, answers.stopped)
    ]


def samples_path(run_dir: Path, step: int) -> Path:
    return run_dir / SAMPLES_DIR / f"step-{step}.jsonl"


def write_samples(run_dir: Path, step: int, records: Sequence[Mapping[str, Any]]) -> Path:
    """Writes one evaluation's samples whole: a reader of a running run never sees half a file."""
    path = samples_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".jsonl.partial")
    with open(partial, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, path)
    return path


def _log_table(step: int, records: Sequence[Mapping[str, Any]]) -> None:
    """The samples as a table, for the wandb trackers among the run's (the others take scalars only)."""
    from levanter.tracker.wandb import WandbTracker  # imports wandb: only when samples are logged

    tracker = levanter.tracker.current_tracker()
    trackers = tracker.loggers if isinstance(tracker, CompositeTracker) else [tracker]
    wandb_trackers = [t for t in trackers if isinstance(t, WandbTracker)]
    if not wandb_trackers:
        return
    import wandb

    columns = ["step", "prompt", "answer", "chosen", "rejected", "answer_tokens", "stopped"]
    table = wandb.Table(columns=list[str | int](columns), data=[[r[c] for c in columns] for r in records])
    for t in wandb_trackers:
        t.log({"samples/answers": table}, step=step)


class HeldOutSamples:
    """Answers the sample prompts with the model of an evaluation; process 0 writes them."""

    def __init__(
        self,
        config: SamplesConfig,
        prompts: Sequence[SamplePrompt],
        generator: AnswerGenerator,
        tokenizer: MarinTokenizer,
        stop_ids: Sequence[int],
        run_dir: Path,
    ):
        self.config, self.prompts, self._generate = config, list(prompts), generator
        self._tokenizer, self._stop_ids, self._run_dir = tokenizer, list(stop_ids), run_dir
        self.latest: list[dict[str, Any]] = []
        self.seconds = 0.0
        """How long the latest evaluation's answers took (the first one includes compiling the decoder)."""

    def __call__(self, model: LmHeadModel, step: int) -> dict[str, float]:
        started = time.perf_counter()
        key = jrandom.fold_in(jrandom.PRNGKey(self.config.seed), step)
        answers = self._generate(
            model,
            [p.prompt for p in self.prompts],
            max_new_tokens=self.config.max_new_tokens,
            stop_ids=self._stop_ids,
            vocab_size=len(self._tokenizer),
            temperature=self.config.temperature,
            key=key,
        )
        records = sample_records(step, self.prompts, answers, self._tokenizer)
        self.seconds = time.perf_counter() - started
        if jax.process_index() == 0:
            path = write_samples(self._run_dir, step, records)
            logger.info(f"Wrote {len(records)} samples of step {step} to {path} (decoded in {self.seconds:.2f} s)")
            _log_table(step, records)
        self.latest = records
        return sample_metrics(self.prompts, answers)


def describe(record: Mapping[str, Any], width: int = 300) -> str:
    """A sample as a few lines of text for the log and the samples command."""

    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 3] + "..."

    end = "stopped" if record["stopped"] else "no stop token"
    where = f"step {record['step']}, {record['component']} row {record['row']}"
    return (
        f"[{where}, {record['answer_tokens']} tokens, {end}]\n"
        f"  prompt:   {cut(record['prompt'])}\n"
        f"  answer:   {cut(record['answer'])}\n"
        f"  chosen:   {cut(record['chosen'])}\n"
        f"  rejected: {cut(record['rejected'])}"
    )


def sampled_steps(run_dir: Path) -> list[int]:
    """The steps whose samples ``run_dir`` holds, in order."""
    steps = []
    for path in (run_dir / SAMPLES_DIR).glob("step-*.jsonl"):
        number = path.name[len("step-") : -len(".jsonl")]
        if number.isdigit():
            steps.append(int(number))
    return sorted(steps)


def read_samples(run_dir: Path, step: int | None = None) -> tuple[int, list[dict[str, Any]]]:
    """The samples of ``step`` (the newest when None) of the run in ``run_dir``."""
    steps = sampled_steps(run_dir)
    if not steps:
        raise FileNotFoundError(
            f"{run_dir / SAMPLES_DIR} holds no samples; a run's directory is <trainer.log_dir>/<run id>, and a run "
            "writes samples at its evaluations (samples.enabled)"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{run_dir} has no samples of step {step}; it has steps {steps}")
    with open(samples_path(run_dir, step), encoding="utf-8") as f:
        return step, [json.loads(line) for line in f if line.strip()]
