# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""A JSON-lines source line that Levanter's reader cannot read fails the real cache build with one short error
naming its file and 1-based line."""

import gzip

import pytest
from simpo_tiny_run import REPO

from levanter.data.simpo.prompt_completion import PromptCompletionPreferenceFormat
from levanter.data.simpo.rows import PreferenceRowError
from levanter.data.simpo.sources import build_caches_naming_bad_lines, first_bad_source_line
from levanter.data.text.datasets import DatasetComponent, UrlDatasetSourceConfig
from levanter.data.text.preference import PreferenceLmDataConfig

SHIPPED = REPO / "lib/levanter/data/tiny_simpo/train.jsonl"


def _lines(n: int) -> list[bytes]:
    return SHIPPED.read_bytes().splitlines(keepends=True)[:n]


def _config(tmp_path, *urls) -> PreferenceLmDataConfig:
    return PreferenceLmDataConfig(
        tokenizer=str(REPO / "lib/levanter/data/tiny_simpo/tokenizer"),
        cache_dir=str(tmp_path / "cache"),
        components={
            "tiny": DatasetComponent(
                source=UrlDatasetSourceConfig(train_urls=[str(u) for u in urls]),
                format=PromptCompletionPreferenceFormat(),
            )
        },
    )


def test_a_malformed_json_line_fails_naming_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"".join(_lines(20)))
    lines = _lines(100)
    lines[50] = lines[50][:40] + b"\n"  # line 51 cut short, as a truncated write leaves it
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(lines))
    config = _config(tmp_path, good, bad)
    assert first_bad_source_line(_config(tmp_path, good), "train") is None

    expected = f"train file {bad}, line 51: the line is not valid JSON (Unterminated string starting at: column 11)"
    assert first_bad_source_line(config, "train") == (str(bad), 51, expected.split(": ", 1)[1])
    with pytest.raises(PreferenceRowError) as raised:
        build_caches_naming_bad_lines(config, "train")
    assert str(raised.value) == expected
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_a_gzipped_source_that_is_not_utf8_names_its_line(tmp_path):
    lines = _lines(30)
    lines[6] = lines[6].replace(b"the", b"th\xe9", 1)  # Latin-1 where UTF-8 is expected
    assert b"\xe9" in lines[6]
    source = tmp_path / "train.jsonl.gz"
    source.write_bytes(gzip.compress(b"".join(lines)))
    config = _config(tmp_path, source)

    with pytest.raises(PreferenceRowError) as raised:
        build_caches_naming_bad_lines(config, "train")
    column = lines[6].index(b"\xe9")
    assert str(raised.value) == (
        f"train file {source}, line 7: the line is not valid UTF-8 (invalid continuation byte at byte {column})"
    )


def test_lines_are_counted_as_the_reader_counts_them(tmp_path):
    # Levanter reads in text mode: a lone carriage return ends a line as a newline does
    source = tmp_path / "train.jsonl"
    source.write_bytes(b'{"a": 1}\r\n{"b": 2}\r{"c": \n{"d": 4}\n')
    assert first_bad_source_line(_config(tmp_path, source), "train") == (
        str(source),
        3,
        "the line is not valid JSON (Expecting value: column 7)",
    )
