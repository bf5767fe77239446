"""Emit goldens: ``tests/cases/<case>/`` with ``"builder"`` in its case.json holds inputs, optional hand plans and
the expected rendered tree. Regenerate every golden with ``.venv/bin/python -m tests.regen`` and review the diff.
Every expected tree must also pass ``ruff check`` and ``mypy --strict`` and import cleanly, and its modules must
agree with the plans they came from. (The corpus layouts' emit golden is ``generated/`` itself: ``mapgen check``.)
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from emit_support import REPO, import_tree
from regen import BUILDERS, COMMAND, NOTE, Case, emit_cases, load_emit_case, render_emit_case

from mapgen.emit.check import compare
from mapgen.plan.recipe import model_spec_for_plan
from mapgen.runtime.bridge import Bridge, HFConfig

CASES = emit_cases()


def test_every_builder_has_a_case() -> None:
    assert sorted(BUILDERS) == sorted(c.builder for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden(case: Case) -> None:
    drift = compare(render_emit_case(*load_emit_case(case.folder)), case.folder / "expected")
    assert drift.clean, drift.render(f"tests/cases/{case.name}/expected", COMMAND, note=NOTE)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden_modules_agree_with_their_plans(case: Case) -> None:
    inputs, plans = load_emit_case(case.folder)
    with import_tree(case.folder / "expected") as package:
        for name, plan in plans.items():
            bridge = package.get_bridge(plan.fingerprint)
            assert isinstance(bridge, Bridge)
            assert bridge.fingerprint == plan.fingerprint
            assert bridge.model_type == plan.model_type
            # Same rules (comments live in the module as '#' lines); sections regroup but never reorder a family.
            expected = [dataclasses.replace(r, comment="") for r in plan.rules]
            assert sorted(map(repr, bridge.rules)) == sorted(map(repr, expected))
            for family in {r.family for r in expected}:
                assert [r for r in bridge.rules if r.family == family] == [r for r in expected if r.family == family]
            if case.name != "injection":  # the hostile plan asks the config for keys that do not exist
                hf = HFConfig(inputs[name].config)
                assert bridge.megatron_config(hf, inputs[name]) == model_spec_for_plan(plan, hf, inputs[name])


@pytest.mark.slow
def test_golden_trees_pass_ruff_and_mypy(tmp_path: Path) -> None:
    packages = []
    for case in CASES:
        dest = tmp_path / f"golden_{case.name}"
        dest.mkdir()
        for src in (case.folder / "expected").glob("*.py"):
            dest.joinpath(src.name).write_bytes(src.read_bytes())
        packages.append(str(dest))
    ruff = subprocess.run(
        [str(REPO / ".venv/bin/ruff"), "check", "--no-cache", "--config", str(REPO / "pyproject.toml"), *packages],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr
    mypy = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--follow-imports=silent",
         "--config-file", str(REPO / "pyproject.toml"), *packages],
        capture_output=True, text=True, cwd=tmp_path, check=False, env={"MYPYPATH": str(REPO), "PATH": ""},
    )
    assert mypy.returncode == 0, mypy.stdout + mypy.stderr


def test_repo_generated_modules_agree_with_the_recipe_on_every_stored_input() -> None:
    """The committed generated/ tree: every stored input resolves through the registry to a bridge whose
    megatron_config equals the plan's recipe evaluated in Python (what the proof used)."""
    import mapgen_bridges as generated

    from mapgen.cli.emit import load_stored_inputs
    from mapgen.plan.planner import plan

    inputs = load_stored_inputs(REPO / "generated")
    assert {m for m, _ in generated.BRIDGES.values()} == {plan(layout).module_name for layout in inputs.values()}
    for layout in inputs.values():
        p = plan(layout)
        bridge = generated.get_bridge(p.fingerprint, layout=layout)
        hf = HFConfig(layout.config)
        assert bridge.megatron_config(hf, layout) == model_spec_for_plan(p, hf, layout)
