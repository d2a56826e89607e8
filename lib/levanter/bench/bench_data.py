# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""The SimPO data path at scale: tokenization rows/s against Levanter's ``preference_chat`` and launch-to-first-batch
data work on large pair caches. Called by ``bench_simpo.py`` (``--data-only`` runs only these sections)."""

import functools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from levanter.data.simpo.prompt_completion import PromptCompletionPreferenceFormat
from levanter.data.text.preference import PreferenceChatLmDatasetFormat
from levanter.tokenizers import MarinTokenizer, load_tokenizer

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL = [BOS, EOS, PAD, START_HEADER, END_HEADER, EOT]
# Llama-3's chat layout, the assistant turn marked as the {% generation %} span (as in the 8B config)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}<|eot_id|>"
    "{% endgeneration %}{% else %}{{ message['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
)
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ie")]
# UltraFeedback-like token lengths (means; log-normal tails): prompts ~170 (median ~110), completions ~300
TEXT_MEANS = {"prompt": 170, "chosen": 320, "rejected": 280}
TEXT_SIGMA = {"prompt": 0.9, "chosen": 0.7, "rejected": 0.75}
WORDS_PER_TOKEN = 0.53  # of the generated text under bpe_tokenizer (the table prints the measured token lengths)


def _rows(layout, Pos, pairs, kept):
    return layout.rows(pairs, kept, Pos)


def _lexicon(n: int, rng: np.random.Generator) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES, rng.integers(1, 5))))
    return sorted(words)


class TextGenerator:
    """Zipf-distributed pseudo-words with punctuation and line breaks, so a byte-level BPE learns real merges."""

    def __init__(self, seed: int = 0, lexicon: int = 150_000):
        self.rng = np.random.default_rng(seed)
        self.words = np.array(_lexicon(lexicon, self.rng))
        ranks = np.arange(1, len(self.words) + 1)
        self.p = 1.0 / ranks**1.05
        self.p /= self.p.sum()

    def words_of(self, n: int) -> str:
        words = self.rng.choice(self.words, n, p=self.p)
        out = []
        for w in words:
            out.append(str(w))
            r = self.rng.random()
            if r < 0.06:
                out.append(".\n" if r < 0.015 else ". ")
            elif r < 0.1:
                out.append(", ")
            else:
                out.append(" ")
        return "".join(out).strip()


def bpe_tokenizer(directory: Path, vocab_size: int = 100_352) -> MarinTokenizer:
    """A byte-level BPE with ``vocab_size`` tokens trained here on generated text, Llama-3's special tokens and
    chat template (nothing downloaded)."""
    if not (directory / "tokenizer.json").exists():
        gen = TextGenerator(seed=123)
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(SPECIAL) - 1,
            special_tokens=SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        # every lexicon word once (so the vocabulary can grow to whole words), then running text
        corpus = [" ".join(gen.words[i : i + 1000]) for i in range(0, len(gen.words), 1000)]
        corpus += [gen.words_of(2000) for _ in range(300)]
        tokenizer.train_from_iterator(corpus, trainer=trainer)
        tokenizer.add_tokens([AddedToken("\n\n", normalized=False)])
        directory.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(directory / "tokenizer.json"))
        vocab = tokenizer.get_vocab()
        config = {
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": {str(vocab[t]): {"content": t, "special": True} for t in SPECIAL},
            "chat_template": LLAMA3_TEMPLATE,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(str(directory))


def ultrafeedback_like_rows(n: int, seed: int = 0, multi_turn: float = 0.2) -> list[dict]:
    """ultrafeedback_binarized-shaped rows with UltraFeedback-like lengths (in words of the generated text, about
    a token each under ``bpe_tokenizer``); a ``multi_turn`` fraction has one or two earlier exchanges."""
    gen = TextGenerator(seed=seed)
    rng = np.random.default_rng(seed + 1)

    def length(part: str, scale: float = 1.0) -> int:
        sigma = TEXT_SIGMA[part]
        return max(1, int(rng.lognormal(np.log(TEXT_MEANS[part] * scale * WORDS_PER_TOKEN) - sigma**2 / 2, sigma)))

    rows = []
    for i in range(n):
        history: list[dict] = []
        if rng.random() < multi_turn:
            for _ in range(int(rng.integers(1, 3))):
                history += [
                    {"role": "user", "content": gen.words_of(length("prompt", 0.4))},
                    {"role": "assistant", "content": gen.words_of(length("chosen", 0.4))},
                ]
        prompt = gen.words_of(length("prompt"))
        turns = [*history, {"role": "user", "content": prompt}]
        rows.append(
            {
                "prompt": prompt,
                "prompt_id": f"p{i}",
                "chosen": [*turns, {"role": "assistant", "content": gen.words_of(length("chosen"))}],
                "rejected": [*turns, {"role": "assistant", "content": gen.words_of(length("rejected"))}],
            }
        )
    return rows


def rows_per_second(processor, rows: list[dict], batch: int = 128) -> float:
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        processor(rows[i : i + batch])
    return len(rows) / (time.perf_counter() - start)


def tokenization_table(n_rows: int, repeats: int = 3) -> list[dict]:
    """Rows/s of each format's ``build_preprocessor(tokenizer)`` on the same rows, batches of 128, interleaved."""
    directory = Path(os.environ.get("BENCH_TOKENIZER_DIR", Path(tempfile.gettempdir()) / "bench_simpo_bpe100k"))
    t0 = time.perf_counter()
    tokenizer = bpe_tokenizer(directory)
    built = time.perf_counter() - t0
    rows = ultrafeedback_like_rows(n_rows)
    formats = {
        "levanter preference_chat": PreferenceChatLmDatasetFormat(),
        "ours preference_prompt_completion": PromptCompletionPreferenceFormat(),
    }
    processors = {name: f.build_preprocessor(tokenizer) for name, f in formats.items()}
    for p in processors.values():
        p(rows[:8])  # warm up
    rates: dict[str, list[float]] = {name: [] for name in processors}
    for r in range(repeats):
        for name in list(processors)[r % 2 :] + list(processors)[: r % 2]:
            rates[name].append(rows_per_second(processors[name], rows))
    lengths = [len(x) for x in processors["levanter preference_chat"](rows[:256]) for x in (x["chosen_input_ids"],)]
    return [
        {
            "vocab": tokenizer.vocab_size,
            "tokenizer_s": built,
            "rows": n_rows,
            "mean_chosen_tokens": float(np.mean(lengths)),
            "rates": {name: float(np.median(v)) for name, v in rates.items()},
        }
    ]


