# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""SimPO step cost against Levanter's LM step and its DPO step, and padding on UltraFeedback-like lengths.

    uv run python lib/levanter/bench/bench_simpo.py            # full table (CPU: ~40 min on a busy 2-core box)
    uv run python lib/levanter/bench/bench_simpo.py --quick    # tiny model, short rows (~7 min)
    uv run python lib/levanter/bench/bench_simpo.py --quick --data-only  # data sections only (~6 min, 1 GB disk)
    uv run python lib/levanter/bench/bench_simpo.py --quick --skip-data  # all but the data sections
    uv run python lib/levanter/bench/bench_simpo.py --microbatches --first-step-only --trl-python PYTHON
        # time to the first step by phase, ours beside TRL's SimPO (PYTHON: an interpreter with torch and trl)

Every step goes through ``Trainer.train_step`` with the real loss functions: ``train_simpo.simpo_loss``, the
``compute_next_token_loss`` that ``train_lm`` trains with, and ``levanter.dpo.dpo_loss`` on a ``DpoModel`` with a
frozen reference (as ``train_dpo`` builds it). Variants are timed interleaved, in rotating order, and the table
reports medians, so a shared machine's load hits them alike. The default-path section times the layout
``pair_layout: auto`` resolves to against Levanter's DPO and LM steps on the same positions per step. Peak
memory is the peak RSS (CPU) or peak device memory (GPU) of a fresh subprocess per variant. This is a benchmark:
it asserts nothing about speed.
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

_PROCESS_START = time.perf_counter()  # the first-step breakdown counts the imports from here

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_data  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jrandom  # noqa: E402
import jmp  # noqa: E402
import numpy as np  # noqa: E402

import haliax as hax  # noqa: E402
from haliax import Axis  # noqa: E402
from levanter.callbacks.watch import WatchConfig  # noqa: E402
from levanter.checkpoint import CheckpointerConfig  # noqa: E402
from levanter.data.packing import pack_documents  # noqa: E402
from levanter.data.simpo.cache import CachedPairs  # noqa: E402
from levanter.data.simpo.pair_build import PAIR_INFO, cache_exemplar  # noqa: E402
from levanter.data.text.preference import DpoExample  # noqa: E402
from levanter.dpo import DpoModel, dpo_loss  # noqa: E402
from levanter.main.train_simpo import simpo_loss  # noqa: E402
from levanter.models.llama import LlamaConfig  # noqa: E402
from levanter.models.lm_model import LmExample  # noqa: E402
from levanter.optim.config import AdamConfig  # noqa: E402
from levanter.simpo.objective.accumulation import SimpoTrainer  # noqa: E402
from levanter.simpo.objective.layouts import PairLayout, PairLengths, pair_layout, resolve_pair_layout  # noqa: E402
from levanter.simpo.run.initial_state import initial_state  # noqa: E402
from levanter.store.cache import SerialCacheWriter  # noqa: E402
from levanter.tracker import NoopConfig  # noqa: E402
from levanter.trainer import Trainer, TrainerConfig  # noqa: E402
from levanter.utils.jax_utils import parameter_count  # noqa: E402
from levanter.utils.tree_utils import inference_mode  # noqa: E402

VOCAB = Axis("vocab", 8192)
SIZES = {
    "tiny": dict(hidden_dim=64, intermediate_dim=256, num_layers=2, num_heads=4, num_kv_heads=4),
    "small": dict(hidden_dim=256, intermediate_dim=1024, num_layers=4, num_heads=4, num_kv_heads=4),
    "medium": dict(hidden_dim=512, intermediate_dim=2048, num_layers=8, num_heads=8, num_kv_heads=8),
}
VARIANTS = ("lm", "simpo", "dpo")
# UltraFeedback (binarized) token lengths under a Llama tokenizer, approximately: prompts mean ~170 tokens with a
# long tail (median ~110), chosen completions mean ~330, rejected ~280 (the SimPO paper's length-bias point is
# that chosen runs longer). Log-normal with these means; the table prints the sampled means.
UF_MEANS = {"prompt": 170, "chosen": 330, "rejected": 280}
UF_SIGMA = {"prompt": 0.9, "chosen": 0.7, "rejected": 0.75}


def model_config(size: str, seq_len: int) -> LlamaConfig:
    return LlamaConfig(max_seq_len=seq_len, gradient_checkpointing=False, **SIZES[size])


def trainer_config(batch: int, per_device: int = -1) -> TrainerConfig:
    return TrainerConfig(
        id="bench-simpo",
        num_train_steps=10_000,
        train_batch_size=batch,
        per_device_parallelism=per_device,
        mp=jmp.get_policy("p=f32,c=f32"),
        tracker=NoopConfig(),
        watch=WatchConfig(watch_targets=[]),
        require_accelerator=False,
        load_checkpoint=False,
        checkpointer=CheckpointerConfig(base_path=tempfile.mkdtemp(prefix="bench_simpo_ckpt")),
    )


