# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""TRL's SimPO to its first step from a fresh process, by phase: the TRL side of ``bench_simpo.py``'s first-step table.

    bench_simpo.py --microbatches --trl-python /path/to/python   # runs this file with that interpreter

It needs torch, transformers and trl (none of them a dependency of this project: the interpreter is a separate
environment) and reads a spec that ``bench_simpo.py`` writes: the Hugging Face config of the benchmark's model (the
same ``LlamaConfig`` converted), the pairs (token ids of the same UltraFeedback-like pairs the Levanter side lays
out), pairs per step and the sequence length. Nothing is fetched: a word-level tokenizer whose token ``t<i>`` is
id ``i`` is built here, so TRL tokenizes text back to exactly the benchmark's ids. The model is a randomly
initialised ``LlamaForCausalLM`` in fp32 trained by ``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0``.

Phases (seconds): imports (from this file's start), data (pairs read, tokenizer built, ``Dataset``), model (built),
trainer setup (``CPOTrainer.__init__``, which tokenizes every pair, and ``train()`` up to its first step: optimizer,
data loader, first batch), first step, and the fastest later step. Prints one JSON line.
"""

import time

_PROCESS_START = time.perf_counter()
_PROCESS_START_WALL = time.time()  # the parent's clock counts from the spawn; this lines both up

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, pre_tokenizers  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402

PAD, BOS, EOS = 0, 1, 2  # the benchmark's pairs start prompts with 1 and end completions with 2


def id_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab.update({"<pad>": PAD, "<s>": BOS, "</s>": EOS})
    del vocab["t0"], vocab["t1"], vocab["t2"]
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def text(ids: list[int]) -> str:
    names = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}
    return " ".join(names.get(i, f"t{i}") for i in ids)


class StepClock(TrainerCallback):
    def __init__(self):
        self.begins: list[float] = []
        self.ends: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def main(spec_path: str) -> None:
    phases = {"imports": time.perf_counter() - _PROCESS_START}
    start = time.perf_counter()
    with open(spec_path) as f:
        spec = json.load(f)
    with open(spec["pairs"]) as f:
        pairs = [json.loads(line) for line in f]
    tokenizer = id_tokenizer(spec["hf_config"]["vocab_size"])
    # a leading space keeps TRL's prompt + completion tokenization split exactly at the prompt's end
    dataset = Dataset.from_dict(
        {
            "prompt": [text(p["prompt"]) for p in pairs],
            "chosen": [" " + text(p["chosen"]) for p in pairs],
            "rejected": [" " + text(p["rejected"]) for p in pairs],
        }
    )
    phases["data"] = time.perf_counter() - start

    start = time.perf_counter()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**spec["hf_config"]))
    phases["model"] = time.perf_counter() - start

    start = time.perf_counter()
    args = CPOConfig(
        output_dir=spec["output_dir"],
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=spec["beta"],
        simpo_gamma=spec["simpo_gamma"],
        max_length=spec["seq_len"],
        per_device_train_batch_size=spec["pairs_per_step"],
        max_steps=spec["steps"],
        learning_rate=1e-4,
        # the Levanter side's settings: fp32 and no rematerialisation (TRL defaults to bf16 and checkpointing)
        bf16=False,
        gradient_checkpointing=False,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    clock = StepClock()
    trainer = CPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    shapes = []
    collate = trainer.data_collator

    def recording_collator(features):
        batch = collate(features)
        shapes.append([*batch["chosen_input_ids"].shape, batch["rejected_input_ids"].shape[1]])
        return batch

    trainer.data_collator = recording_collator
    trainer.train()
    phases["trainer setup"] = clock.begins[0] - start
    steps = [end - begin for begin, end in zip(clock.begins, clock.ends)]
    phases["first step"] = steps[0]
    first_done = _PROCESS_START_WALL + (clock.ends[0] - _PROCESS_START)
    print(
        json.dumps(
            {
                **phases,
                "steady step": min(steps[1:]),
                "first_step_done_wall": first_done,
                "first_batch": shapes[0],
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
