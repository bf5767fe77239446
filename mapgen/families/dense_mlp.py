"""A gated MLP: separate gate/up/down (``w1``/``w3``/``w2`` in Mixtral and InternLM naming) or a fused
``gate_up_proj``, with optional biases. The same declaration describes a per-expert MLP (root
``experts.{expert}.``) and the shared expert of a MoE block.

Megatron: ``linear_fc1`` (``[gate_r; up_r]`` per TP rank) and ``linear_fc2`` (row-parallel).
"""

from __future__ import annotations

from mapgen.families._dsl import Dims, Family, Planner, ShapePairs, Slot, Variant, opts
from mapgen.ir import Component

DENSE_MLP = Family(
    "dense_mlp",
    role="mlp",
    description="gated MLP (gate/up/down, w1/w3/w2, or fused gate_up)",
    file=__name__,
    roots=("mlp.", "block_sparse_moe.", "feed_forward."),
    slots=(
        Slot("gate", ("gate_proj.weight", "w1.weight")),
        Slot("up", ("up_proj.weight", "w3.weight")),
        Slot("down", ("down_proj.weight", "w2.weight")),
        Slot("gate_up", ("gate_up_proj.weight",)),
        Slot("gate_bias", ("gate_proj.bias", "w1.bias")),
        Slot("up_bias", ("up_proj.bias", "w3.bias")),
        Slot("down_bias", ("down_proj.bias", "w2.bias")),
    ),
    variants=(
        Variant("separate", ("gate", "up", "down"), ("gate_bias", "up_bias", "down_bias")),
        Variant("fused", ("gate_up", "down"), ("down_bias",)),
    ),
)


def facts(c: Component) -> dict[str, bool]:
    return {}


def kind(c: Component) -> str:
    return "dense"


def describe(c: Component) -> str:
    text = "dense " + ("fused gate_up" if c.key("gate_up") else "gate/up/down")
    return text + (" +bias" if c.key("down_bias") else "")


def sized(c: Component, hidden: int, inter: int | None) -> ShapePairs:
    """Shapes of a gated MLP with intermediate size ``inter`` (also used for experts and shared experts)."""
    if inter is None:
        return [(c.key(s), None) for s in ("gate", "up", "gate_up", "down")]
    return [
        (c.key("gate"), (inter, hidden)),
        (c.key("up"), (inter, hidden)),
        (c.key("gate_up"), (2 * inter, hidden)),
        (c.key("down"), (hidden, inter)),
        (c.key("gate_bias"), (inter,)),
        (c.key("up_bias"), (inter,)),
        (c.key("down_bias"), (hidden,)),
    ]


def shapes(c: Component, d: Dims) -> ShapePairs:
    return sized(c, d.hidden, d.intermediate)


def plan_mlp(c: Component, p: Planner, mprefix: str, hroot: str, domain: str, name: str, family: str) -> None:
    """Rules of a gated MLP whose Megatron module sits at ``mprefix`` (``mlp.``, ``mlp.shared_experts.``)."""
    bias = c.key("gate_bias") or c.key("up_bias") or c.key("down_bias")
    if bias:
        p.unsupported("MLP biases", hroot + bias)
        return
    if c.key("gate_up") is not None:
        fc1: tuple[str, ...] = (hroot + str(c.key("gate_up")),)
        options = opts(fused=True)
    else:
        fc1 = (hroot + str(c.key("gate")), hroot + str(c.key("up")))
        options = opts(fused=False)
    p.add(f"{family}.fc1", f"{mprefix}linear_fc1.weight", fc1, "gated_fc1", "gated_column", domain=domain,
          options=options, comment=f"[{name}] gate + up -> linear_fc1, laid out per TP rank as [gate_r; up_r].")
    p.add(f"{family}.fc2", f"{mprefix}linear_fc2.weight", (hroot + str(c.key("down")),), "copy", "row",
          domain=domain, comment=f"[{name}] down -> linear_fc2: row-parallel.")


def plan(c: Component, p: Planner, mroot: str, hroot: str, domain: str, name: str) -> None:
    plan_mlp(c, p, f"{mroot}mlp.", hroot, domain, name, "mlp")