def full_length_pairs(pairs: int, seq_len: int, seed: int = 0) -> DpoExample:
    """Pairs whose both sides fill the sequence (a quarter prompt), so every variant sees only real tokens."""
    rng = np.random.default_rng(seed)
    Pos = Axis("position", seq_len)
    prompt = seq_len // 4

    def side():
        tokens = rng.integers(3, VOCAB.size, (pairs, seq_len)).astype(np.int32)
        tokens[:, prompt // 2 : prompt] = tokens[0, prompt // 2 : prompt]  # shared with the other side below
        trained = np.zeros((pairs, seq_len), np.float32)
        trained[:, prompt:] = 1
        return tokens, trained

    (ct, cm), (rt, rm) = side(), side()
    rt[:, :prompt] = ct[:, :prompt]

    def example(tokens, trained):
        rows = []
        for t, m in zip(tokens, trained):
            t, m = hax.named(t, Pos), hax.named(m, Pos)
            seg = hax.zeros(Pos, dtype=np.int32)
            rows.append(LmExample.causal(t, loss_weight=hax.roll(m, -1, Pos), segment_ids=seg))
        return stacked(rows)

    return DpoExample(chosen=example(ct, cm), rejected=example(rt, rm))


def as_lm_batch(pairs: DpoExample) -> LmExample:
    """The same sequences as one LM batch of twice the rows (chosen rows, then rejected rows)."""
    n = pairs.chosen.tokens.axes[0].size
    Batch = Axis("batch", 2 * n)
    return jax.tree.map(
        lambda c, r: hax.named(np.concatenate([c.array, r.array]), (Batch, *c.axes[1:])),
        pairs.chosen,
        pairs.rejected,
        is_leaf=lambda x: isinstance(x, hax.NamedArray),
    )


def simpo_fn(layout: PairLayout | None = None):
    layout = layout if layout is not None else pair_layout("padded", 1)

    def loss(model, example, *, key=None, step=None):
        return simpo_loss(model, example, layout=layout, beta=2.0, gamma_beta_ratio=0.5, key=key, step=step)

    return loss


def lm_loss(model, example, *, key=None):
    return model.compute_next_token_loss(example, key=key)


def dpo_step_loss(model: DpoModel, example, *, key=None):
    return dpo_loss(model.policy, inference_mode(model.reference, True), example, beta=0.1)


class Stepper:
    """A Trainer, its state and one batch: ``step()`` runs and waits for one optimizer step."""

    def __init__(
        self,
        variant: str,
        size: str,
        seq_len: int,
        pairs: DpoExample | object,
        rows: int,
        *,
        layout: PairLayout | None = None,
        per_device: int = -1,
        model: object | None = None,
        model_init: bool = False,
    ):
        config = model_config(size, seq_len)
        optimizer = AdamConfig(learning_rate=1e-4, warmup=0.0).build(10_000)
        key_p, key_r = jrandom.split(jrandom.PRNGKey(0))
        if variant == "dpo":
            self.trainer = Trainer(trainer_config(rows), optimizer, dpo_step_loss)
            model = DpoModel(policy=config.build(VOCAB, key=key_p), reference=config.build(VOCAB, key=key_r))
            trainable = DpoModel(policy=True, reference=False)  # type: ignore[arg-type]
            self.batch = pairs
        elif variant == "lm":
            self.trainer = Trainer(trainer_config(2 * rows), optimizer, lm_loss)
            model, trainable, self.batch = config.build(VOCAB, key=key_p), True, as_lm_batch(pairs)
        else:
            # SimPO's trainer: microbatches (per_device rows a device at once) give the unsplit step's loss
            layout = layout if layout is not None else pair_layout("padded", 1)
            self.trainer = SimpoTrainer(trainer_config(rows, per_device), optimizer, simpo_fn(layout), layout=layout)
            if model is None and not model_init:
                model = config.build(VOCAB, key=key_p)
            trainable, self.batch = True, pairs
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(self.trainer)
        if model_init:
            # train_simpo's path for a fresh start: model and optimizer state built by one compiled, sharded program
            # (levanter.simpo.run.initial_state), where building the model eagerly dispatches every initialiser alone
            self.state = initial_state(self.trainer, jrandom.PRNGKey(1), lambda: config.build(VOCAB, key=key_p))
        else:
            self.state = self.trainer.initial_state(jrandom.PRNGKey(1), model=model, is_trainable=trainable)
        self.params = parameter_count(self.state.trainable_model)

    def xla_memory_mb(self) -> float:
        """Bytes XLA plans for the compiled train step: state and batch in, temporaries (activations, gradients),
        outputs not aliased onto donated inputs. Deterministic, and the device memory on an accelerator."""
        lowered = self.trainer._jit_train_step_fn_no_hook.lower(self.state, (self.batch,), {})
        m = lowered.compile().memory_analysis()
        total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        return total / 2**20

    def step(self) -> float:
        start = time.perf_counter()
        info = self.trainer.train_step(self.state, self.batch)
        jax.block_until_ready(info.state.model)
        self.state = info.state
        return time.perf_counter() - start


def loss_grad_flops(model, fn, batch) -> float:
    """FLOPs XLA's cost model assigns to ``fn``'s value and gradient with respect to ``model``."""
    params, static = eqx.partition(model, eqx.is_array)

    def loss(p, b):
        return fn(eqx.combine(p, static), b)

    analysis = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def xla_flops(size: str, seq_len: int, data: DpoExample) -> dict[str, float]:
    """Loss-and-gradient FLOPs per variant: a load-independent check of the timed ratios."""
    config = model_config(size, seq_len)
    key_p, key_r = jrandom.split(jrandom.PRNGKey(0))
    policy, reference = config.build(VOCAB, key=key_p), config.build(VOCAB, key=key_r)
    return {
        "lm": loss_grad_flops(policy, lambda m, b: lm_loss(m, b).scalar(), as_lm_batch(data)),
        "simpo": loss_grad_flops(policy, lambda m, b: simpo_fn()(m, b)[0], data),
        "dpo": loss_grad_flops(
            policy, lambda m, b: dpo_loss(m, inference_mode(reference, True), b, beta=0.1)[0], data
        ),
    }


def peak_memory_mb() -> float:
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def live_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def worker(variant: str, size: str, seq_len: int, pairs: int) -> None:
    """One variant in a fresh process: peak memory (on CPU dominated by XLA compiling the step) and the resident
    memory after two steps, when parameters, optimizer state and any reference model are live."""
    stepper = Stepper(variant, size, seq_len, full_length_pairs(pairs, seq_len), pairs)
    for _ in range(2):
        stepper.step()
    live = live_rss_mb() if jax.local_devices()[0].platform == "cpu" else math.nan
    print(json.dumps({"peak_mb": peak_memory_mb(), "live_mb": live, "xla_mb": stepper.xla_memory_mb()}))


def first_step_worker(size: str, seq_len: int, pairs: int, cache_dir: str) -> None:
    """A fresh process's time from building the trainer to its first finished step, with the persistent
    compilation cache the SimPO entry point turns on by default (here at ``cache_dir``)."""
    import levanter

    start = time.perf_counter()
    levanter.trainer.initialize(dataclasses.replace(trainer_config(pairs), jax_compilation_cache_dir=cache_dir))
    stepper = Stepper("simpo", size, seq_len, full_length_pairs(pairs, seq_len), pairs)
    stepper.step()
    print(json.dumps({"first_step_s": time.perf_counter() - start}))


def first_step_starts(size: str, seq_len: int, pairs: int) -> list[float]:
    """Time to first step of two starts in a row sharing a fresh compilation cache: compiling, then loading."""
    cache_dir = tempfile.mkdtemp(prefix="bench_simpo_jax_cache")
    cmd = [sys.executable, __file__, "--first-step", cache_dir, "--size", size, "--seq-len", str(seq_len)]
    out = []
    for _ in range(2):
        run = subprocess.run(cmd + ["--pairs", str(pairs)], capture_output=True, text=True, check=True)
        out.append(json.loads(run.stdout.strip().splitlines()[-1])["first_step_s"])
    return out


def measure_memory(variant: str, size: str, seq_len: int, pairs: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--size", size, "--seq-len", str(seq_len)]
    out = subprocess.run(cmd + ["--pairs", str(pairs)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved_medians(steppers: dict[str, Stepper], repeats: int) -> dict[str, float]:
    for s in steppers.values():  # compile, then one warm step
        s.step()
        s.step()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(steppers[name].step())
    return {name: statistics.median(t) for name, t in times.items()}


def ultrafeedback_like(n: int, seq_len: int, scale: float, seed: int = 0) -> list[dict]:
    """Pairs with UltraFeedback-like prompt/completion lengths (times ``scale``) that fit ``seq_len``."""
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    while len(rows) < n:
        lengths = {}
        for part, mean in UF_MEANS.items():
            sigma = UF_SIGMA[part]
            mu = np.log(mean * scale) - sigma**2 / 2  # log-normal with this mean
            lengths[part] = max(1, int(rng.lognormal(mu, sigma)))
        if 1 + lengths["prompt"] + lengths["chosen"] + lengths["rejected"] + 2 > seq_len:
            # the reference trainer truncates; dropping keeps every kept pair exact, and keeping only pairs whose
            # shared-prompt row fits gives every layout the same pairs
            continue
        prompt = [1, *rng.integers(3, VOCAB.size, lengths["prompt"])]
        row = {}
        for side in ("chosen", "rejected"):
            completion = [*rng.integers(3, VOCAB.size, lengths[side]), 2]
            row[f"{side}_input_ids"] = np.array(prompt + completion, np.int32)
            row[f"{side}_assistant_masks"] = np.array([0] * len(prompt) + [1] * len(completion), np.int32)
        rows.append(row)
    return rows


def write_cache(rows: list[dict]) -> CachedPairs:
    """The rows as a SimPO pair cache (what the cache builder writes for pairs that need no cut)."""

    def info(row: dict) -> np.ndarray:
        prompt = int(np.argmax(row["chosen_assistant_masks"]))
        values = {
            "prompt_length": prompt,
            "chosen_length": len(row["chosen_input_ids"]),
            "rejected_length": len(row["rejected_input_ids"]),
            "chosen_trained": int(row["chosen_assistant_masks"].sum()),
            "rejected_trained": int(row["rejected_assistant_masks"].sum()),
        }
        return np.array([values.get(k, 0) for k in PAIR_INFO], np.int32)

    records = [{**row, "pair_info": info(row), "error": np.zeros((0,), np.uint8)} for row in rows]
    path = tempfile.mkdtemp(prefix="bench_simpo_pairs")
    with SerialCacheWriter(path, cache_exemplar()) as writer:
        writer.write_batch(records)
    return CachedPairs(writer.result(), np.stack([r["pair_info"] for r in records]), "bench")


def stacked(items: list) -> object:
    """Rows stacked on a batch axis on the host, as Levanter's data loader stacks them (no compiled stack)."""
    Batch = Axis("batch", len(items))

    def stack(*xs):
        return hax.named(jnp.asarray(np.stack([np.asarray(x.array) for x in xs])), (Batch, *xs[0].axes))

    return jax.tree.map(stack, *items, is_leaf=lambda x: isinstance(x, hax.NamedArray))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, short sequences, few repeats")
    parser.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES))
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=None, help="pairs per step")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--first-step", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--first-step-breakdown", metavar="PAIRS_JSONL", help=argparse.SUPPRESS)
    parser.add_argument(
        "--microbatches",
        action="store_true",
        help="only memory and step time against microbatch size per layout, "
        "and the time to the first step by phase",
    )
    parser.add_argument(
        "--first-step-only", action="store_true", help="only the time to the first step by phase (with --microbatches)"
    )
    parser.add_argument("--first-step-repeats", type=int, default=1, help="fresh starts a side, medians reported")
    parser.add_argument(
        "--trl-python",
        metavar="PYTHON",
        help="an interpreter with torch, transformers and trl: adds TRL's SimPO to the first-step table",
    )
    parser.add_argument("--data-only", action="store_true", help="only the data sections: tokenization and start-up")
    parser.add_argument("--skip-data", action="store_true", help="skip the data sections (bench_data.py)")
    parser.add_argument("--startup-pairs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--token-rows", type=int, default=1024, help="rows per tokenization measurement")
    args = parser.parse_args()

    seq_len = args.seq_len or (128 if args.quick else 256)
    pairs = args.pairs or 4
    if args.worker:
        worker(args.worker, args.size, seq_len, pairs)
        return
    if args.first_step:
        first_step_worker(args.size, seq_len, pairs, args.first_step)
        return
    if args.first_step_breakdown:
        first_step_breakdown_worker(args.size, seq_len, pairs, args.first_step_breakdown)
        return
    # "medium" (--sizes medium) takes tens of minutes per row on a shared 2-core CPU
    sizes = args.sizes or (["tiny"] if args.quick else ["tiny", "small"])
    repeats = args.repeats or (3 if args.quick else 5)

    device = jax.local_devices()[0]
    print(f"# SimPO benchmark  {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(
        f"device: {device.platform} ({device.device_kind}), {jax.local_device_count()} device(s), "
        f"{os.cpu_count()} CPUs"
    )
    print(f"jax {jax.__version__}, load average at start {os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f}")
    if args.microbatches:
        size = sizes[-1] if args.quick else "small"
        if not args.first_step_only:
            microbatch_section(size, args.quick, repeats)
        first_step_breakdown(size, seq_len if args.quick else 512, 8, args.trl_python, args.first_step_repeats)
        return
    if not args.skip_data:
        data_sections(args, seq_len, pairs)
    if args.data_only:
        return
    print(
        f"seq_len {seq_len}, {pairs} pairs = {2 * pairs} sequences per step, fp32, vocab {VOCAB.size}, "
        f"median of {repeats} interleaved steps\n"
    )

    print("## Step time: SimPO vs Levanter LM step (same sequences) vs Levanter DPO step (reference model)\n")
    print(
        "| model | params | LM step s | SimPO step s | DPO step s | LM tok/s | SimPO tok/s | SimPO/LM tok/s "
        "| DPO/SimPO time | SimPO / DPO peak MB | SimPO / DPO live MB | SimPO / DPO XLA step MB | ref weights MB "
        "| load |"
    )
    print("|" + "---|" * 14)
    data = full_length_pairs(pairs, seq_len)
    tokens = 2 * pairs * seq_len
    for size in sizes:
        steppers = {v: Stepper(v, size, seq_len, data, pairs) for v in VARIANTS}
        t = interleaved_medians(steppers, repeats)
        params = steppers["simpo"].params
        del steppers
        mem = {v: measure_memory(v, size, seq_len, pairs) for v in ("simpo", "dpo")}
        ref_mb = params * 4 / 2**20
        print(
            f"| {size} | {params / 1e6:.1f}M | {t['lm']:.3f} | {t['simpo']:.3f} | {t['dpo']:.3f} "
            f"| {tokens / t['lm']:.0f} | {tokens / t['simpo']:.0f} | {t['lm'] / t['simpo']:.3f} "
            f"| {t['dpo'] / t['simpo']:.2f} | {mem['simpo']['peak_mb']:.0f} / {mem['dpo']['peak_mb']:.0f} "
            f"| {mem['simpo']['live_mb']:.0f} / {mem['dpo']['live_mb']:.0f} "
            f"| {mem['simpo']['xla_mb']:.1f} / {mem['dpo']['xla_mb']:.1f} | {ref_mb:.1f} | {os.getloadavg()[0]:.1f} |",
            flush=True,
        )

    print("\n## XLA cost model: FLOPs of loss + gradient (no timing noise)\n")
    print("| model | LM GFLOP | SimPO GFLOP | DPO GFLOP | SimPO/LM | DPO/SimPO |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        f = xla_flops(size, seq_len, data)
        print(
            f"| {size} | {f['lm'] / 1e9:.2f} | {f['simpo'] / 1e9:.2f} | {f['dpo'] / 1e9:.2f} "
            f"| {f['simpo'] / f['lm']:.3f} | {f['dpo'] / f['simpo']:.3f} |",
            flush=True,
        )

    padding_section()
    default_path_section(sizes[-1] if args.quick else "small", args.quick, repeats)
    microbatch_section(sizes[-1] if args.quick else "small", args.quick, repeats)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


def microbatch_section(size: str, quick: bool, repeats: int) -> None:
    """Per layout, the same step of rows split into microbatches of fewer rows: XLA's planned memory for the
    compiled step (arguments, temporaries, outputs: the device memory on an accelerator) and the median step time."""
    lay_len, rows_a_step = (128, 8) if quick else (512, 8)
    scale = lay_len / 2048  # UltraFeedback lengths scaled to the row, as in the default-path section
    cache = write_cache(ultrafeedback_like(2048, lay_len, scale=scale, seed=1))
    Pos = Axis("position", lay_len)
    print(
        f"\n## Microbatches: memory and step time ({size} model, {rows_a_step} rows of {lay_len} a step, "
        f"median of {repeats} interleaved steps)\n"
    )
    print("| layout | rows a microbatch | microbatches | pairs a step | XLA step MB | step s | pairs/s |")
    print("|---|---|---|---|---|---|---|")
    for name in ("padded", "packed", "shared_prompt"):
        layout = pair_layout(name, 8)
        rows = layout.rows(cache, cache.kept, Pos)
        picked = np.linspace(0, len(rows.pairs_per_row) - 1, rows_a_step).round().astype(int).tolist()
        batch = stacked(rows.dataset.as_sync_dataset().get_batch(picked))
        pairs = int(rows.pairs_per_row[picked].sum())
        steppers = {
            per: Stepper("simpo", size, lay_len, batch, rows_a_step, layout=layout, per_device=per)
            for per in (rows_a_step, rows_a_step // 2, rows_a_step // 4, 1)
        }
        memory = {per: s.xla_memory_mb() for per, s in steppers.items()}
        times = interleaved_medians(steppers, repeats)
        for per, t in times.items():
            print(
                f"| {name} | {per} | {rows_a_step // per} | {pairs} | {memory[per]:.1f} | {t:.3f} | {pairs / t:.1f} |",
                flush=True,
            )
        del steppers


def first_step_breakdown_worker(size: str, seq_len: int, rows: int, pairs_path: str) -> None:
    """A fresh process's time to its first step, by phase, with no persistent compilation cache: the imports (from
    this module's start), the data (the pairs read from ``pairs_path``, written to a pair cache, laid out by
    ``auto``'s choice), the trainer and its state (model and optimizer state from one compiled program, as
    ``train_simpo`` starts a fresh run), the compile (the first step's time less a steady step's) and the step
    itself (the fastest of four steady steps)."""
    phases = {"imports": time.perf_counter() - _PROCESS_START}
    start = time.perf_counter()
    cache = write_cache(read_pairs(pairs_path))
    Pos = Axis("position", seq_len)
    name, _ = resolve_pair_layout("auto", seq_len, PairLengths.of([cache]), jax.default_backend(), 8)
    layout = pair_layout(name, 8)
    laid_out = layout.rows(cache, cache.kept, Pos)
    batch = stacked(laid_out.dataset.as_sync_dataset().get_batch(list(range(rows))))
    phases["data"] = time.perf_counter() - start
    start = time.perf_counter()
    stepper = Stepper("simpo", size, seq_len, batch, rows, layout=layout, model_init=True)
    jax.block_until_ready(stepper.state.model)
    phases["trainer setup"] = time.perf_counter() - start
    first = stepper.step()
    first_done = time.time()
    # the fastest of the next steps: Levanter compiles its step without jit hooks on the next one
    steady = min(stepper.step() for _ in range(4))
    phases["compile"] = first - steady
    phases["step"] = steady
    pairs = int(laid_out.pairs_per_row[:rows].sum())
    positions = rows * layout.sequences_per_row * seq_len
    print(
        json.dumps(
            {"layout": name, "pairs": pairs, "positions": positions, "first_step_done_wall": first_done, **phases}
        )
    )


def write_pairs(seq_len: int) -> str:
    """The pairs both sides of the first-step table read, as token ids: UltraFeedback-like lengths scaled to the
    row, one JSON line of prompt, chosen and rejected completion each."""
    path = os.path.join(tempfile.mkdtemp(prefix="bench_simpo_first_step"), "pairs.jsonl")
    with open(path, "w") as f:
        for row in ultrafeedback_like(2048, seq_len, scale=seq_len / 2048, seed=1):
            prompt = int(np.argmax(row["chosen_assistant_masks"]))
            ids = {side: row[f"{side}_input_ids"].tolist() for side in ("chosen", "rejected")}
            f.write(json.dumps({"prompt": ids["chosen"][:prompt], **{k: v[prompt:] for k, v in ids.items()}}) + "\n")
    return path


def read_pairs(path: str) -> list[dict]:
    """``write_pairs``' file as ``ultrafeedback_like`` rows."""
    rows = []
    with open(path) as f:
        for line in f:
            pair = json.loads(line)
            row = {}
            for side in ("chosen", "rejected"):
                row[f"{side}_input_ids"] = np.array(pair["prompt"] + pair[side], np.int32)
                row[f"{side}_assistant_masks"] = np.array([0] * len(pair["prompt"]) + [1] * len(pair[side]), np.int32)
            rows.append(row)
    return rows


def timed_run(cmd: list[str], env: dict) -> tuple[dict, float]:
    """A fresh process's last JSON line, and the seconds from its spawn to the end of its first step."""
    spawned = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{cmd[:2]} failed ({run.returncode}):\n{run.stderr[-4000:]}")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    return out, out.pop("first_step_done_wall") - spawned


def trl_first_step(trl_python: str, size: str, seq_len: int, pairs: int, pairs_path: str) -> tuple[dict, float]:
    """TRL's SimPO (``bench_trl_first_step.py`` under ``trl_python``) on the same model, pairs a step, sequence
    length and pairs as the Levanter side."""
    work = tempfile.mkdtemp(prefix="bench_simpo_trl")
    spec = {
        "hf_config": model_config(size, seq_len).to_hf_config(VOCAB.size).to_dict(),
        "pairs": pairs_path,
        "pairs_per_step": pairs,
        "seq_len": seq_len,
        "beta": 2.0,  # simpo_fn's beta; TRL's simpo_gamma is the margin itself: beta * gamma_beta_ratio
        "simpo_gamma": 2.0 * 0.5,
        "steps": 5,
        "output_dir": os.path.join(work, "out"),
    }
    with open(os.path.join(work, "spec.json"), "w") as f:
        json.dump(spec, f)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_trl_first_step.py")
    return timed_run([trl_python, script, os.path.join(work, "spec.json")], {**os.environ, "HF_HUB_OFFLINE": "1"})


def first_step_breakdown(size: str, seq_len: int, rows: int, trl_python: str | None = None, repeats: int = 1) -> None:
    """Both sides' first-step phases, medians over ``repeats`` fresh processes each, the two sides alternating so
    that a shared machine's load hits them alike."""
    pairs_path = write_pairs(seq_len)
    cmd = [sys.executable, __file__, "--first-step-breakdown", pairs_path, "--size", size, "--seq-len", str(seq_len)]
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for _ in range(repeats):
        # a fresh, empty compilation cache each start: nothing compiled before
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="bench_simpo_cold_jax_cache")}
        ours, wall = timed_run(cmd + ["--pairs", str(rows)], env)
        runs["ours"].append({**ours, "spawn": wall})
        if trl_python is not None:
            trl, wall = trl_first_step(trl_python, size, seq_len, ours["pairs"], pairs_path)
            runs["trl"].append({**trl, "spawn": wall})
    ours = medians(runs["ours"])
    layout, pairs, positions = ours["layout"], ours["pairs"], ours["positions"]
    print(
        f"\n## Time to the first step, fresh process ({size} model, {rows} rows of {seq_len}, {layout}: {pairs} "
        f"pairs, {positions} positions a step; median of {repeats} start(s); load {os.getloadavg()[0]:.1f})\n"
    )
    phases = ("imports", "data", "trainer setup", "compile", "step")
    if trl_python is None:
        print("| " + " | ".join(phases) + " | spawn to first step done |")
        print("|" + "---|" * (len(phases) + 1))
        print("| " + " | ".join(f"{ours[k]:.1f} s" for k in phases) + f" | {ours['spawn']:.1f} s |")
        print("\nTRL's side skipped: pass --trl-python PYTHON, an interpreter with torch, transformers and trl.")
        return
    trl = medians(runs["trl"])
    batch = trl["first_batch"]
    print(
        f"TRL: torch {trl['torch']}, {trl['threads']} threads, CPOTrainer(loss_type=simpo, cpo_alpha=0, beta 2.0, "
        f"simpo_gamma 1.0), fp32, {pairs} pairs a step, its first batch padded to {batch[0]} x ({batch[1]} chosen + "
        f"{batch[2]} rejected) positions. TRL has no compile: its warm-up is its first step less its fastest later "
        "step.\n"
    )
    table = [
        ("imports", ours["imports"], trl["imports"]),
        ("data", ours["data"], trl["data"]),
        ("model build (ours: in the trainer's compiled initialisation, next row)", None, trl["model"]),
        ("trainer setup (TRL: tokenizing the pairs too)", ours["trainer setup"], trl["trainer setup"]),
        ("first step", ours["compile"] + ours["step"], trl["first step"]),
        ("- of which compile / warm-up", ours["compile"], trl["first step"] - trl["steady step"]),
        ("- steady step", ours["step"], trl["steady step"]),
        ("spawn to first step done", ours["spawn"], trl["spawn"]),
    ]
    print("| phase | Levanter SimPO s | TRL SimPO s | ours / TRL |")
    print("|---|---|---|---|")
    for label, a, b in table:
        print(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f} |" if a is not None else f"| {label} | | {b:.1f} | |")
    spawn = {side: [r["spawn"] for r in runs[side]] for side in runs}
    verdict = "at most" if ours["spawn"] <= trl["spawn"] else "more than"
    print(
        f"\nOurs from spawn to its first step: {ours['spawn']:.1f} s (each start: "
        f"{', '.join(f'{t:.1f}' for t in spawn['ours'])}), {verdict} TRL's {trl['spawn']:.1f} s "
        f"({', '.join(f'{t:.1f}' for t in spawn['trl'])}).",
        flush=True,
    )


