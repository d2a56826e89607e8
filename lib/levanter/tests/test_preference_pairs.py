# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Preference pairs through Levanter's real cache and its own ``PreferencePairDataset``: statistics, drops and
cuts from the cache build, the held-out split over the pairs that train, and the ``DpoExample``s served."""

import dataclasses
import json
import logging
import shutil
import signal
import subprocess
import sys
import time

import fsspec
import jax.random as jrandom
import numpy as np
import pytest
from preference_chat_fixtures import LLAMA3_TEMPLATE, dropped_counts, llama3_style_tokenizer, preference_row

from haliax import Axis
from levanter.data.simpo import cache_identity
from levanter.data.simpo.cache_identity import cache_contents
from levanter.data.simpo.prompt_completion import PromptCompletionPreferenceFormat
from levanter.data.simpo.rows import PreferenceRowError
from levanter.data.simpo.splits import build_preference_splits, packed_pair_rows, padded_pair_rows
from levanter.data.text.datasets import DatasetComponent, UrlDatasetSourceConfig
from levanter.data.text.preference import PreferenceChatLmDatasetFormat, PreferenceLmDataConfig
from levanter.schedule import BatchSchedule

Pos = Axis("position", 48)


def _splits(config, *, validation_split_fraction, rows_of=lambda pairs, kept: padded_pair_rows(pairs, kept, Pos)):
    return build_preference_splits(
        config,
        rows_of,
        seq_len=Pos.size,
        key=jrandom.PRNGKey(0),
        validation_split_fraction=validation_split_fraction,
    )


def _rows() -> list[dict]:
    rows = [preference_row(f"count to {i} .", " ".join(["one"] * (1 + i % 5)), "no .") for i in range(10)]
    rows[3] = preference_row("say yes .", "yes .", "yes .", prompt_id="same")  # identical: dropped
    rows[6] = preference_row("say yes .", "", "no .", prompt_id="empty")  # empty completion: dropped
    rows[9] = preference_row(" ".join(["red"] * 60), "yes .", "no .", prompt_id="long")  # over the total budget
    return rows


def _config(tmp_path, rows, format) -> PreferenceLmDataConfig:
    tokenizer_dir = tmp_path / "tokenizer"
    llama3_style_tokenizer(tokenizer_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = UrlDatasetSourceConfig(train_urls=[str(data)])
    return PreferenceLmDataConfig(
        tokenizer=str(tokenizer_dir),
        cache_dir=str(tmp_path / "cache"),
        components={"prefs": DatasetComponent(source=source, format=format)},
        shuffle=False,
    )


def test_splits_stats_and_examples_through_the_cache(tmp_path):
    config = _config(tmp_path, _rows(), PromptCompletionPreferenceFormat(max_length=48, max_prompt_length=24))
    splits = _splits(config, validation_split_fraction=0.2)

    stats = splits.stats["train/prefs"]
    assert (stats.rows, stats.pairs) == (10, 8)
    assert stats.dropped == dropped_counts(empty_completion=1, identical_completions=1)
    assert stats.cut == {"prompt": 1, "completions": 0, "pairs": 1}
    assert stats.max_sequence_tokens <= Pos.size
    # the cache's ledger records the settings the pairs were built with
    built = splits_cache_metadata(tmp_path)
    assert {k: built[k] for k in ("completion_tokens", "max_length", "max_prompt_length", "truncation_mode")} == {
        "completion_tokens": "final_turn",
        "max_length": 48,
        "max_prompt_length": 24,
        "truncation_mode": "keep_end",
    }

    # the last 20% of the pairs that train are held out: cache row 9, the long one
    validation = splits.validation["prefs"].as_sync_dataset()
    train = splits.train(BatchSchedule(8)).as_sync_dataset()
    assert len(validation) == 1 and len(train.get_batch(range(7))) == 7

    example = validation[0]
    tokens, weight = example.chosen.tokens.array, example.chosen.loss_weight.array
    # position t carries the weight of token t + 1: every completion token after the cut prompt, then padding
    trained_positions = np.flatnonzero(weight) + 1
    assert trained_positions.tolist() == list(range(24, 24 + 8))
    assert tokens[0] == config.the_tokenizer.bos_token_id
    assert tokens[31] == config.the_tokenizer.eos_token_id and not tokens[32:].any()

    # every served pair has trained tokens on both sides, so no average log-prob is 0/0 (the e2e run takes the loss)
    for pair in [*train.get_batch(range(7)), example]:
        assert min(pair.chosen.loss_weight.array.sum(), pair.rejected.loss_weight.array.sum()) >= 1


def the_caches(tmp_path, split: str = "train") -> list:
    """The component's caches of ``split``, each under the key of its sources and settings, oldest first."""
    return sorted((tmp_path / "cache" / "prefs").glob(f"*/{split}"), key=lambda p: p.stat().st_mtime)


