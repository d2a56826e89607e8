# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""What the samples at evaluations cost: the time they add per evaluation against the training between two.

    uv run python lib/levanter/bench/bench_samples.py            # tiny default and small model (~6 min on 2 cores)
    uv run python lib/levanter/bench/bench_samples.py --quick    # small model only (~2 min)

The tiny default is measured as it runs: the entrypoint trains the shipped config (300 steps, an evaluation every
100) in a subprocess, and the table takes each evaluation's decoding time from its log and the steps' durations
since the previous evaluation from its metric history. The small model (bench_simpo's ``small`` Llama, 8 pairs of
512 positions a step) times the trainer's SimPO step against the samples' default decoding (8 prompts of 170
tokens, 256 new tokens each, no stop token: the longest an evaluation can take). A benchmark: it asserts nothing.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_simpo import VOCAB, Stepper, full_length_pairs  # noqa: E402

from levanter.simpo.results.generation import AnswerGenerator  # noqa: E402
from levanter.simpo.results.samples import SamplesConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "lib/levanter/config/simpo_tiny_gpt2.yaml"
DECODED = re.compile(r"Wrote \d+ samples of step (\d+) to .* \(decoded in ([0-9.]+) s\)")


def tiny_default_section() -> None:
    print("## Tiny default (the shipped config, as it runs)\n")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            *("--data.cache_dir", f"{tmp}/cache", "--trainer.checkpointer.base_path", f"{tmp}/checkpoints"),
            *("--trainer.log_dir", f"{tmp}/logs", "--hf_save_path", f"{tmp}/hf", "--trainer.tracker", "[]"),
        ]
        command = [sys.executable, "-m", "levanter.main.train_simpo", "--config_path", str(TINY), *args]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the tiny default failed:\n{done.stderr[-3000:]}")
        decoded = {int(s): float(t) for s, t in DECODED.findall(done.stdout + done.stderr)}
        durations: dict[int, float] = {}
        for line in open(Path(tmp) / "logs" / "simpo_tiny_gpt2" / "simpo_metrics.jsonl"):
            event = json.loads(line)
            if "throughput/duration" in event["metrics"]:
                durations[event["step"]] = event["metrics"]["throughput/duration"]
    print("| evaluation at step | samples s | training s since the previous evaluation | samples / training |")
    print("|---|---|---|---|")
    previous = -1
    for step in sorted(decoded):
        training = sum(d for s, d in durations.items() if previous < s <= step)
        note = " (compiles the decoder; the training includes compiling the step)" if previous < 0 else ""
        print(f"| {step} | {decoded[step]:.2f} | {training:.1f} | {decoded[step] / training:.1%}{note} |")
        previous = step
    print()


def small_model_section(repeats: int) -> None:
    print("## Small model: 8 prompts x 256 new tokens against the SimPO step\n")
    seq_len, pairs = 512, 8
    stepper = Stepper("simpo", "small", seq_len, full_length_pairs(pairs, seq_len), pairs)
    stepper.step()  # compiles
    step_s = statistics.median(stepper.step() for _ in range(repeats))
    config = SamplesConfig()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, VOCAB.size, 170).tolist() for _ in range(config.num_prompts)]
    generate = AnswerGenerator(None, None)
    model = stepper.state.model

    def decode() -> float:
        start = time.perf_counter()
        answers = generate(model, prompts, max_new_tokens=config.max_new_tokens, stop_ids=[], vocab_size=VOCAB.size)
        assert all(len(a) == config.max_new_tokens for a in answers.tokens), [len(a) for a in answers.tokens]
        return time.perf_counter() - start

    first = decode()
    steady = statistics.median(decode() for _ in range(repeats))
    print("| params | step s | samples s (first, compiling) | samples s | / 100 steps | / 1000 steps |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {stepper.params / 1e6:.1f}M | {step_s:.3f} | {first:.2f} | {steady:.2f} "
        f"| {steady / (100 * step_s):.1%} | {steady / (1000 * step_s):.2%} |\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small model only")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = jax.local_devices()[0]
    print(f"# Samples benchmark: {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs, ", end="")
    print(f"load average {os.getloadavg()[0]:.2f}\n")
    if not args.quick:
        tiny_default_section()
    small_model_section(args.repeats)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
