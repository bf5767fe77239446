"""Gated delta-net linear attention (Qwen3.5 ``linear_attn.*`` with separate ``in_proj_qkv/z/b/a``; Qwen3-Next fuses
them into ``in_proj_qkvz``/``in_proj_ba``, grouped per key head).

Megatron: ``self_attention.in_proj`` (per TP rank ``[q k v z b a]``), ``conv1d``, ``A_log``, ``dt_bias``,
``out_norm``, ``out_proj``.
"""

from __future__ import annotations

from mapgen.families._dsl import Family, Slot, Variant

_CORE = ("conv1d", "a_log", "dt_bias", "norm", "out_proj")

GATED_DELTA_NET = Family(
    "gated_delta_net",
    role="mixer",
    description="gated delta-net linear attention (in_proj qkv/z/b/a, or fused qkvz/ba)",
    file=__name__,
    roots=("linear_attn.",),
    slots=(
        Slot("conv1d", ("conv1d.weight",)),
        Slot("a_log", ("A_log",)),
        Slot("dt_bias", ("dt_bias",)),
        Slot("norm", ("norm.weight",)),
        Slot("out_proj", ("out_proj.weight",)),
        Slot("in_proj_qkv", ("in_proj_qkv.weight",)),
        Slot("in_proj_z", ("in_proj_z.weight",)),
        Slot("in_proj_b", ("in_proj_b.weight",)),
        Slot("in_proj_a", ("in_proj_a.weight",)),
        Slot("in_proj_qkvz", ("in_proj_qkvz.weight",)),
        Slot("in_proj_ba", ("in_proj_ba.weight",)),
        Slot("conv1d_bias", ("conv1d.bias",)),
    ),
    variants=(
        Variant("split", (*_CORE, "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"), ("conv1d_bias",)),
        Variant("fused", (*_CORE, "in_proj_qkvz", "in_proj_ba"), ("conv1d_bias",)),
    ),
)
