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
        Slot("gate", ("gate_proj.weight", "w1.weight", "c_fc_0.weight")),  # EXAONE-3: c_fc_0/c_fc_1/c_proj
        Slot("up", ("up_proj.weight", "w3.weight", "c_fc_1.weight")),
        Slot("down", ("down_proj.weight", "w2.weight", "c_proj.weight", "output_linear.weight")),
        Slot("gate_up", ("gate_up_proj.weight", "input_linear.weight")),  # Granite shared_mlp: chunk(2) = gate, up
        Slot("sub_norm", ("ffn_sub_norm.weight",), init="norm"),  # BitNet: a norm before down_proj (refused)
        # Apertus xIELU: the activation's own learned parameters (refused: megatron-core has no such activation)
        Slot("act_alpha_p", ("act_fn.alpha_p",)),
        Slot("act_alpha_n", ("act_fn.alpha_n",)),
        Slot("act_beta", ("act_fn.beta",)),
        Slot("act_eps", ("act_fn.eps",)),
        Slot("gate_bias", ("gate_proj.bias", "w1.bias")),
        Slot("up_bias", ("up_proj.bias", "w3.bias")),
        Slot("down_bias", ("down_proj.bias", "w2.bias")),
        # up_proj/down_proj without a gate_proj (Arcee, Jais2, Nemotron: down(act(up(x)))): read as a plain MLP
        # only for model types that declare it (Facts.plain_up_down), never because a gate is missing
        Slot("fc1", ("dense_h_to_4h.weight", "fc1.weight", "fc_in.weight", "c_fc.weight", "up_proj.weight")),
        Slot("fc2", ("dense_4h_to_h.weight", "fc2.weight", "fc_out.weight", "c_proj.weight", "down_proj.weight")),
        Slot("fc1_bias", ("dense_h_to_4h.bias", "fc1.bias", "fc_in.bias", "c_fc.bias", "up_proj.bias")),
        Slot("fc2_bias", ("dense_4h_to_h.bias", "fc2.bias", "fc_out.bias", "c_proj.bias", "down_proj.bias")),
    ),
    variants=(
        Variant("separate", ("gate", "up", "down"), ("gate_bias", "up_bias", "down_bias", "sub_norm")),
        Variant("fused", ("gate_up", "down"), ("down_bias",)),
        Variant("plain", ("fc1", "fc2"), ("fc1_bias", "fc2_bias", "act_alpha_p", "act_alpha_n", "act_beta", "act_eps")),
    ),
    flags=("conv1d",),
)
CONV1D = frozenset({"c_fc.weight", "c_proj.weight"})
UP_DOWN = frozenset({"up_proj.weight", "down_proj.weight"})
"""The gated MLP's up/down spellings: as a plain MLP (no gate_proj) only where the model type declares it."""
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
    if c.flag("conv1d"):  # c_proj as down: stored [out, in] only where the model type says nn.Linear
        p.unsupported(UNDECLARED_CONV1D if c.flag("conv1d") == "undeclared" else "a gated MLP stored as Conv1D",
                      hroot + str(c.key("down")))
        return
    if c.key("sub_norm"):
        p.unbuildable("a norm between the MLP's activation and its down projection (BitNet ffn_sub_norm): "
                      "megatron-core's MLP has no norm before linear_fc2", hroot + str(c.key("sub_norm")))
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
    if c.key("act_alpha_p"):
        p.unbuildable("an activation with learned parameters (Apertus xIELU act_fn.alpha_p/alpha_n/beta/eps): "
                      "megatron-core's MLP applies a parameter-free activation_func", hroot + str(c.key("act_alpha_p")))
        return
    if bool(fc1_bias) != bool(fc2_bias):
        p.unsupported("a bias on one projection of a plain MLP only", hroot + str(fc1_bias or fc2_bias))
        return
    if mprefix != "mlp." and not mprefix.endswith(".mlp."):
        p.unsupported("a plain (not gated) MLP inside a MoE block", hroot + str(fc1))
        return
    if c.flag("conv1d") == "undeclared":
        p.unsupported(UNDECLARED_CONV1D, hroot + str(fc1))
        return
    if str(fc1).rpartition(".")[0].rpartition(".")[2] + ".weight" in UP_DOWN and not p.plain_up_down:
        p.unsupported("an up_proj/down_proj MLP without gate_proj of a model type not declared non-gated "
                      "(mapgen/families/model_types.py Facts.plain_up_down): a missing gate is not a plain MLP",
                      hroot + str(fc1))
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