def medians(runs: list[dict]) -> dict:
    """Each number's median over the runs (a median of each phase: the phases need not add up to the total)."""
    return {k: statistics.median(r[k] for r in runs) if isinstance(v, float) else v for k, v in runs[0].items()}


def padding_section() -> None:
    """Real-token fraction of the rows each layout builds from the same UltraFeedback-like pairs."""
    full_len, n_pairs = 2048, 2000  # no model runs here: --quick takes the full size too
    rows = ultrafeedback_like(n_pairs, full_len, scale=1.0)
    cache = write_cache(rows)
    Pos = Axis("position", full_len)
    k = 8
    print("\n## Real tokens on UltraFeedback-like lengths (Levanter's stack vs packed pairs vs shared prompt)\n")
    print(
        f"{n_pairs} synthetic pairs at seq_len {full_len}: mean prompt {cache.column('prompt_length').mean():.0f}, "
        f"chosen {cache.column('chosen_trained').mean():.0f}, rejected {cache.column('rejected_trained').mean():.0f} "
        f"tokens; rows count sequences of seq_len\n"
    )
    print("| layout | rows | real-token fraction | padding fraction | target |")
    print("|---|---|---|---|---|")
    built = {
        name: pair_layout(name, n).rows(cache, cache.kept, Pos)
        for name, n in (("padded", 1), ("packed", k), ("shared_prompt", k))
    }
    # what the packed layout was before first-fit decreasing: Levanter's greedy prepacking of consecutive pairs
    greedy = pack_documents(
        {"chosen": cache.column("chosen_length")[cache.kept], "rejected": cache.column("rejected_length")[cache.kept]},
        full_len,
        max_segments_per_example=k,
    )
    table = [
        (
            "Levanter padded (each side padded)",
            2 * len(built["padded"].pairs_per_row),
            built["padded"].real_tokens,
            "",
        ),
        (
            f"Levanter greedy prepacking of consecutive pairs, <= {k} pairs/row",
            2 * len(greedy),
            built["padded"].real_tokens,
            "",
        ),
        (
            f"packed (first-fit decreasing), <= {k} pairs/row",
            2 * len(built["packed"].pairs_per_row),
            built["packed"].real_tokens,
            "<= 10% padding",
        ),
        (
            f"shared_prompt (first-fit decreasing), <= {k} pairs/row",
            len(built["shared_prompt"].pairs_per_row),
            built["shared_prompt"].real_tokens,
            "<= 10% padding",
        ),
    ]
    for label, n_rows, real, target in table:
        fraction = real / (n_rows * full_len)
        print(f"| {label} | {n_rows} | {fraction:.3f} | {1 - fraction:.3f} | {target} |", flush=True)


