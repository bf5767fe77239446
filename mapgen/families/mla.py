"""DeepSeek multi-latent attention: ``q_a_proj``/``q_a_layernorm``/``q_b_proj`` (or a full-rank ``q_proj``),
``kv_a_proj_with_mqa`` (latent + rope part), ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``.

Classified by scan; the planner refuses it by name until the MLA conversion lands.
"""

from __future__ import annotations

from mapgen.families._dsl import Family, Slot, Variant

_CORE = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o")

MLA = Family(
    "mla",
    role="mixer",
    description="multi-latent attention (DeepSeek-V2/V3, Kimi-K2)",
    file=__name__,
    roots=("self_attn.",),
    slots=(
        Slot("kv_a_proj_with_mqa", ("kv_a_proj_with_mqa.weight",)),
        Slot("kv_a_layernorm", ("kv_a_layernorm.weight",)),
        Slot("kv_b_proj", ("kv_b_proj.weight",)),
        Slot("o", ("o_proj.weight",)),
        Slot("q_a_proj", ("q_a_proj.weight",)),
        Slot("q_a_layernorm", ("q_a_layernorm.weight",)),
        Slot("q_b_proj", ("q_b_proj.weight",)),
        Slot("q", ("q_proj.weight",)),
    ),
    variants=(
        Variant("q_low_rank", (*_CORE, "q_a_proj", "q_a_layernorm", "q_b_proj")),
        Variant("q_full_rank", (*_CORE, "q")),
    ),
)
