# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Build the tiny, offline SimPO preference data set and its word-level tokenizer.

Writes (relative to ``lib/levanter/data/tiny_simpo/``):

* ``tokenizer/``        a few-hundred-token word-level tokenizer with a Llama-3-style chat template
* ``train.jsonl``       preference pairs in the HuggingFaceH4/ultrafeedback_binarized row shape
* ``validation.jsonl``  held-out pairs whose prompts never occur in ``train.jsonl``

Every pair is a synthetic instruction whose correct answer depends on the prompt (recall the
items the prompt lists, say a word k times, repeat or reverse a word list, pick the members of a
category, one more / one less than N, colour/animal binding). The chosen answer gets it right; the
rejected answer is the right answer to a *neighbouring* prompt (one item or repetition too many,
the wrong order, another category, ...), so without the prompt the two look alike. The rejected
answer is longer in about two thirds of the pairs and shorter in about a fifth, so preferring the
shorter answer is a ~65% baseline that a model has to beat by reading the prompt.

The script is deterministic (fixed seed, no set iteration order dependence) and uses only the
standard library plus ``tokenizers``/``transformers``.

Run from the repository root:

    uv run python lib/levanter/scripts/make_tiny_simpo_data.py
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable

SEED = 20240611
NUM_TRAIN = 2500
NUM_VALIDATION = 250
MAX_SEQ_LEN = 128

DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "tiny_simpo")

# ---------------------------------------------------------------------------------------------
# Tokenizer definition
# ---------------------------------------------------------------------------------------------

PAD = "<|pad|>"
UNK = "<|unk|>"
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, START_HEADER, END_HEADER, EOT]
ROLE_WORDS = ["system", "user", "assistant"]

# Llama-3 layout: BOS once, then per turn `<|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>`.
# The assistant content *and* its end-of-turn token sit inside `{% generation %}` so that the
# assistant mask (and therefore the SimPO average log-prob) covers the answer plus <|eot_id|>.
CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {%- if message['role'] == 'assistant' %}\n"
    "        {%- generation %}{{- message['content'] | trim }}{{- '<|eot_id|>' }}{%- endgeneration %}\n"
    "    {%- else %}\n"
    "        {{- message['content'] | trim }}{{- '<|eot_id|>' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# ---------------------------------------------------------------------------------------------
# Word pools
# ---------------------------------------------------------------------------------------------

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey", "gold"]
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "wolf", "frog", "duck", "goat", "lion", "horse", "mouse"]
FOODS = ["apple", "pear", "plum", "grape", "lemon", "melon", "bread", "cheese", "rice", "soup", "cake", "egg"]
NAMES = ["anna", "ben", "carl", "dana", "eve", "finn", "gina", "hugo", "iris", "jack", "kim", "leo"]
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}
MAX_NUMBER = 20
# category name (plural) -> members
CATEGORIES = {"animals": ANIMALS, "colours": COLOURS, "foods": FOODS, "names": NAMES}

# Neutral padding phrases. They are attached to chosen and rejected answers independently with the
# same probabilities, so they carry no information about which answer is preferred.
LEAD_INS = ["sure .", "ok .", "let me think .", "here is my answer :", "good question ."]
TAILS = ["i hope this helps .", "is there anything else ?", "that is my answer .", "thanks for asking ."]
P_LEAD_IN = 0.06
P_TAIL = 0.06

# Probability that a family uses its same-length mistake (wrong item / wrong order / wrong number)
# instead of its "wrong size" mistake.
P_SAME_LENGTH_MISTAKE = 0.05

# ---------------------------------------------------------------------------------------------
# Task families. Each returns (family, prompt, chosen_core, rejected_core).
#
# Design rule: every rejected answer is the *correct* answer to a neighbouring prompt (one item,
# repetition or number too many, the other word order, the members of another category, ...).
# Rejected answers therefore look exactly like chosen answers when read without the prompt (same
# vocabulary, no duplicated items, same range of list sizes), so only the prompt tells them apart.
#
# Length asymmetry without answer-only artefacts: list sizes k are uniform over a small range and the
# rejected size is the cyclic successor of the chosen size (2->3->4->5->6->2). That makes the rejected
# answer longer for most pairs (all but the wrap-around) while chosen and rejected sizes have the same
# marginal distribution.
# ---------------------------------------------------------------------------------------------

Task = tuple[str, str, str, str]


def _cyclic_next(value: int, levels: list[int]) -> int:
    return levels[(levels.index(value) + 1) % len(levels)]


def _other(rng: random.Random, pool: list[str], exclude: list[str]) -> str:
    return rng.choice([w for w in pool if w not in exclude])


def _join(items: list[str]) -> str:
    return " and ".join(items)