def default_path_section(size: str, quick: bool, repeats: int) -> None:
    """pairs/s and real tokens per computed position of the SimPO default layout against Levanter's DPO step and
    LM step on the same padded sequences, all with the same rows x seq_len per step."""
    lay_len, lay_rows, k = (128, 4, 8) if quick else (512, 4, 8)
    scale = lay_len / 2048  # UltraFeedback lengths scaled to the row, so rows fill as they would at 2048
    cache = write_cache(ultrafeedback_like(2048, lay_len, scale=scale, seed=1))
    Pos = Axis("position", lay_len)
    # the 8B recipe's shape: rows as long as the data's max_length; auto decides from these pairs' lengths
    default, reason = resolve_pair_layout("auto", lay_len, PairLengths.of([cache]), jax.default_backend(), k)

    def timed_batch(rows, n: int):
        # step time depends only on the batch's shape; evenly spaced rows keep first-fit decreasing's fullest
        # (first) rows from standing for all of them
        picked = np.linspace(0, len(rows.pairs_per_row) - 1, n).round().astype(int).tolist()
        return stacked(rows.dataset.as_sync_dataset().get_batch(picked))

    padded = pair_layout("padded", 1).rows(cache, cache.kept, Pos)
    padded_batch = timed_batch(padded, lay_rows)
    # name: (label, Stepper variant, layout (SimPO only), rows, rows a step, sequences a row)
    variants = {
        "dpo": ("Levanter DPO step (padded, reference model)", "dpo", None, padded, lay_rows, 2),
        "lm": ("Levanter LM step (the same padded sequences)", "lm", None, padded, lay_rows, 2),
    }
    for name, n in ((default, lay_rows), ("shared_prompt", 2 * lay_rows)):
        layout = pair_layout(name, k)
        label = f"SimPO default path: {name}" if name == default else f"SimPO {name} (not the default)"
        variants[name] = (label, "simpo", layout, layout.rows(cache, cache.kept, Pos), n, layout.sequences_per_row)
    steppers, flops = {}, {}
    for name, (_, variant, layout, rows, n, _) in variants.items():
        if layout is None:
            steppers[name] = Stepper(variant, size, lay_len, padded_batch, n)
        else:
            steppers[name] = Stepper("simpo", size, lay_len, timed_batch(rows, n), n, layout=layout)
        flops[name] = step_flops(steppers[name], variant, layout)
    t = interleaved_medians(steppers, repeats)

    print(
        "\n## Default path against Levanter DPO and the LM step (UltraFeedback-like pairs, same rows x seq_len "
        "per step)\n"
    )
    print(
        f"model {size}, seq_len {lay_len}, {len(cache.kept)} pairs with lengths scaled by {scale:.3f}; the "
        f"default: {default} ({reason}); pairs/step and real tokens are the mean over all of a layout's rows (the "
        f"timed batch: evenly spaced rows), median of {repeats} interleaved steps, load {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| variant | rows x seq | pairs/step | step s | pairs/s | real tokens/s | real tokens / position "
        "| target | pairs/s vs DPO | target | XLA GFLOP/pair |"
    )
    print("|" + "---|" * 11)
    measured = {}
    for name, (_, _, _, rows, n, per_row) in variants.items():
        pairs_step = rows.pairs_per_row.mean() * n
        real_step = rows.real_tokens / len(rows.pairs_per_row) * n
        fill = rows.real_tokens / (len(rows.pairs_per_row) * per_row * lay_len)
        measured[name] = (pairs_step, real_step, fill)
    base = measured["dpo"][0] / t["dpo"]
    for name, (label, _, _, _, n, per_row) in variants.items():
        pairs_step, real_step, fill = measured[name]
        target = ">= 0.9" if name == default else ""
        ratio_target = ">= 3.5x" if name == default else ""
        print(
            f"| {label} | {n * per_row} x {lay_len} | {pairs_step:.1f} | {t[name]:.3f} | {pairs_step / t[name]:.1f} "
            f"| {real_step / t[name]:.0f} | {fill:.3f} | {target} | {pairs_step / t[name] / base:.2f}x "
            f"| {ratio_target} | {flops[name] / pairs_step / 1e9:.3f} |",
            flush=True,
        )