def the_cache(tmp_path, split: str = "train"):
    (cache,) = the_caches(tmp_path, split)
    return cache


def splits_cache_metadata(tmp_path) -> dict:
    ledger = json.loads((the_cache(tmp_path) / "shard_ledger.json").read_text())
    return ledger["metadata"]["preprocessor_metadata"]


def test_levanter_preference_chat_data_is_refused_with_the_fix(tmp_path):
    # its caches hold Levanter's masks with no prompt boundary, cuts or checks: not SimPO's |y|
    config = _config(tmp_path, _rows(), PreferenceChatLmDatasetFormat())
    with pytest.raises(ValueError, match="set `type: preference_prompt_completion`"):
        _splits(config, validation_split_fraction=None)


def test_pairs_longer_than_the_sequence_without_a_budget_stop_the_run_naming_them(tmp_path):
    config = _config(tmp_path, _rows(), PromptCompletionPreferenceFormat())
    with pytest.raises(
        ValueError, match=r"1 train prefs pairs are longer than the training sequence length 48 \(rows \[9\]"
    ):
        _splits(config, validation_split_fraction=None)


def test_a_budget_longer_than_the_sequence_is_refused(tmp_path):
    config = _config(tmp_path, _rows(), PromptCompletionPreferenceFormat(max_length=64))
    with pytest.raises(ValueError, match="max_length 64 is longer than the training sequence length 48"):
        _splits(config, validation_split_fraction=None)


