"""Scan goldens: a fresh scan of every scan case's checkpoint reproduces ``tests/cases/<case>/`` (its summary and
its layout: ``layout.json`` there, or the stored input ``generated/inputs/<input>.json`` for a case mapgen ships a
bridge for). Regenerate every golden with ``.venv/bin/python -m tests.regen`` and review the diff."""

from __future__ import annotations

import pytest
from regen import COMMAND, REPO, Case, render_scan_case, scan_cases
from scan_support import CORPUS, HUB_FIXTURES, LAYOUT_FIXTURES


@pytest.mark.parametrize("case", scan_cases(), ids=lambda c: c.name)
def test_golden(case: Case) -> None:
    for path, text in render_scan_case(case).items():
        rel = path.relative_to(REPO)
        assert path.exists(), f"missing golden {rel}; run: {COMMAND}"
        assert path.read_text(encoding="utf-8") == text, f"{rel} differs from a fresh scan; if intended run: {COMMAND}"


def test_every_fixture_checkpoint_is_a_case() -> None:
    fixtures = {p.relative_to(REPO).as_posix() for root in (CORPUS, HUB_FIXTURES, LAYOUT_FIXTURES)
                for p in root.iterdir() if (p / "config.json").is_file()}
    assert {c.source for c in scan_cases()} == fixtures


def test_emitted_cases_are_stored_inputs_and_the_rest_keep_their_layout() -> None:
    for c in scan_cases():
        assert c.expected_layout.is_file(), c
        assert (c.folder / "layout.json").is_file() == (not c.input), c