def step_flops(stepper: Stepper, variant: str, layout: PairLayout | None) -> float:
    """XLA's FLOPs for the loss and gradient of a stepper's batch (a load-independent check of its step time)."""
    model, batch = stepper.state.model, stepper.batch
    if variant == "dpo":

        def loss(m, b):
            return dpo_loss(m, inference_mode(b[0], True), b[1], beta=0.1)[0]

        return loss_grad_flops(model.policy, loss, (model.reference, batch))
    if variant == "lm":
        return loss_grad_flops(model, lambda m, b: lm_loss(m, b).scalar(), batch)
    return loss_grad_flops(model, lambda m, b: simpo_fn(layout)(m, b)[0], batch)


def data_sections(args, seq_len: int, pairs: int) -> None:
    """Tokenization rows/s against Levanter's preference_chat, start-up data work at scale, second-start time."""
    print("## Tokenization: each format's build_preprocessor(tokenizer), batches of 128, same rows\n")
    t = bench_data.tokenization_table(args.token_rows)[0]
    rates = t["rates"]
    ours, theirs = rates["ours preference_prompt_completion"], rates["levanter preference_chat"]
    print(
        f"byte-level BPE of {t['vocab']} tokens trained here on generated text (built or loaded in "
        f"{t['tokenizer_s']:.0f} s), Llama-3 chat template; {t['rows']} UltraFeedback-like rows (20% multi-turn), "
        "mean transcript "
        f"{t['mean_chosen_tokens']:.0f} tokens, median of 3 interleaved passes\n"
    )
    print("| preprocessor | rows/s | vs preference_chat | target | load |")
    print("|---|---|---|---|---|")
    print(f"| Levanter preference_chat | {theirs:.0f} | 1.00x | | {os.getloadavg()[0]:.1f} |")
    print(
        f"| SimPO preference_prompt_completion | {ours:.0f} | {ours / theirs:.2f}x | >= 1.00x "
        f"| {os.getloadavg()[0]:.1f} |\n",
        flush=True,
    )

    print(
        "## Start-up: launch-to-first-batch data work on an existing cache (build_preference_splits + first "
        "training batch of 64 rows), seq_len 2048\n"
    )
    print("| pairs | layout | splits s | first batch s | data work s | target | load |")
    print("|---|---|---|---|---|---|---|")
    layouts = {"padded": pair_layout("padded", 1), "packed": pair_layout("packed", 8)}
    for n in args.startup_pairs:
        r = bench_data.startup_seconds(n, layouts, os.path.join(tempfile.gettempdir(), f"bench_simpo_startup_{n}"))
        for name in layouts:
            s = r[name]
            total = s["splits_s"] + s["first_batch_s"]
            target = "<= 60 s" if n >= 1_000_000 else ""
            print(
                f"| {n:,} | {name} | {s['splits_s']:.1f} | {s['first_batch_s']:.1f} | {total:.1f} | {target} "
                f"| {os.getloadavg()[0]:.1f} |",
                flush=True,
            )

    print("\n## Time to first step, first and second start (fresh processes, one persistent compilation cache)\n")
    first, second = first_step_starts("tiny", seq_len, pairs)
    print("| model | first start s | second start s | second / first | load |")
    print("|---|---|---|---|---|")
    print(
        f"| tiny, seq {seq_len}, {pairs} pairs | {first:.1f} | {second:.1f} | {second / first:.2f} "
        f"| {os.getloadavg()[0]:.1f} |\n",
        flush=True,
    )


if __name__ == "__main__":
    main()
