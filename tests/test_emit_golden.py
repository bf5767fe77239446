"""Golden cases for the renderer: ``tests/cases/emit/<case>/`` (inputs, optional hand plans, expected tree).

Regenerate after an intended change with ``.venv/bin/python -m tests.regen_emit_goldens`` and review
``git diff tests/cases/emit``. Every expected tree must also pass ``ruff check`` and ``mypy --strict`` and
import cleanly, and its modules must agree with the plans they came from.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from emit_support import CASES, REPO, import_tree
from regen_emit_goldens import BUILDERS, load_case, render_case

from mapgen.emit.check import compare
from mapgen.plan.recipe import model_spec_for_plan
from mapgen.runtime.bridge import Bridge, HFConfig

CASE_NAMES = sorted(p.name for p in CASES.iterdir() if (p / "expected").is_dir())
REGEN = ".venv/bin/python -m tests.regen_emit_goldens"


def test_every_builder_has_a_case() -> None:
    assert sorted(BUILDERS) == CASE_NAMES


@pytest.mark.parametrize("case", CASE_NAMES)
def test_golden(case: str) -> None:
    drift = compare(render_case(CASES / case), CASES / case / "expected")
    assert drift.clean, drift.render(f"tests/cases/emit/{case}/expected", f"{REGEN} {case}")


@pytest.mark.parametrize("case", CASE_NAMES)
def test_golden_modules_agree_with_their_plans(case: str) -> None:
    inputs, plans = load_case(CASES / case)
    with import_tree(CASES / case / "expected") as package:
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
            if case != "injection":  # the hostile plan asks the config for keys that do not exist
                hf = HFConfig(inputs[name].config)
                assert bridge.megatron_config(hf, inputs[name]) == model_spec_for_plan(plan, hf, inputs[name])


@pytest.mark.slow
def test_golden_trees_pass_ruff_and_mypy(tmp_path: Path) -> None:
    packages = []
    for case in CASE_NAMES:
        dest = tmp_path / f"golden_{case}"
        dest.mkdir()
        for src in (CASES / case / "expected").glob("*.py"):
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