def test_a_file_that_is_not_utf8_names_its_row(tmp_path):
    config = _config(tmp_path, _rows()[:3], PromptCompletionPreferenceFormat())
    data = tmp_path / "train.jsonl"
    data.write_bytes(data.read_bytes() + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(PreferenceRowError, match=r"train file .*train.jsonl, line 4: the line is not valid UTF-8"):
        _splits(config, validation_split_fraction=None)


def _ledger(cache) -> dict:
    return json.loads((cache / "shard_ledger.json").read_text())


def test_another_template_builds_its_own_cache_and_switching_back_reuses_it(tmp_path, caplog):
    config = _config(tmp_path, _rows()[:3], PromptCompletionPreferenceFormat())
    _splits(config, validation_split_fraction=None)
    first = the_cache(tmp_path)
    # Levanter would reuse the cache with a warning, training on the old template's tokens
    untrimmed = PromptCompletionPreferenceFormat(chat_template=LLAMA3_TEMPLATE.replace(" | trim", ""))
    component = dataclasses.replace(config.components["prefs"], format=untrimmed)
    changed = dataclasses.replace(config, components={"prefs": component})
    _splits(changed, validation_split_fraction=None)
    first_built, second = the_caches(tmp_path)
    assert first_built == first and _ledger(second)["metadata"]["preprocessor_metadata"]["chat_template"] != (
        _ledger(first)["metadata"]["preprocessor_metadata"]["chat_template"]
    )
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    with caplog.at_level(logging.INFO, logger=cache_identity.__name__):
        _splits(config, validation_split_fraction=None)
    assert f"Using the train cache of preference component 'prefs' at {first} (built from 1 source file" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == before  # reused as it was


def _swap_sides(row: dict) -> dict:
    return {**row, "chosen": row["rejected"], "rejected": row["chosen"]}


def test_other_files_with_the_same_cache_dir_build_their_own_cache_and_switching_back_reuses_it(tmp_path, caplog):
    """Issue 21, item 0: training on one's own file with the shipped cache_dir, then the shipped default, used to
    be refused ("built from other data ... Delete it to rebuild it") until the cache was deleted by hand."""
    config = _config(tmp_path, _rows()[:3], PromptCompletionPreferenceFormat(max_length=48))
    with caplog.at_level(logging.INFO, logger=cache_identity.__name__):
        splits = _splits(config, validation_split_fraction=None)
    shipped = the_cache(tmp_path)
    assert f"Built the train cache of preference component 'prefs' at {shipped} (built from 1 source file" in (
        caplog.text
    )
    assert splits.stats["train/prefs"].rows == 3
    # a copied config pointing at another file, with the same cache_dir
    other = tmp_path / "mine.jsonl"
    other.write_text("".join(json.dumps(row) + "\n" for row in _rows()[3:8]))
    component = config.components["prefs"]
    moved = dataclasses.replace(component, source=UrlDatasetSourceConfig(train_urls=[str(other)]))
    mine = dataclasses.replace(config, components={"prefs": moved})
    assert _splits(mine, validation_split_fraction=None).stats["train/prefs"].rows == 5
    first, beside = the_caches(tmp_path)
    assert first == shipped and beside.parent.parent == shipped.parent.parent
    # and back: the first cache, as it was
    before = {p: p.stat().st_mtime_ns for p in shipped.rglob("*")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=cache_identity.__name__):
        assert _splits(config, validation_split_fraction=None).stats["train/prefs"].rows == 3
    assert f"Using the train cache of preference component 'prefs' at {shipped} (built from 1 source file" in (
        caplog.text
    )
    assert {p: p.stat().st_mtime_ns for p in shipped.rglob("*")} == before
    assert len(the_caches(tmp_path)) == 2


@pytest.mark.parametrize("edit", ["shorter", "swapped"])
def test_a_source_edited_after_the_cache_was_built_gets_a_cache_of_its_own(tmp_path, edit):
    rows = _rows()[:4]
    config = _config(tmp_path, rows, PromptCompletionPreferenceFormat(max_length=48))
    _splits(config, validation_split_fraction=None)
    edited = rows[:2] if edit == "shorter" else [_swap_sides(r) for r in rows]  # swapping keeps the size
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in edited))
    splits = _splits(config, validation_split_fraction=None)
    old, new = the_caches(tmp_path)
    assert splits.stats["train/prefs"].rows == len(edited)
    assert json.loads((new / "source_identity.json").read_text()) != json.loads(
        (old / "source_identity.json").read_text()
    )


def test_a_cache_without_a_record_of_its_sources_is_never_trusted_or_relabelled(tmp_path, caplog):
    """Issue 21, item 1: a cache built before caches recorded their sources (no source_identity.json) was accepted
    after its file was edited, trained on the old tokens, and labelled with the edited file's digest."""
    rows = _rows()[:4]
    config = _config(tmp_path, rows, PromptCompletionPreferenceFormat(max_length=48))
    _splits(config, validation_split_fraction=None)
    keyed = the_cache(tmp_path)
    # where caches were before they were keyed, without a record, as such a cache was
    earlier = tmp_path / "cache" / "prefs" / "train"
    shutil.copytree(keyed, earlier)
    (earlier / "source_identity.json").unlink()
    # and the keyed one as a build stopped between finishing and recording its sources leaves it
    (keyed / "source_identity.json").unlink()
    with caplog.at_level(logging.INFO, logger=cache_identity.__name__):
        splits = _splits(config, validation_split_fraction=None)
    assert (
        f"Not using the train cache at {earlier}: it was built before caches were kept apart by their sources"
        in caplog.text
    )
    assert f"The train cache at {keyed} has no record of the sources it was built from" in caplog.text
    assert f"Built the train cache of preference component 'prefs' at {keyed}" in caplog.text
    assert splits.stats["train/prefs"].rows == 4
    assert not (earlier / "source_identity.json").exists()  # never labelled with today's sources
    assert (keyed / "source_identity.json").exists()
    # edited: the unrecorded cache is not read, whatever its location
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))
    assert _splits(config, validation_split_fraction=None).stats["train/prefs"].rows == 2
    assert not (earlier / "source_identity.json").exists()


