"""Golden cases for the renderer: ``tests/cases/emit/<case>/`` (inputs, optional hand plans, expected tree).

Regenerate after an intended change with ``.venv/bin/python -m tests.regen_emit_goldens`` and review
``git diff tests/cases/emit``. Every expected tree must also pass ``ruff check`` and ``mypy --strict`` and
import cleanly, and its modules must agree with the plans they came from.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from emit_support import CASES, REPO, import_tree
from regen_emit_goldens import BUILDERS, load_case, render_case

from mapgen.contract import Bridge, HFConfig
from mapgen.contract.config import model_spec
from mapgen.emit.check import compare

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
            assert bridge.rules == plan.rules  # the tables flatten to the planned rules, rule for rule, in order
            if case != "injection":  # the hostile plan asks the config for keys that do not exist
                hf = HFConfig(inputs[name].config)
                assert bridge.megatron_config(hf, inputs[name]) == model_spec(hf, inputs[name], plan.facts)


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


def test_repo_bridges_equal_the_plans_of_every_stored_input() -> None:
    """The committed generated/ tree: every stored input resolves through the registry to the bridge of its
    fingerprint, whose tables flatten to exactly the rules the planner produces (rule for rule, in order:
    names, op, sharding, domain, experts, options) and whose megatron_config is the config table on the
    plan's facts (what the proof used)."""
    import generated
    from mapgen.cli.emit import load_stored_inputs
    from mapgen.plan.planner import plan

    inputs = load_stored_inputs(REPO / "generated")
    plans = {name: plan(layout) for name, layout in inputs.items()}
    assert {p.fingerprint: (p.module_name, f"BRIDGE_{p.fingerprint}") for p in plans.values()} == generated.BRIDGES
    for name, layout in inputs.items():
        p = plans[name]
        bridge = generated.get_bridge(p.fingerprint, layout=layout)
        assert (bridge.fingerprint, bridge.model_type, bridge.facts) == (p.fingerprint, p.model_type, p.facts)
        assert len(bridge.rules) == len(p.rules)
        for got, want in zip(bridge.rules, p.rules, strict=True):
            assert (got.megatron, got.hf, got.op, got.sharding, got.domain, got.experts, got.options) == (
                want.megatron, want.hf, want.op, want.sharding, want.domain, want.experts, want.options), name
        assert bridge.rules == p.rules
        hf = HFConfig(layout.config)
        assert bridge.megatron_config(hf, layout) == model_spec(hf, layout, p.facts)
