"""Gated delta-net linear attention (Qwen3.5 ``linear_attn.*`` with separate ``in_proj_qkv/z/b/a``; Qwen3-Next fuses
them into ``in_proj_qkvz``/``in_proj_ba``, grouped per key head).

Lara-mini's checkpoints fuse the four projections into one ``in_proj`` (rows ``[q|k|v|z|b|a]`` as whole blocks,
``conversion_mapping.py`` splits it) with ``out_norm`` (``fused_blocks``: ``gdn_in_proj`` variant ``blocks``).
One more storage is classified so that scan names every key, and refused by the planner until it has a rule:
OLMo-Hybrid stores flash-linear-attention's layout:
``q/k/v_proj``, ``a/b_proj``, ``g_proj`` (the output gate z), one depthwise conv per q/k/v (``q/k/v_conv1d``,
concatenated into transformers' ``conv1d``), ``o_norm`` and ``o_proj``.

Megatron: ``self_attention.in_proj`` (per TP rank ``[q k v z b a]``), ``conv1d``, ``A_log``, ``dt_bias``,
``out_norm``, ``out_proj``.
"""

from __future__ import annotations

from mapgen.families._dsl import Dims, Family, Planner, ShapePairs, Slot, Variant, opts
from mapgen.ir import Component

_CORE = ("conv1d", "a_log", "dt_bias", "norm", "out_proj")

GATED_DELTA_NET = Family(
    "gated_delta_net",
    role="mixer",
    description="gated delta-net linear attention (in_proj qkv/z/b/a, or fused qkvz/ba)",
    file=__name__,
    roots=("linear_attn.",),
    slots=(
        Slot("conv1d", ("conv1d.weight",)),
        Slot("a_log", ("A_log",), init="a_log"),
        Slot("dt_bias", ("dt_bias",), init="dt_bias"),
        Slot("norm", ("norm.weight", "out_norm.weight", "o_norm.weight"), init="norm"),
        Slot("out_proj", ("out_proj.weight", "o_proj.weight")),
        Slot("in_proj_qkv", ("in_proj_qkv.weight",)),
        Slot("in_proj_z", ("in_proj_z.weight",)),
        Slot("in_proj_b", ("in_proj_b.weight",)),
        Slot("in_proj_a", ("in_proj_a.weight",)),
        Slot("in_proj_qkvz", ("in_proj_qkvz.weight",)),
        Slot("in_proj_ba", ("in_proj_ba.weight",)),
        Slot("conv1d_bias", ("conv1d.bias",)),
        Slot("in_proj", ("in_proj.weight",)),  # Lara-mini: [q|k|v|z|b|a] blocks
        # OLMo-Hybrid (flash-linear-attention names)
        *(Slot(f"{x}_proj", (f"{x}_proj.weight",)) for x in ("q", "k", "v", "a", "b", "g")),
        *(Slot(f"{x}_conv1d", (f"{x}_conv1d.weight",)) for x in ("q", "k", "v")),
    ),
    variants=(
        Variant("split", (*_CORE, "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"), ("conv1d_bias",)),
        Variant("fused", (*_CORE, "in_proj_qkvz", "in_proj_ba"), ("conv1d_bias",)),
        Variant("fused_blocks", (*_CORE, "in_proj"), ("conv1d_bias",)),
        Variant("separate", ("a_log", "dt_bias", "norm", "out_proj", "q_proj", "k_proj", "v_proj", "a_proj", "b_proj",
                             "g_proj", "q_conv1d", "k_conv1d", "v_conv1d")),
    ),
)
UNPLANNED = {
    "separate": "a gated delta-net stored as separate q/k/v/a/b/g projections and q/k/v convolutions (OLMo-Hybrid, "
                "flash-linear-attention names)",
}
"""Storages scan classifies and the planner has no rule for yet (megatron-core builds them: its in_proj is the
rows ``[q k v z b a]`` per TP rank and its conv the channels ``[q k v]``)."""

INPUT_NORM = "self_attention.in_proj.layer_norm_weight"
"""Megatron fuses the block's pre-mixer norm into the gated delta-net's ``in_proj``."""


def facts(c: Component) -> dict[str, bool]:
    return {"gated_delta_net": True}


def kind(c: Component) -> str:
    return "gated_delta_net"


def describe(c: Component) -> str:
    if c.variant in UNPLANNED:
        return f"gated-delta-net ({c.variant.replace('_', ' ')}; refused)"
    if c.key("in_proj"):
        return "gated-delta-net (in_proj [q|k|v|z|b|a] blocks)"
    return "gated-delta-net (" + ("fused qkvz/ba" if c.key("in_proj_qkvz") else "in_proj qkv/z/b/a") + ")"


