# Copyright The Levanter Authors
# SPDX-License-Identifier: Apache-2.0
"""Every test the docs name exists: each test file they mention (``test_*.py``, with or without its path) is under
``lib/*/tests``, and each test function they name is defined in the file the docs give for it.

The docs give a test's file as ``file.py::name``; as a file in parentheses right after the name, or after a list of
names separated by commas (a semicolon ends the list); or, for the rows of a table, in the sentence before it:
"Tests are in <file> unless named otherwise". A test named with no file must be defined in some test file. Test
names are read from backticks (a parametrized case's ``[id]`` left out), so a ``test_`` word in prose is not one;
``NOT_TESTS`` lists the backticked names that are not tests."""

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DOCS = sorted(
    {
        REPO / "README.md",
        REPO / "SIMPO.md",
        REPO / "DPO.md",
        *(REPO / "docs").glob("*.md"),
        *(REPO / "lib").glob("**/README.md"),
    }
)
TEST_FILES = sorted(REPO.glob("lib/*/tests/**/test_*.py"))
NOT_TESTS = {"test_prefs"}  # UltraFeedback's held-out split (the 8B recipe's validation file), not a test

_PATH = r"(?:[\w.-]+/)*test_\w+\.py"
FILE = re.compile(rf"(?<![\w/.-])({_PATH})\b")
FILE_AND_NAME = re.compile(rf"({_PATH})::(test_\w+)")
NAME = re.compile(r"`(test_\w+)(?:\[[^\]`]*\])?`")
_NAME = r"`test_\w+(?:\[[^\]`]*\])?`"
# what may follow a name before the file it belongs to: more names, then the file in parentheses
FILE_AFTER = re.compile(rf"(?:\s*(?:,|and|or)?\s*{_NAME})*\s*\(`({_PATH})`\)")
TABLE_FILE = re.compile(rf"[Tt]ests\s+are\s+in\s+`({_PATH})`\s+unless\s+named\s+otherwise")


@dataclass(frozen=True)
class Mention:
    where: str
    file: str | None
    name: str | None


def mentions(text: str, where: str) -> list[Mention]:
    """The test files and test functions ``text`` names, each function with the file the text gives for it."""
    found = []
    table_file = None
    paragraph = ""  # the sentence that gives a table's file may wrap
    for number, line in enumerate(text.splitlines(), start=1):
        here = f"{where}:{number}"
        if line.startswith("#"):
            table_file = None
        if line.startswith(("#", "|")) or not line.strip():
            paragraph = ""
        else:
            paragraph += " " + line
            if default := TABLE_FILE.search(paragraph):
                table_file = default[1]
        found += [Mention(here, path, None) for path in FILE.findall(line)]
        found += [Mention(here, path, name) for path, name in FILE_AND_NAME.findall(line)]
        for match in NAME.finditer(line):
            if match[1] in NOT_TESTS:
                continue
            after = FILE_AFTER.match(line, match.end())
            file = after[1] if after else table_file if line.startswith("|") else None
            found.append(Mention(here, file, match[1]))
    return found


def _test_files(path: str) -> list[Path]:
    return [p for p in TEST_FILES if f"/{p.relative_to(REPO).as_posix()}".endswith(f"/{path}")]


def _defines(file: Path, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def {name}\(", file.read_text(), re.MULTILINE) is not None


def problems(found: list[Mention]) -> list[str]:
    """What the mentions get wrong: files that are not test files here, tests not defined where named."""
    wrong = []
    for m in found:
        files = _test_files(m.file) if m.file is not None else TEST_FILES
        if m.file is not None and not files:
            wrong.append(f"{m.where}: {m.file} is not a test file under lib/*/tests")
        elif m.name is not None and not any(_defines(f, m.name) for f in files):
            defined_in = [f.name for f in TEST_FILES if _defines(f, m.name)]
            place = m.file or "any test file"
            wrong.append(f"{m.where}: {m.name} is not defined in {place} (defined in: {defined_in or 'none'})")
    return wrong


def test_the_docs_are_scanned():
    names = {d.relative_to(REPO).as_posix() for d in DOCS}
    assert {"README.md", "SIMPO.md", "DPO.md", "lib/levanter/bench/README.md"} <= names, names
    assert len(TEST_FILES) > 10, TEST_FILES


def test_every_test_the_docs_name_exists_where_they_say():
    found = [m for doc in DOCS for m in mentions(doc.read_text(), doc.relative_to(REPO).as_posix())]
    assert sum(m.name is not None for m in found) > 20, "the docs name tests; the scan found few"
    wrong = problems(found)
    assert not wrong, "the docs name tests that do not exist there:\n" + "\n".join(wrong)


def test_a_wrong_name_or_file_is_caught():
    # so the check above can fail: a misspelt test, a test tied to the wrong file, a file that is not there
    text = "\n".join(
        [
            "Tests are in `lib/levanter/tests/test_simpo_lifecycle.py` unless named otherwise.",
            "",
            "| case | test |",
            "| --- | --- |",
            "| a | `test_the_final_hf_export_is_written_once` |",
            "| b | `test_impossible_loss_settings` |",
            "| c | `test_impossible_loss_settings` (`test_preference_bad_inputs.py`) |",
            "",
            "`test_no_such_test_anywhere`, `test_simpo_loss.py::test_the_final_hf_export_is_written_once`,"
            " `test_no_such_file.py`",
        ]
    )
    wrong = problems(mentions(text, "doc"))
    assert len(wrong) == 4, wrong
    assert wrong[0].startswith("doc:6: test_impossible_loss_settings is not defined in lib/levanter/tests/"), wrong
    assert "test_preference_bad_inputs.py" in wrong[0], wrong
    assert any("test_no_such_test_anywhere is not defined in any test file" in w for w in wrong), wrong
    assert any("test_the_final_hf_export_is_written_once is not defined in test_simpo_loss.py" in w for w in wrong)
    assert any("test_no_such_file.py is not a test file" in w for w in wrong), wrong
