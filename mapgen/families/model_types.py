"""Facts about a ``model_type`` that neither its keys nor its config.json state, one row per model type.

Everything here is a tie-breaker or a numerical convention; the keys and shapes decide whatever they can.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from mapgen.contract.routing import RouterScheme

Orientation = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class Facts:
    """``packed``: storage of packed experts when no shard header tells (orientation, gate/up interleaved).
    ``zero_centered``: HF RMSNorms compute ``(1 + w) * x`` (every norm except the gated delta-net output
    norm). ``output_gate``: attention's ``q_proj`` carries the output gate when shapes cannot tell.
    ``conv1d``: ``c_attn``/``c_proj``/``c_fc`` weights are GPT-2 ``Conv1D`` (stored ``[in, out]``: True) or
    ``nn.Linear`` (``[out, in]``: False, GPT-BigCode/StarCoder2); the spelling alone does not say, so a model type
    that stores them and declares neither is refused.
    ``layernorm``: the block and final norms are ``nn.LayerNorm`` (mean-centred, with a bias tensor) in the model
    code, not RMSNorm: megatron-core ``normalization="LayerNorm"``. A norm bias in the keys of a model type without
    this fact is refused (a bias says LayerNorm, but not which LayerNorm).
    ``position_offset``: the learned position table has this many rows before position 0 (OPT's
    ``OPTLearnedPositionalEmbedding`` looks up ``position + 2``): the rule rotates the table by it (HF row ``i +
    offset`` is Megatron row ``i``; the offset rows become Megatron's last rows, so export restores them exactly)
    and the Megatron table is that many rows longer than ``max_position_embeddings``. GPT-2's ``wpe`` has none;
    an ``embed_positions`` table of a model type that declares no offset is refused (OPT, BioGPT and the BART
    family use 2: the spelling does not say).
    ``norm_epsilon``: the norms' epsilon the model code fixes when config.json has no key for it (OPT's
    ``nn.LayerNorm(embed_dim)``: 1e-5; the bridge's fallback would be 1e-6).
    ``qk_norm_projection``: the QK norms normalise the whole q / k projection (OLMo-2/3, OLMoE, FlexOlmo:
    ``RMSNorm(num_heads * head_dim)`` before the heads are split), not each head: scan sizes them so, the planner
    refuses them (megatron-core's q_layernorm/k_layernorm are per head).
    ``router``: the routing scheme transformers' modelling code implements for this model type's MoE router
    (:mod:`mapgen.contract.routing`); ``""``: not known, only the values that compute the bridge's historic
    router are accepted."""

    packed: tuple[Orientation, bool] | None = None
    zero_centered: bool = False
    output_gate: bool = False
    layernorm: bool = False
    conv1d: bool | None = None
    router: RouterScheme = ""
    position_offset: int | None = None
    norm_epsilon: float | None = None
    qk_norm_projection: bool = False


_QWEN35 = Facts(packed=("out_in", False), zero_centered=True, output_gate=True, router="softmax_renorm")
_SOFTMAX = Facts(router="softmax")  # renormalised iff norm_topk_prob
_RENORM = Facts(router="softmax_renorm")  # always renormalised
_DEEPSEEK_V3 = Facts(router="sigmoid_grouped")  # sigmoid, score-correction bias, top-2 groups, scaled

MODEL_TYPES: dict[str, Facts] = {
    # [E, hidden, 2*inter] (transposed)
    "qwen3_vl_moe": Facts(packed=("in_out", False), router="softmax_renorm"),
    "qwen3_vl_moe_text": Facts(packed=("in_out", False), router="softmax_renorm"),
    # [E, hidden, 2*inter], gate/up columns alternate; GptOssTopKRouter: top-k of the (biased) logits, softmax
    # over the k
    "gpt_oss": Facts(packed=("in_out", True), router="softmax_renorm"),
    # Qwen3.6 MTP experts: [E, 2*inter, hidden] as in transformers' Qwen3_5MoeExperts
    "qwen3_5_moe": _QWEN35,
    "qwen3_5_moe_text": _QWEN35,
    "qwen3_5": Facts(zero_centered=True, output_gate=True),
    "qwen3_5_text": Facts(zero_centered=True, output_gate=True),
    "qwen3_next": Facts(zero_centered=True, output_gate=True, router="softmax"),
    # MoE routers (mapgen.contract.routing), read from each model type's modelling code in transformers 5.24
    "qwen2_moe": _SOFTMAX,
    "qwen3_moe": _SOFTMAX,
    "olmoe": Facts(router="softmax", qk_norm_projection=True),
    "flex_olmo": Facts(router="softmax", qk_norm_projection=True),
    "mixtral": _RENORM,
    "minimax": _RENORM,
    "deepseek_v2": Facts(router="softmax_greedy"),
    "deepseek_v3": _DEEPSEEK_V3,
    "glm4_moe": _DEEPSEEK_V3,
    "glm4v_moe": _DEEPSEEK_V3,
    "glm4v_moe_text": _DEEPSEEK_V3,
    "dots1": _DEEPSEEK_V3,
    "glm4_moe_lite": _DEEPSEEK_V3,
    "deepseek_v32": _DEEPSEEK_V3,
    "glm_moe_dsa": _DEEPSEEK_V3,
    # nn.LayerNorm(hidden, eps) with bias in every block and final norm (modeling_stablelm.py, modeling_gpt_neox.py)
    "stablelm": Facts(layernorm=True),
    "stablelm_epoch": Facts(layernorm=True),  # stable-code-3b's remote code: the layer transformers' stablelm ported
    "gpt_neox": Facts(layernorm=True),
    "gpt2": Facts(layernorm=True, conv1d=True),
    "persimmon": Facts(layernorm=True),  # QK norms too: nn.LayerNorm(head_dim) (modeling_persimmon.py)
    # c_attn/c_proj/c_fc as nn.Linear [out, in] (modeling_gpt_bigcode.py, modeling_starcoder2.py)
    "gpt_bigcode": Facts(layernorm=True, conv1d=False),
    "starcoder2": Facts(layernorm=True, conv1d=False),
    "falcon": Facts(layernorm=True),  # its parallel blocks are refused by the planner (families/norms.py)
    # QK norms over the whole projection (modeling_olmo2.py Olmo2Attention: RMSNorm(num_heads * head_dim))
    "olmo2": Facts(qk_norm_projection=True),
    "olmo3": Facts(qk_norm_projection=True),
    "olmo_hybrid": Facts(qk_norm_projection=True),
    # nn.LayerNorm with bias everywhere, learned positions at position + 2 (modeling_opt.py)
    "opt": Facts(layernorm=True, position_offset=2, norm_epsilon=1e-5),
}

_NONE = Facts()


def router_for(model_types: Iterable[str]) -> RouterScheme:
    """The router scheme of the first of ``model_types`` (the text model's type first) that has one."""
    return next((MODEL_TYPES[t].router for t in model_types if t in MODEL_TYPES and MODEL_TYPES[t].router), "")


def facts_for(model_types: Iterable[str]) -> Facts:
    """The first row among ``model_types`` (the text model's type first), or no facts."""
    for t in model_types:
        if t in MODEL_TYPES:
            return MODEL_TYPES[t]
    return _NONE