def _resize(rng: random.Random, items: list[str], size: int, pool: list[str]) -> list[str]:
    """Grow `items` to `size` by inserting distinct words from `pool` at random positions, or shrink it
    to a random order-preserving subset of `size` items."""
    out = list(items)
    if size < len(out):
        keep = sorted(rng.sample(range(len(out)), size))
        return [out[i] for i in keep]
    while len(out) < size:
        out.insert(rng.randrange(len(out) + 1), _other(rng, pool, out))
    return out


def _wrong_list(rng: random.Random, items: list[str], levels: list[int], pool: list[str]) -> list[str]:
    if rng.random() < P_SAME_LENGTH_MISTAKE:
        wrong = list(items)
        wrong[rng.randrange(len(wrong))] = _other(rng, pool, items)
        return wrong
    return _resize(rng, items, _cyclic_next(len(items), levels), pool)


def task_recall(rng: random.Random) -> Task:
    """The prompt states 1-6 items; the answer must list exactly those items."""
    levels = [1, 2, 3, 4, 5, 6]
    name = rng.choice(NAMES)
    n = rng.choice(levels)
    kind = rng.randrange(3)
    if kind == 0:
        items = rng.sample(FOODS, n)
        prompt = rng.choice(
            [
                f"{name} likes {_join(items)} . what does {name} like ?",
                f"for lunch {name} had {_join(items)} . what did {name} eat ?",
            ]
        )
        verb = "likes" if "likes" in prompt else "ate"
        wrong = _wrong_list(rng, items, levels, FOODS)
        return "recall", prompt, f"{name} {verb} {_join(items)} .", f"{name} {verb} {_join(wrong)} ."
    if kind == 1:
        items = rng.sample(ANIMALS, n)
        pets = _join([f"a {a}" for a in items])
        prompt = rng.choice(
            [f"{name} has {pets} . which pets does {name} have ?", f"{name} keeps {pets} at home . name the pets ."]
        )
        wrong = _wrong_list(rng, items, levels, ANIMALS)
        return "recall", prompt, f"{name} has {pets} .", f"{name} has {_join([f'a {a}' for a in wrong])} ."
    items = rng.sample(COLOURS, n)
    prompt = rng.choice(
        [
            f"remember these colours : {' '.join(items)} . which colours did i say ?",
            f"my favourite colours are {_join(items)} . what are my favourite colours ?",
        ]
    )
    frame = "you said {} ." if "remember" in prompt else "your favourite colours are {} ."
    wrong = _wrong_list(rng, items, levels, COLOURS)
    return "recall", prompt, frame.format(_join(items)), frame.format(_join(wrong))


def task_successor(rng: random.Random) -> Task:
    """One more / one less than N; the rejected answer goes the wrong way, skips, or repeats N."""
    name = rng.choice(NAMES)
    if rng.random() < 0.5:
        n, step = rng.randrange(1, MAX_NUMBER), 1
        prompt = rng.choice(
            [
                f"what number comes after {n} ?",
                f"what is one more than {n} ?",
                f"{name} has {n} coins and finds one more . how many coins now ?",
            ]
        )
    else:
        n, step = rng.randrange(2, MAX_NUMBER + 1), -1
        prompt = rng.choice(
            [
                f"what number comes before {n} ?",
                f"what is one less than {n} ?",
                f"{name} has {n} coins and loses one . how many coins now ?",
            ]
        )
    frame = rng.choice(["the answer is {} .", "it is {} ."])
    wrong = rng.choice([n - step, n + 2 * step, n])
    return "successor", prompt, frame.format(n + step), frame.format(wrong)


def task_repeat(rng: random.Random) -> Task:
    """Say a word k times (k = 2-7); the rejected answer repeats it a different number of times
    (usually once more) or repeats another word."""
    levels = sorted(NUMBER_WORDS)
    pool = rng.choice([ANIMALS, COLOURS, FOODS])
    word = rng.choice(pool)
    k = rng.choice(levels)
    prompt = rng.choice([f"say {word} {NUMBER_WORDS[k]} times .", f"repeat the word {word} {NUMBER_WORDS[k]} times ."])
    if rng.random() < P_SAME_LENGTH_MISTAKE:
        wrong = [_other(rng, pool, [word])] * k
    else:
        wrong = [word] * _cyclic_next(k, levels)
    return "repeat", prompt, " ".join([word] * k) + " .", " ".join(wrong) + " ."


