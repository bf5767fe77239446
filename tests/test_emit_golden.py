"""Emit goldens: ``tests/cases/<case>/`` with ``"builder"`` in its case.json holds inputs, optional hand plans and
the expected rendered tree. Regenerate every golden with ``.venv/bin/python -m tests.regen`` and review the diff.
Every expected tree must also pass ``ruff check`` and ``mypy --strict`` and import cleanly, and its modules must
agree with the plans they came from. (The corpus layouts' emit golden is ``generated/`` itself: ``mapgen check``.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from emit_support import REPO, import_tree
from regen import BUILDERS, COMMAND, NOTE, Case, emit_cases, load_emit_case, render_emit_case

from mapgen.contract import Bridge, HFConfig
from mapgen.contract.config import model_spec
from mapgen.emit.check import compare

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
            assert bridge.rules == plan.rules  # the tables flatten to the planned rules, rule for rule, in order
            if case.name != "injection":  # the hostile plan asks the config for keys that do not exist
                hf = HFConfig(inputs[name].config)
                assert bridge.megatron_config(hf, inputs[name]) == model_spec(hf, inputs[name], plan.facts)


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


def test_repo_bridges_equal_the_plans_of_every_stored_input() -> None:
    """The committed generated/ tree: every stored input resolves through the registry to the bridge of its
    fingerprint, whose tables flatten to exactly the rules the planner produces (rule for rule, in order:
    names, op, sharding, domain, experts, options) and whose megatron_config is the config table on the
    plan's facts (what the proof used)."""
    import mapgen_bridges as generated

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
