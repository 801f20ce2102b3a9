"""docs/reliability.md claims only what a test shows: every row of its table names a test, and every
test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rows(text: str) -> list[list[str]]:
    rows = [line.strip().strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return [r for r in rows[1:] if not set(r[0]) <= {"-", " "}]  # without the header and the rule


def _named_tests(cell: str) -> list[tuple[str, str]]:
    """(file, test) pairs of a cell: `test_x.py::name`, and `::name` for the file named before it."""
    pairs, current = [], None
    for file, name in re.findall(r"`(?:(test_\w+\.py)(?:::)?)?(?:::)?(test_\w+)?", cell):
        current = file or current
        if name and current:
            pairs.append((current, name))
    return pairs


def test_every_reliability_row_names_tests_that_exist():
    rows = _rows((REPO / "docs" / "reliability.md").read_text())
    assert len(rows) > 20
    missing = []
    for case, _what, tests in (r[:3] for r in rows):
        named = _named_tests(tests)
        if not named and tests.strip() != "same" and "test_" not in tests:
            missing.append(f"{case}: names no test")
        for file, name in named:
            source = REPO / "tests" / file
            if not source.is_file() or not re.search(rf"^def {name}\w*\(", source.read_text(), re.M):
                missing.append(f"{case}: {file}::{name} does not exist")
    assert missing == []
