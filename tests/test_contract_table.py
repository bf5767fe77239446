"""The table language of generated bridges: typed ops flatten to exactly the Rule the planner writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from emit_support import qwen3_5_moe_layout, qwen3_dense_layout

from mapgen.cli.emit import load_stored_inputs
from mapgen.contract import Bridge, Facts, Group, Rule, copy, experts_fc1, op, qkv
from mapgen.contract.expand import domain_index, plan_instances
from mapgen.contract.table import CONSTRUCTORS, flatten
from mapgen.emit.tables import build, op_node
from mapgen.plan.planner import plan

REPO = Path(__file__).resolve().parents[1]


def test_a_group_flattens_to_rules() -> None:
    rows = (
        ("input_layernorm.weight", "input_layernorm.weight", copy()),
        ("self_attention.linear_qkv.weight", ("q.weight", "k.weight", "v.weight"), qkv(output_gate=True)),
        ("mlp.experts.local_experts.{expert}.linear_fc1.weight", "mlp.experts.gate_up_proj",
         experts_fc1("packed", orientation="in_out", interleave=False)),
    )
    rules = flatten((Group("decoder:a", "decoder.layers.{layer}.", "model.layers.{layer}.", rows),))
    assert rules == (
        Rule("", "decoder.layers.{layer}.input_layernorm.weight", ("model.layers.{layer}.input_layernorm.weight",),
             "copy", "replicated", domain="decoder:a"),
        Rule("", "decoder.layers.{layer}.self_attention.linear_qkv.weight",
             ("model.layers.{layer}.q.weight", "model.layers.{layer}.k.weight", "model.layers.{layer}.v.weight"),
             "qkv", "qkv_groups", domain="decoder:a", options=(("output_gate", True), ("part", "weight"))),
        Rule("", "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight",
             ("model.layers.{layer}.mlp.experts.gate_up_proj",), "expert_fc1", "expert_gated_column",
             domain="decoder:a", experts=True,
             options=(("interleave", False), ("layout", "packed"), ("orientation", "in_out"))),
    )


def test_rules_compare_without_their_labels() -> None:
    rule = Rule("attention.o", "m", ("h",), "copy", "row", comment="Output projection.")
    assert rule == dataclasses.replace(rule, family="", comment="")
    assert rule != dataclasses.replace(rule, sharding="column")


def test_every_op_has_a_constructor() -> None:
    import typing

    from mapgen.contract.rules import Op

    assert set(CONSTRUCTORS) == set(typing.get_args(Op))
    for name, fn in CONSTRUCTORS.items():
        assert fn().op == name


@pytest.mark.parametrize("path", sorted(REPO.glob("generated/inputs/*.json")), ids=lambda p: p.stem)
def test_every_planned_rule_has_its_typed_spelling(path: Path) -> None:
    """The committed layouts never need the general op(...) form."""
    layout = load_stored_inputs(REPO / "generated")[path.stem]
    for rule in plan(layout).rules:
        assert op_node(rule).func[0] != "op", rule  # type: ignore[union-attr]


def test_general_form_round_trips() -> None:
    spec = op("copy", "row", experts=True, options=(("x", 1),))
    assert (spec.op, spec.sharding, spec.experts, spec.options) == ("copy", "row", True, (("x", 1),))


def test_tables_share_blocks_across_groups_and_bridges() -> None:
    layout = qwen3_5_moe_layout()
    blocks, bridges = build([plan(layout)])
    names = [b.name for b in blocks]
    assert names == ["EMBEDDING", "GDN", "MOE", "ATTENTION", "FINAL_NORM_OUTPUT", "MTP"]
    assert [g.blocks for g in bridges[0].groups] == [
        ("EMBEDDING",), ("GDN", "MOE"), ("ATTENTION", "MOE"), ("FINAL_NORM_OUTPUT",), ("MTP",), ("ATTENTION", "MOE"),
    ]


def test_domain_index_is_the_only_layout_access_of_rule_instances() -> None:
    layout = qwen3_5_moe_layout()
    assert domain_index(layout, "global") == ([], 0, None)
    assert domain_index(layout, "decoder:linear") == ([0, 1, 2, 4, 5, 6], 0, 8)
    assert domain_index(layout, "decoder:full") == ([3, 7], 0, 8)
    assert domain_index(layout, "mtp") == ([0], 0, None)
    assert domain_index(layout, "mtp:mtp") == ([0], 0, 8)
    assert domain_index(qwen3_dense_layout(2), "mtp") == ([], 0, None)
    with pytest.raises(KeyError, match="no decoder layer group"):
        domain_index(layout, "decoder:nope")
    p = plan(layout)
    bridge = Bridge(p.fingerprint, p.model_type, Facts(), (Group("global", "", "", ()),))
    assert bridge.rules == ()
    instances = list(plan_instances(p.rules, layout, "transformer_layer"))
    assert len({i.megatron for i in instances if i.rule.op != "duplicate"}) == len(instances)
