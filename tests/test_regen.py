"""``.venv/bin/python -m tests.regen`` is the one command that regenerates every golden (scan cases, emit cases,
generated/). CI fails if running it would leave a diff, or if tests/cases/ holds a folder that is not a case."""

from __future__ import annotations

import json

from regen import CASES, COMMAND, GENERATED, NOTE, REPO, cases, drifts, expected_trees, main


def test_regen_would_leave_no_diff() -> None:
    found = drifts(expected_trees())
    report = "\n\n".join(d.render(p.relative_to(REPO).as_posix(), COMMAND, note=NOTE) for p, d in found.items())
    assert not found, report


def test_every_case_folder_is_described() -> None:
    for c in cases():
        data = json.loads((c.folder / "case.json").read_text())
        assert set(data) <= {"source", "input", "builder"}, c
        assert bool(c.source) != bool(c.builder), c
        assert not c.input or (GENERATED / "inputs" / f"{c.input}.json").is_file(), c
    assert sorted(p.name for p in CASES.iterdir() if p.is_dir()) == sorted(c.name for c in cases())


def test_check_mode_is_clean() -> None:
    assert main(["--check"]) == 0
