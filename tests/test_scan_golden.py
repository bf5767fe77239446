"""Golden cases: a fresh scan of every fixture must reproduce tests/cases/scan/<case>/ byte for byte.

Regenerate with ``.venv/bin/python -m tests.regen_goldens`` and review the diff.
"""

from __future__ import annotations

import pytest
from regen_goldens import render_case
from scan_support import ALL_CASES, GOLDEN


@pytest.mark.parametrize("case", ALL_CASES)
def test_golden(case: str) -> None:
    for name, text in render_case(case).items():
        path = GOLDEN / case / name
        assert path.exists(), f"missing golden {path}; run: .venv/bin/python -m tests.regen_goldens"
        assert path.read_text(encoding="utf-8") == text, (
            f"{case}/{name} differs from a fresh scan; if intended run: .venv/bin/python -m tests.regen_goldens"
        )


def test_no_orphan_golden_cases() -> None:
    assert sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) == sorted(ALL_CASES)