def test_a_component_with_its_own_cache_dir_built_from_other_files_is_refused_naming_them(tmp_path):
    """A component that names its own cache_dir (as Marin's tokenized caches do) keeps it: another source there is
    refused, naming the files, rather than overwriting it."""
    config = _config(tmp_path, _rows()[:3], PromptCompletionPreferenceFormat(max_length=48))
    own = dataclasses.replace(config.components["prefs"], cache_dir=str(tmp_path / "own"))
    config = dataclasses.replace(config, components={"prefs": own})
    _splits(config, validation_split_fraction=None)
    assert (tmp_path / "own" / "train" / "source_identity.json").exists()
    other = tmp_path / "mine.jsonl"
    other.write_text("".join(json.dumps(row) + "\n" for row in _rows()[3:6]))
    moved = dataclasses.replace(own, source=UrlDatasetSourceConfig(train_urls=[str(other)]))
    with pytest.raises(
        ValueError, match=r"built from other data: .*train.jsonl is no longer a source; .*mine.jsonl is a new source"
    ):
        _splits(dataclasses.replace(config, components={"prefs": moved}), validation_split_fraction=None)


def test_an_unfinished_cache_is_built_again_not_reused(tmp_path):
    rows = _rows()[:4]
    config = _config(tmp_path, rows, PromptCompletionPreferenceFormat(max_length=48))
    _splits(config, validation_split_fraction=None)
    cache = the_cache(tmp_path)
    (cache / "shard_ledger.json").unlink()  # as if the build had stopped before finishing
    _splits(config, validation_split_fraction=None)
    # built again from the file, not resumed from the stale shard (read from disk)
    ledger = json.loads((cache / "shard_ledger.json").read_text())
    assert ledger["is_finished"] and ledger["total_num_rows"] == 4


def _packed(pairs, kept):
    return packed_pair_rows(pairs, kept, Pos, 8)


def _colour_components(tmp_path, blue_answer: str, **data_config) -> PreferenceLmDataConfig:
    """Two components of 40 pairs each, "reds" (answer "red .") and "blues" (answer ``blue_answer``)."""
    tokenizer_dir = tmp_path / "tokenizer"
    llama3_style_tokenizer(tokenizer_dir)
    components = {}
    for name, colour, answer in (("reds", "red", "red ."), ("blues", "blue", blue_answer)):
        rows = [preference_row(f"say {colour} {i} .", answer, "no .", prompt_id=f"{name}{i}") for i in range(40)]
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        source = UrlDatasetSourceConfig(train_urls=[str(data)])
        components[name] = DatasetComponent(source=source, format=PromptCompletionPreferenceFormat(max_length=48))
    return PreferenceLmDataConfig(
        tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path / "cache"), components=components, **data_config
    )


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_a_weighted_mixture_of_components_draws_pairs_by_weight(tmp_path, layout):
    # blue answers are longer: packed, a row holds fewer blue pairs than red ones
    config = _colour_components(tmp_path, "blue " * 8 + ".", train_weights={"reds": 0.75, "blues": 0.25})
    splits = _splits(config, validation_split_fraction=0.1, **({"rows_of": _packed} if layout == "packed" else {}))

    # statistics and held-out pairs per component
    assert splits.stats["train/reds"].pairs == splits.stats["train/blues"].pairs == 40
    assert set(splits.validation) == {"reds", "blues"}
    if layout == "packed":
        per_row = {name: rows.pairs_per_row.mean() for name, rows in splits.train_rows.items()}
        assert per_row["reds"] > 1.5 * per_row["blues"]  # so drawing rows by weight would not draw pairs by weight
    red = config.the_tokenizer.convert_tokens_to_ids("red")
    drawn = splits.train(BatchSchedule(8)).as_sync_dataset().get_batch(range(800))
    # a row's pairs all come from one component; its segments are its pairs
    segments = [np.asarray(row.chosen.attn_mask.segment_ids[0].array) for row in drawn]
    pairs = [np.unique(s[s >= 0]).size for s in segments]
    reds = sum(n for n, row in zip(pairs, drawn) if red in np.asarray(row.chosen.tokens.array))
    assert reds / sum(pairs) == pytest.approx(0.75, abs=0.05)


