"""Regenerate the scan golden cases: ``.venv/bin/python -m tests.regen_goldens`` (from the repo root).

For each case in tests/fixtures/corpus/ and the two hub fixtures, writes
``tests/cases/scan/<case>/expected_layout.json`` (the IR, as ``mapgen scan --json`` writes it) and
``expected_summary.json`` (the stable summary). ``tests/test_scan_golden.py`` fails when these differ from a
fresh scan; review the diff (``git diff tests/cases/scan``) before committing regenerated goldens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scan_support import ALL_CASES, GOLDEN, case_dir

from mapgen.infer import scan
from mapgen.ir import layout_to_json, to_jsonable


def render_case(case: str) -> dict[str, str]:
    layout = scan(str(case_dir(case)))
    return {
        "expected_layout.json": layout_to_json(layout),
        "expected_summary.json": json.dumps(to_jsonable(layout.summary), indent=2, sort_keys=True) + "\n",
    }


def main() -> None:
    for case in ALL_CASES:
        out = GOLDEN / case
        out.mkdir(parents=True, exist_ok=True)
        for name, text in render_case(case).items():
            (out / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {out.relative_to(GOLDEN.parent.parent.parent)}")


if __name__ == "__main__":
    main()
