"""Regenerate the emit golden cases: ``.venv/bin/python -m tests.regen_emit_goldens`` (from the repo root).

Each case is a folder ``tests/cases/emit/<case>/`` with

* ``inputs/<name>.json``  layouts (as ``mapgen scan --json`` writes them) -- the case's source of truth;
* ``plans/<name>.json``   optional hand-written plans; inputs without one are planned by ``mapgen.plan.planner``;
* ``expected/``           the whole rendered ``generated/`` tree.

By default only ``expected/`` is rewritten. ``--inputs`` also rewrites ``inputs/`` and ``plans/`` from the
builders in ``tests/emit_support.py`` and from the scan goldens (``tests/cases/scan/*/expected_layout.json``).
``tests/test_emit_golden.py`` fails when ``expected/`` differs from a fresh render; review
``git diff tests/cases/emit`` before committing regenerated goldens.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import emit_support as es

from mapgen.emit.render import render
from mapgen.ir import Layout, layout_from_json, layout_to_json
from mapgen.plan.plan import BridgePlan

SCAN_CASES = Path(__file__).resolve().parent / "cases" / "scan"
# Real corpus checkpoints whose layouts the planner supports (scan goldens -> one registry).
CORPUS = (
    "llama-3.2-3b-instruct",
    "mimo-7b",
    "mixtral-8x7b-instruct-v0.1",
    "qwen3-1.7b-mlx-bf16",
    "qwen3-vl-30b-a3b",
    "qwen3.5-25b-reap-a3b-coding",
    "sakura-14b-qwen2.5",
)


def _corpus() -> tuple[dict[str, Layout], dict[str, BridgePlan]]:
    layouts = {
        name: layout_from_json((SCAN_CASES / name / "expected_layout.json").read_text(encoding="utf-8"))
        for name in CORPUS
    }
    return layouts, {}


# case -> builder of (inputs, hand plans)
BUILDERS: dict[str, Callable[[], tuple[dict[str, Layout], dict[str, BridgePlan]]]] = {
    "qwen3_dense_handplan": lambda: (
        {"qwen3-8b": es.qwen3_dense_layout()},
        {"qwen3-8b": es.qwen3_dense_plan()},
    ),
    "qwen3_dense_two_inputs": lambda: (
        {"qwen3-8b": es.qwen3_dense_layout(4), "qwen3-0.6b": es.qwen3_dense_layout(2)},
        {},
    ),
    "qwen3_5_moe_hybrid": lambda: ({"qwen3.5-moe-tiny": es.qwen3_5_moe_layout()}, {}),
    "injection": lambda: ({"evil": es.evil_layout()}, {"evil": es.evil_plan()}),
    "corpus": _corpus,
}


def load_case(case_dir: Path) -> tuple[dict[str, Layout], dict[str, BridgePlan]]:
    """The case's inputs and plans (hand-written where present, else from the planner)."""
    from mapgen.plan.planner import plan

    inputs = {
        p.stem: layout_from_json(p.read_text(encoding="utf-8"))
        for p in sorted((case_dir / "inputs").glob("*.json"))
    }
    plans = {}
    for name, layout in inputs.items():
        hand = case_dir / "plans" / f"{name}.json"
        plans[name] = es.plan_from_json(hand.read_text(encoding="utf-8")) if hand.is_file() else plan(layout)
    return inputs, plans


def render_case(case_dir: Path) -> dict[str, str]:
    inputs, plans = load_case(case_dir)
    return render(plans, inputs)


def _write(root: Path, files: dict[str, str]) -> None:
    shutil.rmtree(root, ignore_errors=True)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))


def write_inputs(case: str) -> None:
    layouts, plans = BUILDERS[case]()
    case_dir = es.CASES / case
    _write(case_dir / "inputs", {f"{n}.json": layout_to_json(layout) for n, layout in layouts.items()})
    if plans:
        _write(case_dir / "plans", {f"{n}.json": es.plan_to_json(p) for n, p in plans.items()})
    else:
        shutil.rmtree(case_dir / "plans", ignore_errors=True)


def main(argv: list[str]) -> int:
    with_inputs = "--inputs" in argv
    cases = [a for a in argv if not a.startswith("-")] or sorted(BUILDERS)
    for case in cases:
        if with_inputs:
            write_inputs(case)
        case_dir = es.CASES / case
        _write(case_dir / "expected", render_case(case_dir))
        print(f"wrote {case_dir.relative_to(es.REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