def test_staged_weights_start_at_steps_of_the_trainers_rows(tmp_path):
    stages = [(0, {"reds": 1.0, "blues": 0.0}), (10, {"reds": 0.0, "blues": 1.0})]
    config = _colour_components(tmp_path, "blue .", train_weights=stages, mixture_block_size=16)
    splits = _splits(config, validation_split_fraction=None, rows_of=_packed)
    # step 10 of 8 rows a step is row 80, not pair 80
    drawn = splits.train(BatchSchedule(8)).as_sync_dataset().get_batch(range(160))
    red = config.the_tokenizer.convert_tokens_to_ids("red")
    colours = ["red" if red in np.asarray(row.chosen.tokens.array) else "blue" for row in drawn]
    assert colours == ["red"] * 80 + ["blue"] * 80


def test_a_cache_damaged_after_it_was_built_is_built_again(tmp_path):
    rows = _rows()[:4]
    config = _config(tmp_path, rows, PromptCompletionPreferenceFormat(max_length=48))
    _splits(config, validation_split_fraction=None)
    cache = the_cache(tmp_path)
    recorded = json.loads((cache / "cache_contents.json").read_text())
    # opening the cache reads it without changing it: its files still match the record
    _splits(config, validation_split_fraction=None)
    assert cache_contents(fsspec.filesystem("file"), str(cache)) == recorded
    # overwrite bytes in the middle of a token chunk, keeping its size
    chunk = max(
        (p for p in cache.rglob("*") if p.is_file() and "chosen_input_ids" in str(p)), key=lambda p: p.stat().st_size
    )
    data = bytearray(chunk.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])
    chunk.write_bytes(bytes(data))
    damaged = str(chunk.relative_to(cache))
    assert cache_contents(fsspec.filesystem("file"), str(cache))[damaged] != recorded[damaged]
    _splits(config, validation_split_fraction=None)
    # built again from the sources: the chunk holds the first build's bytes again
    assert cache_contents(fsspec.filesystem("file"), str(cache))[damaged] == recorded[damaged]


def test_an_empty_data_file_is_named(tmp_path):
    """Issue 21, item 4: was ``cannot reshape array of size 0 into shape (0,newaxis)``, naming no file."""
    config = _config(tmp_path, [], PromptCompletionPreferenceFormat(max_length=48))
    assert (tmp_path / "train.jsonl").read_text() == ""
    with pytest.raises(ValueError) as error:
        _splits(config, validation_split_fraction=None)
    print(error.value)
    assert str(error.value) == (
        f"Preference component 'prefs' has no train rows: its train files ({tmp_path / 'train.jsonl'}) hold no "
        "preference row. Point it at the data, or remove the component or its weight"
    )


def test_an_empty_component_of_a_mixture_is_named(tmp_path):
    config = _colour_components(tmp_path, "blue .")
    (tmp_path / "blues.jsonl").write_text("")
    with pytest.raises(
        ValueError, match=r"^Preference component 'blues' has no train rows: its train files \(.*blues"
    ):
        _splits(config, validation_split_fraction=None)


