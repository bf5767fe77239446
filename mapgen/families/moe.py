"""Mixture of experts: a router (+ router bias, + DeepSeek-style ``e_score_correction_bias``), routed experts
stored per expert (``experts.<e>.gate_proj`` ...) or packed (``experts.gate_up_proj [E, ...]``, optionally MXFP4
``*_blocks``/``*_scales``), and an optional shared expert with an optional sigmoid gate.

Megatron: ``mlp.router``, ``mlp.experts.local_experts.<e>.linear_fc1/linear_fc2`` (EP picks the experts, ETP
splits each), ``mlp.shared_experts.*``.
"""

from __future__ import annotations

from mapgen.families._dsl import Family, Slot, Variant

MOE = Family(
    "moe",
    role="mlp",
    description="mixture of experts (router, routed experts, optional shared expert)",
    file=__name__,
    roots=("mlp.", "block_sparse_moe.", "feed_forward."),
    slots=(
        Slot("router", ("gate.weight", "router.weight")),
        Slot("router_bias", ("gate.bias", "router.bias")),
        Slot("expert_bias", ("gate.e_score_correction_bias",)),
    ),
    variants=(Variant("routed", ("router",), ("router_bias", "expert_bias")),),
    children=("experts", "shared"),
)

EXPERTS = Family(
    "experts",
    role="part",
    description="routed experts, per expert (experts.<e>.*) or packed 3-D tensors [E, ...]",
    file=__name__,
    roots=("experts.",),
    # Packed storage; the per-expert variant reuses the dense MLP's spellings under ``experts.{expert}.``.
    slots=(
        Slot("gate_up", ("gate_up_proj",)),
        Slot("down", ("down_proj",)),
        Slot("gate_up_bias", ("gate_up_proj_bias",)),
        Slot("down_bias", ("down_proj_bias",)),
        Slot("gate_up_blocks", ("gate_up_proj_blocks",)),
        Slot("down_blocks", ("down_proj_blocks",)),
        Slot("gate_up_scales", ("gate_up_proj_scales",)),
        Slot("down_scales", ("down_proj_scales",)),
    ),
    variants=(
        Variant("packed", ("gate_up", "down"), ("gate_up_bias", "down_bias")),
        Variant("packed_mxfp4", ("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales"),
                ("gate_up_bias", "down_bias")),
    ),
    flags=("layout", "orientation", "gate_up_interleave", "quant"),
    counts=("num_experts", "orientation_source"),
)

SHARED_EXPERT = Family(
    "shared_expert",
    role="part",
    description="always-on shared expert(s) of a MoE block and the optional sigmoid gate in front of them",
    file=__name__,
    roots=("shared_expert.", "shared_experts."),
    slots=(Slot("gate", ("shared_expert_gate.weight",)),),
    children=("mlp",),
)
