"""A gated MLP: separate gate/up/down (``w1``/``w3``/``w2`` in Mixtral and InternLM naming) or a fused
``gate_up_proj``, with optional biases. The same declaration describes a per-expert MLP (root
``experts.{expert}.``) and the shared expert of a MoE block.

Megatron: ``linear_fc1`` (``[gate_r; up_r]`` per TP rank) and ``linear_fc2`` (row-parallel).
"""

from __future__ import annotations

from mapgen.families._dsl import Family, Slot, Variant

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
