"""What a ``model_type`` implies that ``config.json`` does not say, and what is out of scope.

``FACTS``: model-type facts (fixed in transformers' modelling code, not in the config) that change the maths
relative to what the bridge builds, as refusals keyed by model_type. A fact the bridge learns to express
(e.g. zero-centred norms, already handled for Qwen3.5/Qwen3-Next) moves out of this table.

Scope: encoder-decoder models, configs without ``model_type`` and architectures without an LM head are out of
scope for a causal-LM bridge: one ``scope.*`` error instead of misleading key errors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

_GEMMA_SCALE = ("embedding scale", "embeddings multiplied by sqrt(hidden_size) in the model code: no megatron-core "
                "setting")
_ZERO_NORM = ("zero-centred norms", "RMSNorm computes (1 + w) * x: the bridge applies "
              "layernorm_zero_centered_gamma for Qwen3.5/Qwen3-Next only")
_LAYERNORM = ("LayerNorm", "LayerNorm: the bridge builds it (megatron-core normalization='LayerNorm') only for the "
              "model types mapgen/families/model_types.py declares layernorm=True")
_PARALLEL = ("parallel block", "attention and MLP computed in parallel from one input: the bridge builds "
             "sequential pre-norm blocks")
_POST_NORM = ("post-norm block", "norms applied to the attention/MLP outputs (post-norm or sandwich): the bridge "
              "builds pre-norm blocks")
_QK_ALL_HEADS = ("QK-norm over all heads", "q/k norms over the whole projection, not per head: megatron-core's "
                 "q_layernorm/k_layernorm are per head")
_NOPE = ("NoPE layers", "some layers skip RoPE in the model code: the bridge applies RoPE in every layer")
_INTERLEAVED = ("interleaved RoPE", "rotary pairs are adjacent dims (GPT-J style rotate_half): the bridge sets "
                "megatron-core's rotary_interleaved only for the model types mapgen/families/model_types.py declares "
                "(GLM, Helium, ERNIE-4.5 and its MoE)")
_SIGMOID_ROUTER = ("sigmoid router", "top-k over sigmoid scores without an expert-bias tensor: the bridge builds a "
                   "softmax router")

# model_type -> ((fact, what megatron-core / the bridge lacks), ...). LayerNorm model types the bridge builds
# (stablelm, stablelm_epoch, gpt_neox, gpt2, gpt_bigcode, starcoder2, persimmon, falcon, opt: Facts.layernorm in
# mapgen/families/model_types.py) are not listed; GPT-NeoX's parallel residual is a config value
# (use_parallel_residual, refused in fields.py).
FACTS: dict[str, tuple[tuple[str, str], ...]] = {
    "gemma": (_GEMMA_SCALE, _ZERO_NORM),
    "gemma2": (_GEMMA_SCALE, _ZERO_NORM, _POST_NORM),
    "gemma3": (_GEMMA_SCALE, _ZERO_NORM, _POST_NORM),
    "gemma3_text": (_GEMMA_SCALE, _ZERO_NORM, _POST_NORM),
    "gemma3n": (_GEMMA_SCALE, _ZERO_NORM, _POST_NORM),
    "gemma3n_text": (_GEMMA_SCALE, _ZERO_NORM, _POST_NORM),
    "gemma4": (_GEMMA_SCALE, _POST_NORM),
    "gemma4_text": (_GEMMA_SCALE, _POST_NORM),
    "vaultgemma": (_GEMMA_SCALE, _ZERO_NORM),
    "recurrent_gemma": (_GEMMA_SCALE, _ZERO_NORM),
    "paligemma": (_GEMMA_SCALE, _ZERO_NORM),
    "olmo": (("non-parametric LayerNorm", "LayerNorm without weights: megatron-core's norms hold a weight and a "
              "bias, and mapgen writes no constant ones/zeros for them (the planner refuses the layout too)"),),
    "olmo2": (_POST_NORM, _QK_ALL_HEADS),
    "olmo3": (_POST_NORM, _QK_ALL_HEADS),
    "olmoe": (_QK_ALL_HEADS,),
    "minimax_m2": (_QK_ALL_HEADS,),
    # XGLM / CTRL: fixed sinusoidal position embeddings added to the token embeddings (no tensor in the checkpoint)
    "xglm": (("sinusoidal positions", "fixed sinusoidal position embeddings added to the token embeddings: "
              "megatron-core has RoPE, learned absolute or none"),),
    "mpt": (("ALiBi", "ALiBi attention biases instead of positions (modeling_mpt.py build_mpt_alibi_tensor): "
             "megatron-core has no ALiBi"),),
    "ctrl": (_GEMMA_SCALE, ("sinusoidal positions", "fixed sinusoidal position embeddings added to the token "
                            "embeddings: megatron-core has RoPE, learned absolute or none")),
    "flex_olmo": (_POST_NORM, _QK_ALL_HEADS),
    "cohere": (_LAYERNORM, _PARALLEL, _INTERLEAVED),
    "cohere2": (_LAYERNORM, _PARALLEL, _INTERLEAVED),
    "cohere2_moe": (_LAYERNORM, _PARALLEL, _INTERLEAVED),
    "glm4": (_INTERLEAVED, _POST_NORM),
    "glm4v": (_INTERLEAVED, _POST_NORM),
    "glm4v_text": (_INTERLEAVED, _POST_NORM),
    "glm_ocr": (_INTERLEAVED,),
    "falcon": (_PARALLEL,),
    "gpt_neox_reward_model": (_LAYERNORM, _PARALLEL),
    "gptj": (_LAYERNORM, _PARALLEL),
    "phi": (_LAYERNORM, _PARALLEL),
    "bloom": (_LAYERNORM,),
    # PhiMoE: sparsemixer top-2 (per choice a masked softmax, router_jitter_noise as its threshold at inference)
    "phimoe": (("sparsemixer router", "sparsemixer top-2 routing (masked softmax per choice, jitter threshold): "
                "megatron-core has no such router"),),
    "openai-gpt": (("post-LayerNorm block", "ln_1/ln_2 applied after each residual add and no final norm (GPT-1): "
                    "the bridge builds pre-norm blocks"),),
    # Flint: apply_rotary_pos_emb only where sliding_window is set (modeling_flint.py FlintAttention)
    "flint": (("NoPE full-attention layers", "RoPE only on sliding-window layers, none on full-attention layers: the "
               "bridge applies RoPE in every layer"),),
    # GPT-Neo: attn_weights = q @ k^T with no 1/sqrt(head_dim) (modeling_gpt_neo.py GPTNeoSelfAttention._attn)
    "gpt_neo": (("unscaled attention", "attention scores not divided by sqrt(head_dim): the bridge builds scaled "
                 "attention (megatron-core softmax_scale is not set from a model-type fact)"),),
    "llama4": (_NOPE, _SIGMOID_ROUTER),
    "llama4_text": (_NOPE, _SIGMOID_ROUTER),
}

# model_type -> ((fact, what megatron-core / the bridge lacks, when the config says so), ...): facts of one model
# type's *variants*, told apart by config.json. Baichuan (remote code only, model_type "baichuan" for every
# release): Baichuan-7B / Baichuan2-7B build RoPE from max_position_embeddings (modeling_baichuan.py
# RotaryEmbedding); Baichuan-13B / Baichuan2-13B state no max_position_embeddings (only model_max_length) and
# build ALiBi biases from it; Baichuan2 (its config class alone has z_loss_weight) L2-normalises the output
# layer's rows at inference (NormHead).
CONDITIONAL_FACTS: dict[str, tuple[tuple[str, str, Callable[[Mapping[str, Any]], bool]], ...]] = {
    "baichuan": (
        ("ALiBi", "ALiBi attention biases (Baichuan-13B / Baichuan2-13B: no max_position_embeddings in "
         "config.json): megatron-core 0.16.1 has no ALiBi position embedding",
         lambda config: config.get("max_position_embeddings") is None),
        ("NormHead", "an output layer whose rows are L2-normalised in the model code (Baichuan2's NormHead; its "
         "config class alone has z_loss_weight): megatron-core's output layer is a plain linear layer",
         lambda config: "z_loss_weight" in config),
    ),
}

# Multi-latent attention: transformers builds the latent norms (q_a_layernorm, kv_a_layernorm) with its RMSNorm's
# default eps 1e-6 in DeepSeek's code and its derivatives, but with config.rms_norm_eps in these model types;
# megatron-core's MLA uses the one layernorm_epsilon for every norm.
MLA_LATENT_NORM_EPS = 1e-6
MLA_LATENT_NORM_EPS_FROM_CONFIG = frozenset({"dots3_note", "glm5_next", "hy_v4_vl"})
# Model types whose modelling code never reads layer_norm_eps: their nn.LayerNorm(hidden) use torch's default
# (modeling_biogpt.py self_attn_layer_norm / final_layer_norm / layer_norm), whatever config.json says.
UNREAD_LAYER_NORM_EPS: dict[str, float] = {"biogpt": 1e-5}

ROUTED_EXPERT_ACTIVATION: dict[str, str] = {"aria_text": "silu", "aria": "silu"}
"""Model types whose routed experts use a fixed activation whatever ``hidden_act`` says (Aria: ``AriaExperts`` is
always SiLU-gated, its shared experts follow ``hidden_act``): megatron-core builds one activation for both."""

ENCODER_DECODER = frozenset({
    "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus", "plbart",
    "prophetnet", "t5", "mt5", "umt5", "longt5", "switch_transformers", "whisper", "encoder-decoder",
    "speech-encoder-decoder", "vision-encoder-decoder", "trocr", "moss_transcribe_diarize",
})
_NO_LM_HEAD = re.compile(
    r"(ForSequenceClassification|ForTokenClassification|ForQuestionAnswering|ForMultipleChoice|RewardModel|"
    r"ForRewardModeling|ForMaskedLM|ForPreTraining|Embedding|ForImageClassification|ForAudioClassification)$"
)


def _headless(arch: str) -> bool:
    """A classifier/reward/embedding head, or a bare ``XModel`` (no head at all); ``XLMHeadModel`` has one."""
    if _NO_LM_HEAD.search(arch):
        return True
    return arch.endswith("Model") and not arch.endswith(("LMHeadModel", "CausalLMModel"))


def scope_problem(config: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(code, message)`` when the checkpoint is out of scope for a causal-LM bridge, else None."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return ("scope.no-model-type", "out of scope: config.json has no model_type, so nothing says which "
                "architecture the weights belong to")
    if config.get("is_encoder_decoder") is True or model_type in ENCODER_DECODER:
        return ("scope.encoder-decoder", f"out of scope: {model_type!r} is an encoder-decoder model; mapgen "
                "converts decoder-only language models")
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and all(isinstance(a, str) and _headless(a) for a in archs):
        return ("scope.no-lm-head", f"out of scope: {', '.join(archs)} has no language-model head (classifier, "
                "reward or embedding model); mapgen converts causal language models")
    if model_type.endswith("_reward_model"):
        return ("scope.no-lm-head", f"out of scope: {model_type!r} is a reward model without a language-model head")
    return None
