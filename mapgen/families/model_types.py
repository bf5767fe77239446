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
    ``plain_up_down``: the MLP is ``down_proj(act(up_proj(x)))`` with no gate (Arcee, Jais2, Nemotron): ``up_proj`` and
    ``down_proj`` without ``gate_proj`` are then a plain MLP (megatron-core ``gated_linear_unit=False``); in any other
    model type a missing gate is refused, never read as a plain MLP.
    ``non_parametric_norms``: every norm is a LayerNorm without weight or bias (OLMo-1): a layer or a final norm
    with no norm tensors is then classified as such (and refused by the planner), never reported as missing keys.
    ``post_layernorm``: the two block norms come *after* each residual add (GPT-1: ``ln_1(x + attn(x))``) and there
    is no final norm: keys that look like a pre-norm block are classified as this block (refused by the planner).
    ``qk_norm_after_rope``: the QK norms are applied to the rotated q/k (HunYuan: ``query_layernorm(apply_rotary(q))``):
    refused by the planner (megatron-core applies q_layernorm/k_layernorm before RoPE).
    ``qkv_layout``: how this model type's fused q/k/v projection stores q, k and v (``mapgen.ops.qkv`` layouts) where
    its root + spelling means another order elsewhere (Sarvam-MoE's ``attention.query_key_value`` is ``[q; k; v]``,
    GPT-NeoX's per head): it wins over ``attention.FUSED_QKV_LAYOUT``.
    ``rotary_interleaved``: RoPE rotates adjacent pairs of dims (GLM, Helium, ERNIE-4.5: ``rotate_half`` over
    ``x[..., 0::2]`` / ``x[..., 1::2]`` with each frequency repeated twice), not the two halves: megatron-core's
    ``rotary_interleaved`` computes exactly that (and Megatron-LM's ``--rotary-interleaved``).
    ``mla_gated_q``: the MLA's ``q_b_proj`` reads the q latent both normed and raw (``[q_a_layernorm(c); c]``, twice
    q_lora_rank) and writes per head a query and a sigmoid output gate (A.X-K2 ``q_gate_proj``): scan sizes it so, the
    planner refuses it (megatron-core's MLA has neither).
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
    plain_up_down: bool = False
    non_parametric_norms: bool = False
    qk_norm_after_rope: bool = False
    post_layernorm: bool = False
    qkv_layout: str | None = None
    rotary_interleaved: bool = False
    mla_gated_q: bool = False


# GLM, Helium, ERNIE-4.5: apply_rotary_pos_emb repeats cos/sin per pair and rotate_half stacks (-x[1::2], x[0::2])
# (modeling_glm.py, modeling_helium.py, modeling_ernie4_5.py)
_INTERLEAVED = Facts(rotary_interleaved=True)
_QWEN35 = Facts(packed=("out_in", False), zero_centered=True, output_gate=True, router="softmax_renorm")
_SOFTMAX = Facts(router="softmax")  # renormalised iff norm_topk_prob
_RENORM = Facts(router="softmax_renorm")  # always renormalised
_DEEPSEEK_V3 = Facts(router="sigmoid_grouped")  # sigmoid, score-correction bias, top-2 groups, scaled
_GRANITE_MOE = Facts(packed=("out_in", False), router="softmax_renorm")

MODEL_TYPES: dict[str, Facts] = {
    "glm": _INTERLEAVED,
    "helium": _INTERLEAVED,
    "ernie4_5": _INTERLEAVED,
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
    # GraniteMoE: softmax over the top-k logits (= renormalised); packed [E, 2I, H] experts, gate then up
    # (modeling_granitemoe.py GraniteMoeTopKRouter, GraniteMoeExperts: chunk(2) of input_linear's output)
    "granitemoe": _GRANITE_MOE,
    "granitemoeshared": _GRANITE_MOE,  # its layer-level shared_mlp is not classified (shared_intermediate_size 0)
    "deepseek_v2": Facts(router="softmax_greedy"),
    "deepseek_v3": _DEEPSEEK_V3,
    "sarvam_mla": _DEEPSEEK_V3,  # SarvamMLAConfig subclasses DeepseekV3Config; the model is DeepseekV3ForCausalLM
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
    # c_attn: multi-query [q; k; v] (split((embed, kv, kv))), else per head [q_h k_h v_h] (view(..., heads,
    # 3 * head_dim).split): both are per_group (one group when multi-query), not GPT-2's blocks
    "gpt_bigcode": Facts(layernorm=True, conv1d=False, qkv_layout="per_group"),
    "starcoder2": Facts(layernorm=True, conv1d=False),
    "falcon": Facts(layernorm=True),  # its parallel blocks are refused by the planner (families/norms.py)
    # QK norms over the whole projection (modeling_olmo2.py Olmo2Attention: RMSNorm(num_heads * head_dim))
    "olmo2": Facts(qk_norm_projection=True),
    "olmo3": Facts(qk_norm_projection=True),
    "olmo_hybrid": Facts(qk_norm_projection=True),
    # nn.LayerNorm with bias everywhere, learned positions at position + 2 (modeling_opt.py)
    "opt": Facts(layernorm=True, position_offset=2, norm_epsilon=1e-5),
    # up_proj -> act -> down_proj, no gate (modeling_arcee.py ArceeMLP, modeling_jais2.py, modeling_nemotron.py)
    "arcee": Facts(plain_up_down=True),
    "jais2": Facts(layernorm=True, plain_up_down=True),  # nn.LayerNorm(hidden, eps) blocks and final norm
    # NemotronLayerNorm1P: F.layer_norm(x, weight + 1, bias), i.e. a zero-centred LayerNorm
    # (megatron-core layernorm_zero_centered_gamma with normalization='LayerNorm')
    "nemotron": Facts(layernorm=True, zero_centered=True, plain_up_down=True),
    # EXAONE-3 stores Llama's layout as transformer.h.N.{ln_1, attn.attention.*_proj, mlp.c_fc_0/c_fc_1/c_proj}:
    # nn.Linear [out, in], not GPT-2's Conv1D (transformers' conversion_mapping.py renames them onto Llama's)
    "exaone": Facts(conv1d=False),
    # nn.LayerNorm(hidden, eps=rms_norm_eps, elementwise_affine=True) blocks and final norm (modeling_phimoe.py); its
    # sparsemixer router is refused by the config catalog (mapgen/catalog/model_types.py)
    "phimoe": Facts(layernorm=True),
    # OlmoLayerNorm: F.layer_norm(x, normalized_shape, None, None, eps=1e-5), no parameters (modeling_olmo.py)
    "olmo": Facts(layernorm=True, non_parametric_norms=True),
    # NanoChatRMSNorm: F.rms_norm without a weight (block, final and QK norms; modeling_nanochat.py); plain relu2 MLP
    "nanochat": Facts(non_parametric_norms=True),
    "apertus": Facts(plain_up_down=True),  # ApertusMLP: down_proj(xielu(up_proj(x)))
    "apertus1p5_text": Facts(plain_up_down=True),
    # HunYuan: query_layernorm/key_layernorm after apply_rotary_pos_emb (modeling_hunyuan_v1_dense.py)
    "hunyuan_v1_dense": Facts(qk_norm_after_rope=True),
    "hunyuan_v1_moe": Facts(qk_norm_after_rope=True),
    # Sarvam-MoE: GLM-4-MoE's maths (configuration_sarvam_moe.py subclasses Glm4MoeConfig) under Bailing-style names;
    # transformers' conversion_mapping.py splits attention.query_key_value into [q | k | v] by size (GQA blocks)
    "sarvam_moe": Facts(router="sigmoid_grouped", qkv_layout="blocks"),
    "gpt_neox_japanese": Facts(layernorm=True),  # nn.LayerNorm blocks and final norm (modeling_gpt_neox_japanese.py)
    # modeling_openai.py Block: post-LN; positions_embed looked up at position (no offset)
    "openai-gpt": Facts(layernorm=True, conv1d=True, post_layernorm=True, position_offset=0),
    # GPT-Neo: transformer.h.N.attn.attention.{q,k,v,out}_proj, mlp.c_fc/c_proj as nn.Linear, nn.LayerNorm
    "gpt_neo": Facts(layernorm=True, conv1d=False),
    # EXAONE-MoE: DeepSeek-V3's router (sigmoid + e_score_correction_bias, n_group/topk_group, renormalised, times
    # routed_scaling_factor; modeling_exaone_moe.py ExaoneMoeTopkRouter); its NoPE full-attention layers are derived
    # in mapgen.contract.hf_config.no_rope_layers
    "exaone_moe": _DEEPSEEK_V3,
    # MiniMax-M2: q_norm/k_norm are RMSNorm(num_heads * head_dim) over the whole projection (modeling_minimax_m2.py)
    "minimax_m2": Facts(qk_norm_projection=True),
    # BioGPT: OPT's pre-LN block (self_attn_layer_norm, final_layer_norm before fc1) under biogpt., nn.LayerNorm with
    # bias, learned positions at position + 2 (modeling_biogpt.py BioGptLearnedPositionalEmbedding offset 2)
    "biogpt": Facts(layernorm=True, position_offset=2),
    # ERNIE-4.5-MoE (modeling_ernie4_5_moe.py Ernie4_5_MoeTopKRouter): softmax over every expert in fp32, top-k of
    # the probabilities plus moe_statics' score-correction bias, the selected unbiased probabilities renormalised
    # (sum clamped at moe_norm_min); the bias on softmax scores is refused by the planner (mapgen.families.moe)
    "ernie4_5_moe": Facts(router="softmax_renorm", rotary_interleaved=True),
    # Aria (modeling_aria.py AriaTextTopKRouter: softmax over the top-k logits = renormalised; AriaExperts
    # gate_up_proj [E, H, 2I] / down_proj [E, I, H] stored (in, out), gate then up along the last axis)
    "aria_text": Facts(packed=("in_out", False), router="softmax_renorm"),
    "aria": Facts(packed=("in_out", False), router="softmax_renorm"),
    # HY-V3 (modeling_hy_v3.py HYV3TopKRouter): sigmoid + e_score_correction_bias for the selection, always
    # renormalised, times router_scaling_factor
    "hy_v3": Facts(router="sigmoid_renorm"),
    # Lara-mini (modeling_lara_mini.py): Qwen3-Next's hybrid with plain RMSNorms (weight * x), per-head QK norms,
    # packed experts [E, 2I, H] (gate then up), an ungated shared expert, softmax router renormalised iff
    # norm_topk_prob; RoPE on sliding_attention layers only (mapgen.contract.hf_config.no_rope_layers)
    "lara_mini": Facts(packed=("out_in", False), router="softmax"),
    # A.X-K2 (modeling_axk2.py AXK2Attention): q_gate_proj (stored as q_b_proj) over [normed; raw] q latent
    "axk2": Facts(mla_gated_q=True),
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
