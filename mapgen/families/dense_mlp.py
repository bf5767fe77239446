"""A dense MLP: gated (separate gate/up/down, ``w1``/``w3``/``w2`` in Mixtral and InternLM naming, or a fused
``gate_up_proj``) or plain (one up projection, an activation, one down projection: GPT-NeoX
``dense_h_to_4h``/``dense_4h_to_h``, ``fc1``/``fc2``, ``fc_in``/``fc_out``), with optional biases. The same
declaration describes a per-expert MLP (root ``experts.{expert}.``) and the shared expert of a MoE block.

Megatron: ``linear_fc1`` (gated: ``[gate_r; up_r]`` per TP rank; plain: column-parallel) and ``linear_fc2``
(row-parallel); a plain MLP is ``gated_linear_unit=False``, its biases ``add_bias_linear`` (which also gives the
attention output projection a bias: the two must agree, see the planner's fact conflicts).
"""

from __future__ import annotations

from mapgen.families._dsl import Dims, Family, Planner, ShapePairs, Slot, Variant, conv1d_shapes, opts
from mapgen.families.attention import UNDECLARED_CONV1D
from mapgen.ir import Component

DENSE_MLP = Family(
    "dense_mlp",
    role="mlp",
    description="dense MLP (gated: gate/up/down, w1/w3/w2, fused gate_up; plain: fc1/fc2, dense_h_to_4h/dense_4h_to_h)",
    file=__name__,
    # "": OPT's fc1/fc2 sit directly in the decoder layer (tried after the MoE roots)
    roots=("mlp.", "block_sparse_moe.", "feed_forward.", ""),
    slots=(
        Slot("gate", ("gate_proj.weight", "w1.weight")),
        Slot("up", ("up_proj.weight", "w3.weight")),
        Slot("down", ("down_proj.weight", "w2.weight")),
        Slot("gate_up", ("gate_up_proj.weight",)),
        Slot("gate_bias", ("gate_proj.bias", "w1.bias")),
        Slot("up_bias", ("up_proj.bias", "w3.bias")),
        Slot("down_bias", ("down_proj.bias", "w2.bias")),
        Slot("fc1", ("dense_h_to_4h.weight", "fc1.weight", "fc_in.weight", "c_fc.weight")),
        Slot("fc2", ("dense_4h_to_h.weight", "fc2.weight", "fc_out.weight", "c_proj.weight")),
        Slot("fc1_bias", ("dense_h_to_4h.bias", "fc1.bias", "fc_in.bias", "c_fc.bias")),
        Slot("fc2_bias", ("dense_4h_to_h.bias", "fc2.bias", "fc_out.bias", "c_proj.bias")),
    ),
    variants=(
        Variant("separate", ("gate", "up", "down"), ("gate_bias", "up_bias", "down_bias")),
        Variant("fused", ("gate_up", "down"), ("down_bias",)),
        Variant("plain", ("fc1", "fc2"), ("fc1_bias", "fc2_bias")),
    ),
    flags=("conv1d",),
)
CONV1D = frozenset({"c_fc.weight", "c_proj.weight"})
"""GPT-2 ``Conv1D`` spellings (stored ``[in, out]``): the rules say ``orientation='in_out'``."""


def facts(c: Component) -> dict[str, bool]:
    return {"add_bias_linear": bool(c.key("down_bias") or c.key("fc2_bias")), "non_gated_mlp": c.variant == "plain"}


def kind(c: Component) -> str:
    return "dense"


def describe(c: Component) -> str:
    if c.variant == "plain":
        return "dense plain fc1/fc2 (not gated)" + (" +bias" if c.key("fc2_bias") else "")
    text = "dense " + ("fused gate_up" if c.key("gate_up") else "gate/up/down")
    return text + (" +bias" if c.key("down_bias") else "")


def sized(c: Component, hidden: int, inter: int | None) -> ShapePairs:
    """Shapes of a gated MLP with intermediate size ``inter`` (also used for experts and shared experts)."""
    if inter is None:
        return [(c.key(s), None) for s in ("gate", "up", "gate_up", "down", "fc1", "fc2")]
    return [
        (c.key("gate"), (inter, hidden)),
        (c.key("up"), (inter, hidden)),
        (c.key("gate_up"), (2 * inter, hidden)),
        (c.key("down"), (hidden, inter)),
        (c.key("gate_bias"), (inter,)),
        (c.key("up_bias"), (inter,)),
        (c.key("down_bias"), (hidden,)),
        (c.key("fc1"), (inter, hidden)),
        (c.key("fc2"), (hidden, inter)),
        (c.key("fc1_bias"), (inter,)),
        (c.key("fc2_bias"), (hidden,)),
    ]


def shapes(c: Component, d: Dims) -> ShapePairs:
    return conv1d_shapes(sized(c, d.hidden, d.intermediate), c.flag("conv1d") is True)


def plan_mlp(c: Component, p: Planner, mprefix: str, hroot: str, domain: str, name: str, family: str) -> None:
    """Rules of a dense MLP whose Megatron module sits at ``mprefix`` (``mlp.``, ``mlp.shared_experts.``)."""
    if c.variant == "plain":
        _plan_plain(c, p, mprefix, hroot, domain, name, family)
        return
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


def _plan_plain(c: Component, p: Planner, mprefix: str, hroot: str, domain: str, name: str, family: str) -> None:
    fc1, fc2, fc1_bias, fc2_bias = c.key("fc1"), c.key("fc2"), c.key("fc1_bias"), c.key("fc2_bias")
    if bool(fc1_bias) != bool(fc2_bias):
        p.unsupported("a bias on one projection of a plain MLP only", hroot + str(fc1_bias or fc2_bias))
        return
    if mprefix != "mlp." and not mprefix.endswith(".mlp."):
        p.unsupported("a plain (not gated) MLP inside a MoE block", hroot + str(fc1))
        return
    if c.flag("conv1d") == "undeclared":
        p.unsupported(UNDECLARED_CONV1D, hroot + str(fc1))
        return
    stored = opts(orientation="in_out") if c.flag("conv1d") is True else ()
    p.add(f"{family}.fc1", f"{mprefix}linear_fc1.weight", (hroot + str(fc1),), "copy", "column", domain=domain,
          options=stored, comment=f"[{name}] up projection -> linear_fc1 (not gated): column-parallel.")
    if fc1_bias:
        p.add(f"{family}.fc1_bias", f"{mprefix}linear_fc1.bias", (hroot + fc1_bias,), "copy", "column",
              domain=domain, comment=f"[{name}] Its bias, split like the rows.")
    p.add(f"{family}.fc2", f"{mprefix}linear_fc2.weight", (hroot + str(fc2),), "copy", "row", domain=domain,
          options=stored, comment=f"[{name}] down projection -> linear_fc2: row-parallel.")
    if fc2_bias:
        p.add(f"{family}.fc2_bias", f"{mprefix}linear_fc2.bias", (hroot + fc2_bias,), "copy", "replicated",
              domain=domain, comment=f"[{name}] Its bias, added once after the row-parallel reduction.")


def plan(c: Component, p: Planner, mroot: str, hroot: str, domain: str, name: str) -> None:
    plan_mlp(c, p, f"{mroot}mlp.", hroot, domain, name, "mlp")
