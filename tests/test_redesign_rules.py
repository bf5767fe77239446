"""The families redesign preserved behaviour: for every stored input, the planner's rules equal, rule for rule,
the rules the stage-major planner produced before it (``tests/fixtures/rules_before_redesign.json``, recorded from
mapgen 852a0a9 + the spelling tables, through the schema-1 layouts the inputs were stored as).

Fields compared: family, Megatron pattern, HF patterns, op, sharding, domain, experts, options (comments are
prose and may be reworded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mapgen.emit.pipeline import parse_input
from mapgen.plan.planner import plan

REPO = Path(__file__).resolve().parents[1]
BEFORE = json.loads((REPO / "tests" / "fixtures" / "rules_before_redesign.json").read_text())
INPUTS = REPO / "generated" / "inputs"


def _row(rule: object) -> list[object]:
    d = {f: getattr(rule, f) for f in ("family", "megatron", "hf", "op", "sharding", "domain", "experts", "options")}
    return json.loads(json.dumps(list(d.values())))


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_rules_equal_the_pre_redesign_rules(name: str) -> None:
    layout = parse_input(name, (INPUTS / f"{name}.json").read_text())
    assert [_row(r) for r in plan(layout).rules] == BEFORE[name]


def test_every_pre_redesign_input_is_still_stored() -> None:
    """Inputs added after the redesign (phi-4, internlm2) have no "before"; none of the old ones was dropped."""
    assert set(BEFORE) <= {p.stem for p in INPUTS.glob("*.json")}