if __name__ == "__main__":
    print(tokenization_table(512, repeats=1), os.getloadavg())


def write_pair_cache(path: str, n_pairs: int, metadata: dict, seed: int = 0, chunk: int = 20_000) -> float:
    """``n_pairs`` synthetic pairs in the SimPO cache format (``pair_info`` beside the tokens, as the cache builder
    writes them) with a tenth of UltraFeedback's lengths, so a million pairs take ~1 GB; returns seconds."""
    from levanter.data.simpo.pair_build import PAIR_INFO, cache_exemplar
    from levanter.store.cache import CacheMetadata, SerialCacheWriter

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    empty = np.zeros((0,), np.uint8)
    with SerialCacheWriter(path, cache_exemplar(), metadata=CacheMetadata(preprocessor_metadata=metadata)) as writer:
        for first in range(0, n_pairs, chunk):
            n = min(chunk, n_pairs - first)
            lengths = {
                part: np.maximum(2, rng.lognormal(np.log(mean / 10) - TEXT_SIGMA[part] ** 2 / 2, TEXT_SIGMA[part], n))
                for part, mean in TEXT_MEANS.items()
            }
            records = []
            for i in range(n):
                p, c, r = (int(lengths[part][i]) for part in ("prompt", "chosen", "rejected"))
                prompt = np.r_[1, rng.integers(3, 1000, p - 1)].astype(np.int32)
                record = {}
                for side, k in (("chosen", c), ("rejected", r)):
                    record[f"{side}_input_ids"] = np.r_[prompt, rng.integers(3, 1000, k - 1), 2].astype(np.int32)
                    record[f"{side}_assistant_masks"] = np.r_[np.zeros(p, np.int32), np.ones(k, np.int32)]
                values = {
                    "prompt_length": p,
                    "chosen_length": p + c,
                    "rejected_length": p + r,
                    "chosen_trained": c,
                    "rejected_trained": r,
                }
                record["pair_info"] = np.array([values.get(name, 0) for name in PAIR_INFO], np.int32)
                record["error"] = empty
                records.append(record)
            writer.write_batch(records)
    return time.perf_counter() - start


def startup_seconds(n_pairs: int, layouts: dict, root: str, seq_len: int = 2048, batch: int = 64) -> dict:
    """Seconds of launch-to-first-batch data work on an existing cache of ``n_pairs``: ``build_preference_splits``
    (open the cache, lay the pairs out in rows, hold out, shuffle, mix) and the first training batch, per layout
    (``{name: PairLayout}``); a fresh process would pay the same."""
    import jax.random as jrandom

    from haliax import Axis
    from levanter.data.simpo.splits import build_preference_splits
    from levanter.data.text.datasets import DatasetComponent, UrlDatasetSourceConfig, _component_cache_path
    from levanter.data.text.preference import PreferenceLmDataConfig
    from levanter.schedule import BatchSchedule

    tokenizer_dir = str(Path(tempfile.gettempdir()) / "bench_simpo_bpe100k")
    tokenizer = bpe_tokenizer(Path(tokenizer_dir))
    fmt = PromptCompletionPreferenceFormat()
    Path(root).mkdir(parents=True, exist_ok=True)
    source = Path(root) / "source.jsonl"  # the cache exists: the source is only identified
    source.write_text(json.dumps({"chosen": [], "rejected": []}) + "\n")
    config = PreferenceLmDataConfig(
        tokenizer=tokenizer_dir,
        cache_dir=str(Path(root) / "cache"),
        components={"uf": DatasetComponent(source=UrlDatasetSourceConfig(train_urls=[str(source)]), format=fmt)},
        shuffle=True,
    )
    path = _component_cache_path("uf", config.components["uf"], config.cache_dir, "train")
    write_s = 0.0
    if not Path(path, "shard_ledger.json").exists():
        write_s = write_pair_cache(path, n_pairs, fmt.build_preprocessor(tokenizer).metadata)
    Pos = Axis("position", seq_len)
    out = {"pairs": n_pairs, "write_s": write_s}
    for name, layout in layouts.items():
        start = time.perf_counter()
        splits = build_preference_splits(
            config,
            functools.partial(_rows, layout, Pos),
            seq_len=seq_len,
            key=jrandom.PRNGKey(0),
            validation_split_fraction=0.005,
        )
        built = time.perf_counter() - start
        splits.train(BatchSchedule(batch)).as_sync_dataset().get_batch(list(range(batch)))
        out[name] = {"splits_s": built, "first_batch_s": time.perf_counter() - start - built}
    return out