def task_order(rng: random.Random) -> Task:
    """Repeat or reverse a list of 2-6 distinct words; the rejected answer gets the order wrong, or
    has the right order but slips in a word that is not in the prompt (or drops words on the wrap)."""
    levels = [2, 3, 4, 5, 6]
    pool = rng.choice([ANIMALS, COLOURS, FOODS, NAMES])
    n = rng.choice(levels)
    w = rng.sample(pool, n)
    listed = " ".join(w)
    if rng.random() < 0.5:
        prompt = rng.choice([f"reverse these words : {listed}", f"say these words backwards : {listed}"])
        right = w[::-1]
    else:
        prompt = rng.choice([f"repeat these words : {listed}", f"say these words in order : {listed}"])
        right = list(w)
    if rng.random() < 2 * P_SAME_LENGTH_MISTAKE:
        wrong = right[::-1] if rng.random() < 0.7 else right[1:] + right[:1]
    else:
        wrong = _resize(rng, right, _cyclic_next(n, levels), pool)
    return "order", prompt, " ".join(right) + " .", " ".join(wrong) + " ."


def task_category(rng: random.Random) -> Task:
    """Pick the members of one category from a mixed list; the rejected answer lists the members of
    another category that is also in the list (i.e. the right answer to a different question)."""
    levels = [1, 2, 3, 4, 5]
    cats = sorted(CATEGORIES)
    target, other, third = rng.sample(cats, 3)
    m_target = rng.choice(levels)
    m_other = m_target if rng.random() < P_SAME_LENGTH_MISTAKE else _cyclic_next(m_target, levels)
    options = rng.sample(CATEGORIES[target], m_target) + rng.sample(CATEGORIES[other], m_other)
    if rng.random() < 0.5:
        options.append(rng.choice(CATEGORIES[third]))
    rng.shuffle(options)
    prompt = rng.choice(
        [f"which of these are {target} : {' , '.join(options)} ?", f"pick the {target} : {' , '.join(options)}"]
    )
    right = [o for o in options if o in CATEGORIES[target]]
    wrong = [o for o in options if o in CATEGORIES[other]]
    return "category", prompt, f"{_join(right)} .", f"{_join(wrong)} ."


def task_binding(rng: random.Random) -> Task:
    """Two colour/animal pairs in the prompt; the rejected answer uses the other pair's colour."""
    a1, a2 = rng.sample(ANIMALS, 2)
    c1, c2 = rng.sample(COLOURS, 2)
    name = rng.choice(NAMES)
    prompt = f"{name} has a {c1} {a1} and a {c2} {a2} . what colour is the {a2} ?"
    return "binding", prompt, f"the {a2} is {c2} .", f"the {a2} is {c1} ."


TASKS: list[tuple[Callable[[random.Random], Task], float]] = [
    (task_recall, 0.32),
    (task_repeat, 0.22),
    (task_order, 0.20),
    (task_category, 0.14),
    (task_successor, 0.08),
    (task_binding, 0.04),
]

# ---------------------------------------------------------------------------------------------
# Row generation
# ---------------------------------------------------------------------------------------------


def _pad(rng: random.Random, core: str) -> str:
    """Attach neutral padding independently of whether the answer is chosen or rejected."""
    parts = [core]
    if rng.random() < P_LEAD_IN:
        parts.insert(0, rng.choice(LEAD_INS))
    if rng.random() < P_TAIL:
        parts.append(rng.choice(TAILS))
    return " ".join(parts)


def make_row(rng: random.Random, task: Callable[[random.Random], Task]) -> tuple[str, dict]:
    family, prompt, chosen_core, rejected_core = task(rng)
    assert chosen_core != rejected_core, (prompt, chosen_core)
    chosen, rejected = _pad(rng, chosen_core), _pad(rng, rejected_core)
    row = {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}],
        "score_chosen": float(rng.choice([7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0])),
        "score_rejected": float(rng.choice([1.0, 2.0, 3.0, 3.5, 4.0, 5.0, 6.0])),
    }
    return family, row


def make_split(rng: random.Random, n: int, forbidden_prompts: set[str]) -> list[dict]:
    """Sample `n` rows, none of whose prompts is in `forbidden_prompts` (the held-out set).

    Prompts are kept distinct within the split where the family has enough of them. Families are
    allocated by weight (largest remainder) so every split has the same mix."""
    tasks = [t for t, _ in TASKS]
    weights = [w for _, w in TASKS]
    total = sum(weights)
    counts = [int(n * w / total) for w in weights]
    for i in sorted(range(len(tasks)), key=lambda i: -(n * weights[i] / total - counts[i]))[: n - sum(counts)]:
        counts[i] += 1
    schedule = [t for t, c in zip(tasks, counts) for _ in range(c)]
    rng.shuffle(schedule)

    seen: set[str] = set()
    rows: list[dict] = []
    for task in schedule:
        # Prefer a prompt not yet used in this split; never reuse a forbidden (held-out) prompt.
        fallback = None
        for _ in range(200):
            _, row = make_row(rng, task)
            if row["prompt"] in forbidden_prompts:
                continue
            if row["prompt"] not in seen:
                break
            fallback = fallback or row
        else:
            if fallback is None:
                raise RuntimeError(f"could not find an allowed prompt for {task.__name__}")
            row = fallback
        seen.add(row["prompt"])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Tokenizer construction