_BUILDER = """
import json, logging, sys
import jax.random as jrandom
from haliax import Axis
from levanter.data.simpo.prompt_completion import PromptCompletionPreferenceFormat
from levanter.data.simpo.splits import build_preference_splits, padded_pair_rows
from levanter.data.text.datasets import DatasetComponent, UrlDatasetSourceConfig
from levanter.data.text.preference import PreferenceLmDataConfig

logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s", force=True)
tokenizer, cache_dir, data = sys.argv[1:4]
source = UrlDatasetSourceConfig(train_urls=[data])
component = DatasetComponent(source=source, format=PromptCompletionPreferenceFormat(max_length=48))
components = {"prefs": component}
config = PreferenceLmDataConfig(tokenizer=tokenizer, cache_dir=cache_dir, components=components, shuffle=False)
Pos = Axis("position", 48)
splits = build_preference_splits(
    config, lambda p, k: padded_pair_rows(p, k, Pos), seq_len=48, key=jrandom.PRNGKey(0),
    validation_split_fraction=None,
)
print("PAIRS", splits.stats["train/prefs"].pairs, flush=True)
"""


def _lock_written(locks) -> bool:
    """Whether a build lock under ``locks`` holds its holder's record (an instant after its creation)."""
    for lock in locks.glob("*/train.build_lock.json"):
        try:
            return "token" in json.loads(lock.read_text())
        except ValueError:
            return False
    return False


def _builder_command(tmp_path) -> list[str]:
    """A process that builds the train cache of 200 pairs under ``tmp_path/cache``, as a run's start does."""
    config = _config(
        tmp_path,
        [preference_row(f"count to {i} .", "one two .", "no .") for i in range(200)],
        PromptCompletionPreferenceFormat(),
    )
    script = tmp_path / "builder.py"
    script.write_text(_BUILDER)
    return [sys.executable, str(script), config.tokenizer, str(tmp_path / "cache"), str(tmp_path / "train.jsonl")]


def test_two_runs_building_one_new_cache_together_wait_for_each_other(tmp_path):
    """Issue 21, item 5: two runs sharing one new cache_dir, started together, both died: the second removed the
    first's build in progress as "never finished". The first is stopped (SIGSTOP) while it holds the build lock,
    the second starts and waits; the first goes on, builds, and both read the one cache."""
    args = _builder_command(tmp_path)
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    locks = tmp_path / "cache" / "prefs"
    with open(logs[0], "w") as log:
        first = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not _lock_written(locks):
            assert first.poll() is None and time.monotonic() < deadline, logs[0].read_text()
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # holding the lock, its build unfinished
        with open(logs[1], "w") as log:
            second = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            while "Waiting for the cache at" not in logs[1].read_text():
                assert second.poll() is None and time.monotonic() < deadline, logs[1].read_text()
                time.sleep(0.1)
            first.send_signal(signal.SIGCONT)
            assert first.wait(timeout=300) == 0, logs[0].read_text()
            assert second.wait(timeout=300) == 0, logs[1].read_text()
        finally:
            second.kill()
    finally:
        first.send_signal(signal.SIGCONT)
        first.kill()
    outputs = [log.read_text() for log in logs]
    cache = the_cache(tmp_path)
    lock = cache.parent / "train.build_lock.json"
    assert f"Waiting for the cache at {cache}: another process is building it (host and pid in {lock}: host " in (
        outputs[1]
    )
    assert f"pid {first.pid} " in outputs[1]
    assert f"Built the train cache of preference component 'prefs' at {cache}" in outputs[0]
    assert f"Using the train cache of preference component 'prefs' at {cache}" in outputs[1]
    assert "never finished" not in outputs[0] + outputs[1]
    assert all("PAIRS 200" in output for output in outputs)
    assert not lock.exists()  # released


def test_a_build_lock_left_by_a_killed_builder_is_taken_over(tmp_path):
    """A builder killed (SIGKILL) while holding the lock leaves it behind: the next run takes it over at once (its
    holder is a dead process on this host) and builds, removing the unfinished cache."""
    args = _builder_command(tmp_path)
    locks = tmp_path / "cache" / "prefs"
    killed = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not _lock_written(locks):
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    killed.kill()
    killed.wait()
    (lock,) = locks.glob("*/train.build_lock.json")
    done = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert f"taking over the stale lease {lock} of host " in output and f"pid {killed.pid} (that process is gone)" in (
        output
    )
    assert "PAIRS 200" in output and not lock.exists()