def shapes(c: Component, d: Dims) -> ShapePairs:
    if c.variant in UNPLANNED:  # not planned: sizes not checked
        return [(key, None) for key in c.own_keys()]
    if d.gdn is None:
        return [(c.key(s), None) for s in ("conv1d", "a_log", "dt_bias", "norm", "out_proj")]
    nk, nv, dk, dv, kernel = d.gdn
    key_dim, value_dim = nk * dk, nv * dv
    conv_dim = 2 * key_dim + value_dim
    return [
        (c.key("in_proj_qkv"), (conv_dim, d.hidden)),
        (c.key("in_proj_z"), (value_dim, d.hidden)),
        (c.key("in_proj_b"), (nv, d.hidden)),
        (c.key("in_proj_a"), (nv, d.hidden)),
        (c.key("in_proj_qkvz"), (2 * key_dim + 2 * value_dim, d.hidden)),
        (c.key("in_proj_ba"), (2 * nv, d.hidden)),
        (c.key("in_proj"), (conv_dim + value_dim + 2 * nv, d.hidden)),
        (c.key("conv1d"), (conv_dim, 1, kernel)),
        (c.key("conv1d_bias"), (conv_dim,)),
        (c.key("a_log"), (nv,)),
        (c.key("dt_bias"), (nv,)),
        (c.key("norm"), (dv,)),
        (c.key("out_proj"), (d.hidden, value_dim)),
    ]


def plan(c: Component, p: Planner, mroot: str, hroot: str, domain: str, name: str) -> None:
    if c.variant in UNPLANNED:
        p.unsupported(UNPLANNED[c.variant], hroot + str(c.key("in_proj") or c.key("q_proj")))
        return
    fused = c.variant == "fused"
    slots = {"fused": ("in_proj_qkvz", "in_proj_ba"), "fused_blocks": ("in_proj",)}.get(
        c.variant, ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"))
    parts = tuple(c.key(slot) for slot in slots)
    if not all(parts):
        p.unsupported("an incomplete gated delta-net projection set", hroot + "linear_attn")
        return
    sa = f"{mroot}self_attention."

    def key(slot: str) -> tuple[str, ...]:
        return (hroot + str(c.key(slot)),)

    if fused:
        p.add("gdn.in_proj", f"{sa}in_proj.weight", tuple(hroot + str(x) for x in parts), "gdn_in_proj",
              "gdn_heads", domain=domain, options=opts(variant="qkvz_ba"),
              comment=f"[{name}] in_proj_qkvz/in_proj_ba (grouped per key head) -> fused in_proj, per TP rank "
                      "[q k v z b a].")
    elif c.variant == "fused_blocks":
        p.add("gdn.in_proj", f"{sa}in_proj.weight", tuple(hroot + str(x) for x in parts), "gdn_in_proj",
              "gdn_heads", domain=domain, options=opts(variant="blocks"),
              comment=f"[{name}] in_proj [q|k|v|z|b|a] blocks -> fused in_proj, per TP rank [q k v z b a].")
    else:
        p.add("gdn.in_proj", f"{sa}in_proj.weight", tuple(hroot + str(x) for x in parts), "gdn_in_proj",
              "gdn_heads", domain=domain, comment=f"[{name}] in_proj_qkv/z/b/a -> fused in_proj, per TP rank "
                                                  "[q k v z b a].")
    p.add("gdn.conv1d", f"{sa}conv1d.weight", key("conv1d"), "gdn_conv1d", "gdn_heads", domain=domain,
          comment=f"[{name}] Depthwise conv over [q k v] channels, split per TP rank.")
    if c.key("conv1d_bias"):
        p.add("gdn.conv1d_bias", f"{sa}conv1d.bias", key("conv1d_bias"), "gdn_conv1d", "gdn_heads", domain=domain,
              comment=f"[{name}] Conv bias, split like the conv weight.")
    p.add("gdn.a_log", f"{sa}A_log", key("a_log"), "copy", "column", domain=domain,
          comment=f"[{name}] Per value-head decay (log), split over heads.")
    p.add("gdn.dt_bias", f"{sa}dt_bias", key("dt_bias"), "copy", "column", domain=domain,
          comment=f"[{name}] Per value-head dt bias, split over heads.")
    transform = "zero_centered" if p.zero_centered else "none"
    p.add("gdn.out_norm", f"{sa}out_norm.weight", key("norm"), "copy", "replicated", domain=domain,
          options=opts(transform=transform),
          comment=f"[{name}] Gated output norm"
          + (": plain RMSNorm in HF, zero-centred in Megatron (w - 1 / w + 1)." if p.zero_centered else "."))
    p.add("gdn.out_proj", f"{sa}out_proj.weight", key("out_proj"), "copy", "row", domain=domain,
          comment=f"[{name}] Output projection: row-parallel.")