# ---------------------------------------------------------------------------------------------


def _pre_tokenize(text: str) -> list[str]:
    # Mirrors the tokenizer's pre-tokenizer: Whitespace (\w+|[^\w\s]+) followed by isolated punctuation.
    return re.findall(r"\w+|[^\w\s]", text.lower())


def corpus_words() -> list[str]:
    """Every word any generator (or the chat template) can emit, in a stable order."""
    words: set[str] = set(ROLE_WORDS)
    pools = [COLOURS, ANIMALS, FOODS, NAMES, list(NUMBER_WORDS.values()), sorted(CATEGORIES), LEAD_INS, TAILS]
    for pool in pools:
        for phrase in pool:
            words.update(_pre_tokenize(phrase))
    words.update(str(i) for i in range(0, MAX_NUMBER + 3))
    return sorted(words)


def build_tokenizer(rows: list[dict], out_dir: str):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = set(corpus_words())
    for row in rows:
        for turn in row["chosen"] + row["rejected"]:
            words.update(_pre_tokenize(turn["content"]))
    words = sorted(w for w in words if w not in SPECIAL_TOKENS)

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    # No post-processor of ours (the saved tokenizer.json has a TemplateProcessing that adds no special tokens): plain
    # `encode` adds nothing, so BOS comes only from the chat template (Levanter and transformers both tokenize the
    # rendered chat with add_special_tokens=False).

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[START_HEADER, END_HEADER, EOT],
        model_max_length=MAX_SEQ_LEN,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    # save_jinja_files=False keeps the template inline in tokenizer_config.json ("chat_template").
    hf_tok.save_pretrained(out_dir, save_jinja_files=False)
    _normalize_tokenizer_config(out_dir)
    return hf_tok


def _normalize_tokenizer_config(out_dir: str) -> None:
    """Make tokenizer_config.json loadable beyond the transformers version that wrote it.

    Recent transformers write ``tokenizer_class: TokenizersBackend`` and ``extra_special_tokens`` and
    omit ``added_tokens_decoder``. Use the long-standing names instead, and list the added tokens so
    loaders that read only the config (e.g. ``levanter.tokenizers``' special-id collection) see them.
    """
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(os.path.join(out_dir, "tokenizer.json"), encoding="utf-8") as f:
        added_tokens = json.load(f)["added_tokens"]
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    extra = config.pop("extra_special_tokens", None) or config.pop("additional_special_tokens", None)
    config["additional_special_tokens"] = list(extra or [START_HEADER, END_HEADER, EOT])
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in added_tokens
    }
    config.pop("backend", None)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def check_lengths(hf_tok, rows: list[dict]) -> tuple[list[int], list[int], int]:
    """Return completion token counts (content + <|eot_id|>) and the max full-sequence length."""
    chosen_lens, rejected_lens, max_len = [], [], 0
    unk_id = hf_tok.convert_tokens_to_ids(UNK)
    for row in rows:
        for key, lens in (("chosen", chosen_lens), ("rejected", rejected_lens)):
            ids = hf_tok.apply_chat_template(row[key], tokenize=True, return_dict=False)
            if isinstance(ids, dict):
                ids = ids["input_ids"]
            assert unk_id not in ids, row[key]
            max_len = max(max_len, len(ids))
            lens.append(len(hf_tok.encode(row[key][1]["content"], add_special_tokens=False)) + 1)
    return chosen_lens, rejected_lens, max_len


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    out_dir = os.path.normpath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)

    rng = random.Random(SEED)
    validation = make_split(rng, NUM_VALIDATION, forbidden_prompts=set())
    train = make_split(rng, NUM_TRAIN, forbidden_prompts={r["prompt"] for r in validation})

    hf_tok = build_tokenizer(train + validation, os.path.join(out_dir, "tokenizer"))
    write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(out_dir, "validation.jsonl"), validation)

    print(f"vocab size: {len(hf_tok)}")
    for name, rows in (("train", train), ("validation", validation)):
        c, r, max_len = check_lengths(hf_tok, rows)
        assert max_len <= MAX_SEQ_LEN, (name, max_len)
        longer = sum(rl > cl for cl, rl in zip(c, r)) / len(rows)
        shorter = sum(rl < cl for cl, rl in zip(c, r)) / len(rows)
        print(
            f"{name}: {len(rows)} pairs, mean completion tokens chosen={sum(c) / len(c):.2f} "
            f"rejected={sum(r) / len(r):.2f}, rejected longer={longer:.3f}, rejected shorter={shorter:.3f}, "
            f"max sequence length={max_len}"
        )


if __name__ == "__main__":
    main()
