"""Softmax attention: separate q/k/v or a fused qkv projection, optional biases, QK-norm, the Qwen3.5/Qwen3-Next
output gate (``q_proj`` holds ``[q_h; gate_h]`` per head, so it is twice as tall) and attention sinks.

Megatron: ``self_attention.linear_qkv`` (q/k/v interleaved per query group), ``linear_proj`` (row-parallel),
``q_layernorm``/``k_layernorm``.
"""

from __future__ import annotations

from mapgen.families._dsl import Family, Slot, Variant

ATTENTION = Family(
    "attention",
    role="mixer",
    description="softmax attention (q/k/v or fused qkv, biases, QK-norm, output gate, sinks)",
    file=__name__,
    roots=("self_attn.",),
    slots=(
        Slot("q", ("q_proj.weight",)),
        Slot("k", ("k_proj.weight",)),
        Slot("v", ("v_proj.weight",)),
        Slot("qkv", ("qkv_proj.weight",)),
        Slot("o", ("o_proj.weight",)),
        Slot("q_bias", ("q_proj.bias",)),
        Slot("k_bias", ("k_proj.bias",)),
        Slot("v_bias", ("v_proj.bias",)),
        Slot("qkv_bias", ("qkv_proj.bias",)),
        Slot("o_bias", ("o_proj.bias",)),
        Slot("q_norm", ("q_norm.weight",)),
        Slot("k_norm", ("k_norm.weight",)),
        Slot("sinks", ("sinks",)),
    ),
    variants=(
        Variant("separate", ("o", "q", "k", "v"),
                ("q_bias", "k_bias", "v_bias", "qkv_bias", "o_bias", "q_norm", "k_norm", "sinks")),
        Variant("fused", ("o", "qkv"),
                ("q_bias", "k_bias", "v_bias", "qkv_bias", "o_bias", "q_norm", "k_norm", "sinks")),
    ),
    excludes=("kv_a_proj_with_mqa.weight",),
    flags=("output_gate", "sliding_window"),
)
