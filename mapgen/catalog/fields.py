"""The catalog: every ``config.json`` key mapgen knows, one row each (see :mod:`mapgen.catalog.rows`).

``TOP`` holds the keys of a config (and of its ``text_config``: the same table applies to both levels);
``ROPE_PARAMETERS`` / ``ROPE_SCALING`` the keys inside those two RoPE objects. ``BRIDGE_READS`` is what
today's bridges read for a ModelSpec field and their fallback (``mapgen.contract.config.CONFIG``; a test keeps
them equal);
it decides when a spelling the bridge does not read still computes the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mapgen.catalog.model_types import (
    MLA_LATENT_NORM_EPS,
    MLA_LATENT_NORM_EPS_FROM_CONFIG,
    ROUTED_EXPERT_ACTIVATION,
    UNREAD_LAYER_NORM_EPS,
)
from mapgen.catalog.rows import (
    Check,
    Row,
    Scope,
    all_of,
    boolean,
    equals,
    falsy,
    fraction,
    inert,
    is_int,
    mapped,
    non_negative_int,
    one_of,
    positive_int,
    positive_number,
    refused,
    refused_all,
    structural,
)
from mapgen.contract.hf_config import ACTIVATIONS as HF_ACTIVATIONS
from mapgen.contract.hf_config import (
    CLAMPED_SWIGLU,
    EXPERT_COUNT_READS,
    QUICK_GELU_ALPHA,
    SHARED_COUNT_READS,
    SHARED_SIZE_READS,
    TOP_K_READS,
    HFConfig,
    activation,
    computed_activation,
    no_rope_layers,
    softmax_scale,
    window_layers,
    window_size,
)
from mapgen.contract.routing import READS, RouterScheme, routing
from mapgen.errors import MapgenError
from mapgen.families.model_types import router_for

TEXT_CONFIG_PREFIX = "text_config."

# transformers' ACT2FN names (a drift test keeps them equal to the installed transformers).
ACTIVATIONS = frozenset({
    "gelu", "gelu_10", "gelu_accurate", "gelu_fast", "gelu_new", "gelu_python", "gelu_python_tanh",
    "gelu_pytorch_tanh", "hardswish", "laplace", "leaky_relu", "linear", "mish", "prelu", "quick_gelu", "relu",
    "relu2", "relu6", "sigmoid", "silu", "sqrtsoftplus", "swish", "tanh", "xielu",
})
# transformers' ROPE_INIT_FUNCTIONS names, plus "default" and the legacy spellings transformers still reads.
ROPE_TYPES = frozenset({"default", "dynamic", "linear", "llama3", "longrope", "proportional", "yarn", "mrope", "su"})
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# ModelSpec field -> (config names the bridge tries in order, the bridge's fallback): mirrors
# mapgen.contract.config.CONFIG.
BRIDGE_READS: dict[str, tuple[tuple[str, ...], Any]] = {
    "num_layers": (("num_hidden_layers", "n_layer"), None),
    "hidden_size": (("hidden_size", "n_embd"), None),
    "num_attention_heads": (("num_attention_heads", "n_head"), None),
    "num_query_groups": (("num_key_value_heads", "num_attention_heads", "n_head"), None),
    "ffn_hidden_size": (("intermediate_size", "moe_intermediate_size", "n_inner", "ffn_dim"), None),
    "vocab_size": (("vocab_size",), None),
    "max_position_embeddings": (("max_position_embeddings", "n_positions"), 4096),
    "rotary_base": (("rope_theta", "rope_parameters.rope_theta"), 10000.0),
    "rotary_percent": (("partial_rotary_factor", "rope_parameters.partial_rotary_factor", "rotary_pct", "rope_pct"),
                       1.0),
    "norm_epsilon": (("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon"), 1e-6),
    "num_moe_experts": (EXPERT_COUNT_READS, None),
    "moe_router_topk": (TOP_K_READS, None),
    "moe_ffn_hidden_size": (("moe_intermediate_size", "intermediate_size"), None),
    "moe_shared_expert_intermediate_size": (SHARED_SIZE_READS, None),  # else count x moe_intermediate_size
    "linear_num_key_heads": (("linear_num_key_heads",), None),
    "linear_num_value_heads": (("linear_num_value_heads",), None),
    "linear_key_head_dim": (("linear_key_head_dim",), None),
    "linear_value_head_dim": (("linear_value_head_dim",), None),
    "linear_conv_kernel_dim": (("linear_conv_kernel_dim",), None),
    "q_lora_rank": (("q_lora_rank",), None),
    "kv_lora_rank": (("kv_lora_rank",), None),
    "qk_head_dim": (("qk_nope_head_dim",), None),
    "qk_pos_emb_head_dim": (("qk_rope_head_dim",), None),
    "v_head_dim": (("v_head_dim",), None),
}
# Fields whose bridge fallback differs from transformers' default change the model when the key is absent.
SEMANTIC_FALLBACKS = ("rotary_base", "rotary_percent", "norm_epsilon")


def bridge_value(scope: Scope, field: str) -> Any:
    """The value today's bridge computes for ModelSpec ``field`` from this config (its own fallback when the
    config has none of the names: transformers' defaults are not consulted, which is the point)."""
    names, fallback = BRIDGE_READS[field]
    return scope.lookup(*names, default=fallback, config_only=True)


def agrees_with_bridge(field: str) -> Check:
    """For a second spelling the bridge also reads: refused when it disagrees with the value the bridge takes
    (an earlier spelling in ``BRIDGE_READS`` wins)."""

    def check(value: Any, scope: Scope) -> str | None:
        taken = bridge_value(scope, field)
        return None if value == taken else f"disagrees with the {field} the bridge reads ({taken!r})"

    return check


def same_as_bridge(field: str) -> Any:
    """Inert-equivalent when the value equals what the bridge reads for ``field`` from its own spelling."""

    def same(v: Any, scope: Scope) -> bool:
        if v is None:
            return True
        ref = bridge_value(scope, field)
        try:
            return ref is not None and abs(float(v) - float(ref)) <= 1e-12 * max(1.0, abs(float(ref)))
        except (TypeError, ValueError):
            return bool(v == ref)

    return same


# ---------------------------------------------------------------------------------------------------------
# Value rules shared by several rows
# ---------------------------------------------------------------------------------------------------------
def _heads_divide(v: Any, scope: Scope) -> str | None:
    problem = positive_int(v, scope)
    if problem or v is None:
        return problem
    heads = scope.get("num_attention_heads")
    if is_int(heads) and heads > 0 and heads % v:
        return f"must divide num_attention_heads={heads}, got {v}"
    return None


def _mla_kv_heads(v: Any, scope: Scope) -> str | None:
    """MLA expands its latent to keys and values for every query head; transformers then repeats them
    num_attention_heads / num_key_value_heads times (which only runs when the two are equal)."""
    heads = scope.lookup("num_attention_heads")
    if scope.lookup("kv_lora_rank") is None or v is None or v == heads:
        return None
    return (f"multi-latent attention with num_key_value_heads={v} != num_attention_heads={heads}: MLA has a key and "
            "value per query head (transformers would repeat them)")


def _mla_latent_eps(v: Any, scope: Scope) -> str | None:
    if scope.lookup("kv_lora_rank") is None or v is None or scope.model_type in MLA_LATENT_NORM_EPS_FROM_CONFIG:
        return None
    if isinstance(v, int | float) and abs(float(v) - MLA_LATENT_NORM_EPS) <= 1e-15:
        return None
    return (f"rms_norm_eps={v} while {scope.model_type}'s MLA latent norms (q_a_layernorm, kv_a_layernorm) use eps "
            f"{MLA_LATENT_NORM_EPS} in transformers' code: megatron-core's MLA has one norm epsilon for both")


def _unread_layer_norm_eps(v: Any, scope: Scope) -> str | None:
    fixed = UNREAD_LAYER_NORM_EPS.get(scope.model_type)
    if fixed is None or v is None or (isinstance(v, int | float) and abs(float(v) - fixed) <= 1e-15):
        return None
    return (f"layer_norm_eps={v} is not read by {scope.model_type}'s modelling code (its LayerNorms use {fixed}); the "
            "bridge would build the config's value")


def _topk(v: Any, scope: Scope) -> str | None:
    problem = positive_int(v, scope)
    if problem or v is None:
        return problem
    experts = scope.lookup(*EXPERT_COUNT_READS)
    if is_int(experts) and experts > 0 and v > experts:
        return f"must not exceed the number of experts ({experts}), got {v}"
    return None


def _router_scheme(scope: Scope) -> RouterScheme:
    """The router scheme of the scope's model type (a text config's, then its wrapper's)."""
    types = [scope.model_type] + ([scope.parent.model_type] if scope.parent is not None else [])
    return router_for(types)


def _routing_limit(key: str) -> Check:
    """A refusal for ``key`` when :func:`mapgen.contract.routing.routing` (what the bridge builds) cannot
    reproduce this config's routing because of it."""

    def limit(v: Any, scope: Scope) -> str | None:
        topk = scope.lookup(*TOP_K_READS)
        if not is_int(topk) or topk <= 0:
            return None
        experts = scope.lookup(*EXPERT_COUNT_READS)
        _, gaps = routing(_router_scheme(scope), scope.lookup, topk=topk,
                          num_experts=experts if is_int(experts) else None)
        reasons = [g.reason for g in gaps if g.key == key]
        return "; ".join(reasons) if reasons else None

    return limit


def _routing_unread(key: str) -> Check:
    """Why a routing key is inert for this model type: its router code never reads it."""

    def unread(v: Any, scope: Scope) -> str | None:
        scheme = _router_scheme(scope)
        return None if key in READS[scheme] else (
            f"not read by {scope.model_type}'s router (mapgen.contract.routing scheme {scheme!r})")

    return unread


def _activation(v: Any, scope: Scope) -> str | None:
    if v is None:
        return None
    return None if isinstance(v, str) and v in ACTIVATIONS else (
        f"is not an activation transformers knows ({v!r}; known: silu, gelu, gelu_pytorch_tanh, relu, ...)")


# -- what the bridge derives (config.json only) against what transformers computes (config.json over its class
# defaults): the bridge's own derivations (mapgen.contract.hf_config) run on both views; a difference is a refusal
def _base(scope: Scope) -> Scope:
    """The config level (top or text_config) a nested scope (rope_parameters.) belongs to."""
    while scope.parent is not None and scope.prefix != TEXT_CONFIG_PREFIX:
        scope = scope.parent
    return scope


def _view(scope: Scope, *, with_defaults: bool) -> HFConfig:
    base = _base(scope)

    def level(s: Scope) -> dict[str, Any]:
        return {**s.defaults, **s.values} if with_defaults else dict(s.values)

    if base.parent is None:
        return HFConfig(level(base))
    return HFConfig({**level(base.parent), "text_config": level(base)})


def _derived(fn: Callable[[HFConfig], Any], scope: Scope) -> tuple[Any, Any, str]:
    """``(bridge's value, transformers' value, problem)`` of a derivation."""
    try:
        bridge = fn(_view(scope, with_defaults=False))
    except (MapgenError, TypeError, ValueError) as exc:
        message = exc.diagnostics[0].message if isinstance(exc, MapgenError) else str(exc)
        return None, None, message
    try:
        truth = fn(_view(scope, with_defaults=True))
    except (MapgenError, TypeError, ValueError):
        truth = bridge
    return bridge, truth, ""


def _windows(hf: HFConfig) -> tuple[Any, ...]:
    return window_size(hf), window_layers(hf)


def _window_used(scope: Scope) -> bool:
    _, truth, _ = _derived(_windows, scope)
    return bool(truth and truth[0] is not None)


def _bridge_agrees(fn: Callable[[HFConfig], Any], what: str, differ: Callable[[Any, Any], str]) -> Check:
    """A limit: the bridge's derivation ``fn`` must succeed on config.json and agree with transformers' view."""

    def check(v: Any, scope: Scope) -> str | None:
        bridge, truth, problem = _derived(fn, scope)
        if problem:
            return f"{what} the bridge cannot lay out: {problem}"
        return differ(truth, bridge) if bridge != truth else None

    return check


_window_limit = _bridge_agrees(_windows, "sliding windows", lambda truth, bridge: (
    f"transformers' defaults for keys absent from config.json give window {truth[0]} on layers "
    f"{_layers(truth[1])}; the bridge reads window {bridge[0]} on layers {_layers(bridge[1])} (write the keys into "
    "config.json)"))
_nope_limit = _bridge_agrees(no_rope_layers, "NoPE layers", lambda truth, bridge: (
    f"transformers' defaults give layers without RoPE {_layers(truth)}; the bridge reads {_layers(bridge)} "
    "(write no_rope_layers into config.json)"))
_scale_limit = _bridge_agrees(softmax_scale, "an attention scale", lambda truth, bridge: (
    f"absent from config.json: transformers scales attention scores by {truth}, the bridge by "
    f"{'1/sqrt(head_dim)' if bridge is None else bridge}"))


def _activation_limit(v: Any, scope: Scope) -> str | None:
    if v is None:
        return None
    name = computed_activation(str(v), scope.model_type)
    if name not in HF_ACTIVATIONS:
        return (f"activation {name!r}: megatron-core builds the MLP with silu, gelu, the tanh GELU, relu, squared "
                "relu or quick_gelu only (mapgen.contract.hf_config.ACTIVATIONS)")
    named = {k: HF_ACTIVATIONS.get(computed_activation(str(scope.values[k]), scope.model_type))
             for k in ("hidden_act", "hidden_activation", "activation_function") if scope.values.get(k) is not None}
    if len(set(named.values())) > 1:
        return f"the config names different activations ({named}); which one the model code reads is not known here"
    bridge, truth, problem = _derived(activation, scope)
    if problem:
        return problem
    if bridge != truth:
        return f"absent from config.json: transformers computes {truth}, the bridge would build {bridge}"
    return _routed_expert_activation(name, scope)


def _routed_expert_activation(name: str, scope: Scope) -> str | None:
    """Refused where the model type's routed experts ignore the configured activation (Aria) and it differs."""
    fixed = ROUTED_EXPERT_ACTIVATION.get(scope.model_type or "")
    if fixed is None or HF_ACTIVATIONS.get(name) == HF_ACTIVATIONS.get(fixed):
        return None
    return (f"{scope.model_type}'s routed experts compute {fixed} whatever this says, its shared experts {name}: "
            "megatron-core builds one activation for both")


def _layers(flags: Any) -> str:
    if not flags:
        return "none"
    return ",".join(str(i) for i, f in enumerate(flags) if f) or "none"


def _flag_list(v: Any, scope: Scope) -> str | None:
    if v is None:
        return None
    if not isinstance(v, list) or not all(x in (0, 1) and not isinstance(x, float) for x in v):
        return f"must be a list of 0/1 flags, one per layer, got {v!r}"
    n = scope.get("num_hidden_layers")
    if is_int(n) and len(v) != n:
        return f"has {len(v)} entries for num_hidden_layers={n}"
    return None


def _mrope_valid(v: Any, scope: Scope) -> str | None:
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != 3 or not all(is_int(x) and x > 0 for x in v):
        return f"must list three positive section sizes (temporal, height, width), got {v!r}"
    dims = _rotary_dims(_base(scope))
    if dims is not None and 2 * sum(v) != dims:
        return f"sections sum to {sum(v)} rotary pairs, the model rotates {dims} dims ({dims // 2} pairs)"
    return None


_KNOWN_LAYER_TYPES = frozenset({"full_attention", "linear_attention", "sliding_attention"})


def _layer_types_limit(v: Any, scope: Scope) -> str | None:
    if not isinstance(v, list):
        return None
    other = sorted({str(k) for k in v} - _KNOWN_LAYER_TYPES)
    return f"layer type(s) {', '.join(other)}: the bridge builds attention and gated delta-net layers only" if other \
        else None


def _layer_types_valid(v: Any, scope: Scope) -> str | None:
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(k, str) for k in v):
        return f"must be a list of layer type names, got {v!r}"
    n = scope.get("num_hidden_layers")
    if is_int(n) and len(v) != n:
        return f"has {len(v)} entries for num_hidden_layers={n}"
    return None


def _int_list(v: Any, _: Scope) -> str | None:
    if v is None:
        return None
    return None if isinstance(v, list) and all(is_int(x) and x >= 0 for x in v) else (
        f"must be a list of layer indices, got {v!r}")


def _quantization_limit(v: Any, scope: Scope) -> str | None:
    """Block-scaled FP8 converts (scan validates its details and the scale tensors); nothing else does."""
    if not v:
        return None
    method = v.get("quant_method") if isinstance(v, Mapping) else None
    if method == "fp8" and v.get("weight_block_size"):
        return None
    if method == "mxfp4":  # scan checks the fields and every blocks/scales pair
        return None
    return (f"quantized weights ({method or v!r}): mapgen reads floating-point, block-scaled FP8 and MXFP4 "
            "checkpoints only")


def _rope_dict(v: Any, scope: Scope) -> str | None:
    if v is None:
        return None
    if not isinstance(v, Mapping):
        return f"must be an object, got {v!r}"
    kind = v.get("rope_type", v.get("type", "default"))
    if kind not in ROPE_TYPES:
        return f"has an unknown RoPE type {kind!r} (known: {', '.join(sorted(ROPE_TYPES))})"
    return None


def _rope_limit(v: Any, scope: Scope) -> str | None:
    """Mirrors the bridge helper ``_rope``: plain RoPE and Llama-3 scaling with default factors are built."""
    if not isinstance(v, Mapping):
        return None
    kind = v.get("rope_type") or v.get("type") or "default"
    if kind == "default":
        return None
    if kind == "llama3":
        off = {k: v[k] for k, d in LLAMA3_DEFAULTS.items() if k in v and v[k] != d}
        return None if not off else (
            f"Llama-3 RoPE scaling with {off}: megatron-core's GPTModel rope_scaling fixes low/high frequency "
            "factors 1/4 over 8192 original positions")
    if kind == "yarn":
        return _yarn_limit(v, scope)
    if kind == "mrope":  # Qwen2.5-VL's legacy spelling: plain frequencies, M-RoPE by mrope_section
        return None if v.get("mrope_section") is not None else "RoPE type 'mrope' without an mrope_section"
    return (f"RoPE scaling {kind!r}: no megatron-core equivalent wired into ModelSpec (Llama-3 scaling and YaRN "
            "are)")


def _yarn_limit(v: Mapping[str, Any], scope: Scope) -> str | None:
    """YaRN as the bridge judges it (imported here: only YaRN configs pay for the contract package in scan):
    multi-latent attention builds its own, standard attention GPTModel's position_embedding_type="yarn"."""
    from mapgen.contract.hf_config import mla_yarn_problem, yarn_problem

    if scope.lookup("kv_lora_rank") is not None:
        return mla_yarn_problem(v, scope.lookup("max_position_embeddings"))
    return yarn_problem(v, scope.lookup("max_position_embeddings"),
                        scope.lookup("partial_rotary_factor", "rope_parameters.partial_rotary_factor"))


def _clamped_swiglu_limit(key: str) -> Check:
    """gpt-oss's clamped SwiGLU keys: mapped for the model types whose formula is known (hf_config.CLAMPED_SWIGLU),
    refused for any other model type that sets them."""

    def limit(v: Any, scope: Scope) -> str | None:
        if v is None or v is False or v == 0:
            return None
        if _base(scope).model_type not in CLAMPED_SWIGLU:
            return (f"{key} of model type {_base(scope).model_type!r}: only gpt-oss's clamped SwiGLU (gate clamped "
                    "above, up clamped both sides, (up + 1) * gate * sigmoid(alpha * gate)) is known to mapgen")
        if key == "swiglu_alpha" and v != QUICK_GELU_ALPHA:
            return (f"swiglu_alpha={v!r}: megatron-core's gated activation with a sigmoid gain is quick_gelu, "
                    f"x * sigmoid({QUICK_GELU_ALPHA} x)")
        return None

    return limit


# ---------------------------------------------------------------------------------------------------------
# The top-level table (also applied to text_config)
# ---------------------------------------------------------------------------------------------------------
_DIMS = "sizes the Megatron model"
_STRUCT = "read from the checkpoint's keys (scan cross-checks the config against them)"
_INTERLEAVED_MROPE = ("interleaved M-RoPE (Qwen3-VL, Qwen3.5): built as plain RoPE, which equals it on text "
                      "(t = h = w positions); megatron-core 0.16.1 has no interleaved M-RoPE, so multimodal "
                      "positions are not reproduced")

TOP: tuple[Row, ...] = (
    # -- dimensions the bridge reads ------------------------------------------------------------------------
    mapped("num_hidden_layers", "num_layers", why=_DIMS, valid=positive_int),
    mapped("hidden_size", "hidden_size", why=_DIMS, valid=positive_int),
    mapped("num_attention_heads", "num_attention_heads", "num_query_groups", "kv_channels", why=_DIMS,
           valid=positive_int),
    mapped("num_key_value_heads", "num_query_groups", why="GQA groups", valid=_heads_divide, limit=_mla_kv_heads),
    mapped("head_dim", "kv_channels", why=_DIMS, valid=positive_int),
    mapped("intermediate_size", "ffn_hidden_size", "moe_ffn_hidden_size", why=_DIMS, valid=positive_int),
    mapped("moe_intermediate_size", "moe_ffn_hidden_size", "ffn_hidden_size", "moe_shared_expert_intermediate_size",
           why=_DIMS, valid=positive_int),
    mapped("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size", why=_DIMS,
           valid=non_negative_int),
    mapped("vocab_size", "vocab_size", why=_DIMS, valid=positive_int),
    mapped("max_position_embeddings", "max_position_embeddings", why="RoPE table length (no learned positions)",
           valid=positive_int),
    mapped("num_experts", "num_moe_experts", why=_DIMS, valid=positive_int),
    mapped("num_local_experts", "num_moe_experts", why=_DIMS, valid=positive_int),
    mapped("n_routed_experts", "num_moe_experts", why=_DIMS, valid=positive_int),
    mapped("num_experts_per_tok", "moe_router_topk", why="routed experts per token", valid=_topk,
           limit=_routing_limit("num_experts_per_tok")),
    mapped("moe_topk", "moe_router_topk", why="routed experts per token (Aria spelling)", valid=_topk,
           limit=all_of(agrees_with_bridge("moe_router_topk"), _routing_limit("num_experts_per_tok"))),
    mapped("linear_num_key_heads", "linear_num_key_heads", why=_DIMS, valid=positive_int),
    mapped("linear_num_value_heads", "linear_num_value_heads", why=_DIMS, valid=positive_int),
    mapped("linear_key_head_dim", "linear_key_head_dim", why=_DIMS, valid=positive_int),
    mapped("linear_value_head_dim", "linear_value_head_dim", why=_DIMS, valid=positive_int),
    mapped("linear_conv_kernel_dim", "linear_conv_kernel_dim", why=_DIMS, valid=positive_int),
    mapped("rms_norm_eps", "norm_epsilon", why="norm epsilon", valid=positive_number, limit=_mla_latent_eps),
    mapped("layer_norm_eps", "norm_epsilon", why="norm epsilon", valid=positive_number, limit=_unread_layer_norm_eps),
    mapped("rope_theta", "rotary_base", why="RoPE base", valid=positive_number),
    mapped("partial_rotary_factor", "rotary_percent", why="fraction of head dims rotated", valid=fraction),
    mapped("rope_parameters", "rotary_base", "rotary_percent", "rope_scaling", "rope_scaling_factor",
           why="RoPE (transformers 5 spelling)", valid=_rope_dict, limit=_rope_limit),
    mapped("rope_scaling", "rope_scaling", "rope_scaling_factor", why="RoPE scaling", valid=_rope_dict,
           limit=_rope_limit),
    # -- structure: the keys decide, scan cross-checks ------------------------------------------------------
    structural("tie_word_embeddings", "untie_embeddings_and_output_weights", why=_STRUCT, valid=boolean),
    structural("layer_types", "layer_kinds", why=_STRUCT + "; sliding windows are judged by sliding_window",
               valid=_layer_types_valid, limit=_layer_types_limit),
    structural("full_attention_interval", "layer_kinds", why=_STRUCT, valid=positive_int),
    structural("mlp_only_layers", "mlp_kinds", why=_STRUCT, valid=_int_list),
    structural("decoder_sparse_step", "mlp_kinds", why=_STRUCT, valid=non_negative_int),
    structural("first_k_dense_replace", "mlp_kinds", why=_STRUCT, valid=non_negative_int),
    structural("moe_layer_freq", "mlp_kinds", why=_STRUCT + " (DeepSeek's remote code: every n-th layer after "
               "first_k_dense_replace is MoE)", valid=positive_int),
    structural("num_nextn_predict_layers", "mtp_num_layers", why=_STRUCT, valid=non_negative_int),
    structural("mtp_num_hidden_layers", "mtp_num_layers", why=_STRUCT, valid=non_negative_int),
    structural("attention_bias", "add_qkv_bias", "add_bias_linear", why=_STRUCT + "; partial biases are refused "
               "by the planner", valid=boolean),
    structural("bias", "add_qkv_bias", "add_bias_linear", why=_STRUCT, valid=boolean),
    structural("use_qkv_bias", "add_qkv_bias", why=_STRUCT, valid=boolean),
    structural("qkv_bias", "add_qkv_bias", why=_STRUCT, valid=boolean),
    structural("mlp_bias", "add_bias_linear", why=_STRUCT + "; MLP biases are refused by the planner",
               valid=boolean),
    structural("use_qk_norm", "qk_layernorm", why=_STRUCT, valid=boolean),
    structural("attn_output_gate", "attention_output_gate", why=_STRUCT, valid=boolean),
    *(mapped(name, "moe_shared_expert_intermediate_size", why="the shared expert is this many routed experts' size "
             "(hf_config.shared_expert_size)", valid=non_negative_int) for name in SHARED_COUNT_READS),
    # -- refused where the value changes the maths ----------------------------------------------------------
    *(mapped(name, "activation", why="MLP activation (megatron-core activation_func)", valid=_activation,
             limit=_activation_limit, default=True)
      for name in ("hidden_act", "hidden_activation", "activation_function")),
    mapped("norm_topk_prob", "moe_router_pre_softmax", "moe_router_score_function", why="top-k weights "
           "renormalised or not (mapgen.contract.routing)", valid=boolean, limit=_routing_limit("norm_topk_prob"),
           unread=_routing_unread("norm_topk_prob"),
           default=True),
    mapped("routed_scaling_factor", "moe_router_topk_scaling_factor", why="routed-expert weights scaled",
           valid=positive_number, limit=_routing_limit("routed_scaling_factor"),
           unread=_routing_unread("routed_scaling_factor"), default=True),
    refused("route_scale", "routed-expert weights scaled (moe_router_topk_scaling_factor not set by the bridge)",
            unless=equals(1, 1.0), valid=positive_number),
    refused("scoring_func", "router scores: the bridge picks sigmoid only from an expert-bias tensor "
            "(ModelSpec.moe_router_score_function is not read from the config)",
            unless=lambda v, s: equals("softmax")(v, s) or _router_scheme(s) != "",
            valid=one_of("softmax", "sigmoid", "sqrtsoftplus")),
    mapped("topk_method", "moe_router_num_groups", "moe_router_group_topk", why="greedy or group-limited top-k",
           limit=_routing_limit("topk_method"),
           unread=_routing_unread("topk_method"), default=True),
    mapped("n_group", "moe_router_num_groups", why="group-limited routing: expert groups",
           valid=non_negative_int, limit=_routing_limit("n_group"),
           unread=_routing_unread("n_group"), default=True),
    mapped("topk_group", "moe_router_group_topk", why="group-limited routing: groups selected per token",
           valid=non_negative_int, limit=_routing_limit("topk_group"),
           unread=_routing_unread("topk_group"), default=True),
    mapped("sliding_window", "window_size", "window_layers", why="sliding-window attention (megatron-core "
           "window_size=(sliding_window - 1, 0), window_attn_skip_freq per layer)", valid=non_negative_int,
           limit=_window_limit, default=True),
    mapped("use_sliding_window", "window_size", why="switches sliding_window on (Qwen2/Qwen3/SmolLM3 configs)",
           valid=boolean),
    mapped("max_window_layers", "window_layers", why="Qwen2 layers from this index on are windowed (when "
           "config.json has no layer_types)", valid=non_negative_int, default=True),
    mapped("no_rope_layers", "no_rope_layers", why="layers without RoPE (0 = NoPE; megatron-core no_rope_freq)",
           valid=_flag_list, limit=_nope_limit),
    mapped("no_rope_layer_interval", "no_rope_layers", why="every n-th layer without RoPE (when config.json has "
           "no no_rope_layers)", valid=positive_int, limit=_nope_limit, default=True),
    refused("embedding_multiplier", "embeddings scaled by a constant: no ModelSpec/megatron-core setting",
            unless=equals(1, 1.0)),
    mapped("attention_multiplier", "softmax_scale", why="attention scores scale (megatron-core softmax_scale)",
           valid=positive_number, limit=_scale_limit, default=True),
    refused("residual_multiplier", "residual branches scaled by a constant: no megatron-core setting",
            unless=equals(1, 1.0)),
    refused("logits_scaling", "logits divided by a constant: no megatron-core setting", unless=equals(1, 1.0)),
    refused("logit_scale", "logits multiplied by a constant: no megatron-core setting", unless=equals(1, 1.0)),
    refused("attn_logit_softcapping", "attention logit soft-capping: no megatron-core setting", unless=falsy),
    refused("final_logit_softcapping", "final logit soft-capping: no megatron-core setting", unless=falsy),
    mapped("query_pre_attn_scalar", "softmax_scale", why="attention scores scaled by query_pre_attn_scalar**-0.5 "
           "(megatron-core softmax_scale)", valid=positive_number, limit=_scale_limit, default=True),
    refused("rope_local_base_freq", "a second RoPE base for local layers: the bridge has one rotary_base",
            unless=lambda v, s: v is None or not _window_used(s) or v == bridge_value(s, "rotary_base")),
    refused("alibi", "ALiBi positions: the bridge builds RoPE", unless=falsy, valid=boolean),
    refused("parallel_attn", "attention and MLP in parallel from one norm: the bridge builds sequential blocks",
            unless=falsy, valid=boolean),
    refused("use_parallel_residual", "parallel attention/MLP residual: the bridge builds sequential blocks",
            unless=falsy, valid=boolean),
    refused("new_decoder_architecture", "Falcon's decoder block (separate attention/MLP input norms in parallel): "
            "the bridge builds sequential pre-norm blocks", unless=falsy, valid=boolean),
    mapped("multi_query", "num_query_groups", why="one KV head for every query head (GPT-BigCode; Falcon's old "
           "decoder): num_query_groups 1 (hf_config.query_groups)", valid=boolean),
    refused("num_kv_heads", "a KV-head spelling the bridge does not read (it reads num_key_value_heads)",
            unless=same_as_bridge("num_query_groups"), valid=positive_int),
    refused("num_heads", "a head-count spelling the bridge does not read (it reads num_attention_heads)",
            unless=same_as_bridge("num_attention_heads"), valid=positive_int),
    mapped("layer_norm_epsilon", "norm_epsilon", why="norm epsilon (Falcon/GPT-2 spelling)", valid=positive_number,
           limit=agrees_with_bridge("norm_epsilon")),
    mapped("norm_eps", "norm_epsilon", why="norm epsilon (StableLM-Epoch spelling)", valid=positive_number,
           limit=agrees_with_bridge("norm_epsilon")),
    mapped("norm_epsilon", "norm_epsilon", why="norm epsilon (StarCoder2 spelling)", valid=positive_number,
           limit=agrees_with_bridge("norm_epsilon")),
    refused("rotary_emb_base", "a RoPE-base spelling the bridge does not read (rope_theta)",
            unless=same_as_bridge("rotary_base"), valid=positive_number),
    mapped("rotary_pct", "rotary_percent", why="fraction of head dims rotated (GPT-NeoX spelling)", valid=fraction,
           limit=agrees_with_bridge("rotary_percent")),
    mapped("rope_pct", "rotary_percent", why="fraction of head dims rotated (StableLM-Epoch spelling)",
           valid=fraction, limit=agrees_with_bridge("rotary_percent")),
    refused("rotary_scaling_factor", "RoPE scaling (StableLM spelling): not read by the bridge",
            unless=equals(1, 1.0)),
    refused("experts_per_token", "a top-k spelling the bridge does not read (num_experts_per_tok)",
            unless=same_as_bridge("moe_router_topk"), valid=positive_int),
    refused("mtp_use_dedicated_embeddings", "MTP layers with their own embedding table: the bridge shares the "
            "main embedding", unless=falsy, valid=boolean),
    mapped("swiglu_limit", "activation_func_clamp_value", why="gpt-oss's clamped SwiGLU: gate clamped above, up "
           "clamped to [-limit, limit] (megatron-core activation_func_clamp_value, glu_linear_offset 1)",
           valid=positive_number, limit=_clamped_swiglu_limit("swiglu_limit"), default=True),
    mapped("swiglu_alpha", "activation", why="gpt-oss's clamped SwiGLU: the sigmoid gain of gate * sigmoid(alpha * "
           "gate) (megatron-core quick_gelu at 1.702)", valid=positive_number,
           limit=_clamped_swiglu_limit("swiglu_alpha"), default=True),
    structural("quantization_config", why="block-scaled FP8 weights (quant_method fp8 with weight_block_size, "
               "e4m3, dynamic activation scales: DeepSeek-V3/R1, Kimi-K2) are dequantized while read, as "
               "transformers dequantizes them; scan checks every scale against its weight; MXFP4 experts (quant_method "
               "mxfp4: X_blocks + X_scales, gpt-oss) likewise", limit=_quantization_limit),
    refused("quantization", "quantized weights (MLX): mapgen converts floating-point checkpoints only",
            unless=falsy),
    refused("use_bidirectional_attention", "bidirectional attention: the bridge builds a causal decoder",
            unless=falsy, valid=boolean),
    refused("is_encoder_decoder", "encoder-decoder model: out of scope", unless=falsy, valid=boolean, default=False),
    # -- families and block shapes the bridge does not build -----------------------------------------------
    # -- multi-latent attention (MLA layers: the keys decide the family, these size it) ------------------------
    mapped("q_lora_rank", "q_lora_rank", why=_DIMS + " (null: a full-rank q_proj)", valid=positive_int),
    mapped("kv_lora_rank", "kv_lora_rank", why=_DIMS, valid=positive_int),
    mapped("qk_nope_head_dim", "qk_head_dim", why=_DIMS, valid=positive_int),
    mapped("qk_rope_head_dim", "qk_pos_emb_head_dim", why=_DIMS, valid=positive_int),
    mapped("v_head_dim", "v_head_dim", why=_DIMS, valid=positive_int),
    refused("qk_head_dim", "a q/k head size other than qk_nope_head_dim + qk_rope_head_dim (what MLA builds)",
            unless=lambda v, s: v is None or v == _mla_qk_head_dim(s), valid=positive_int,
            default=False),  # absent: transformers derives it from the two (its class default is 128 + 64)
    refused("rope_interleave", "MLA RoPE dims stored in halves: megatron-core's MLA de-interleaves pairs, as "
            "DeepSeek's interleaved weights need", unless=equals(True), valid=boolean),
    *refused_all("DeepSeek sparse-attention indexer: not built by the bridge", "index_n_heads", "index_head_dim",
                 "index_topk", "indexer_types"),
    *refused_all("state-space (Mamba) layers: the bridge builds attention and gated delta-net layers only",
                 "mamba_d_conv", "mamba_d_state", "mamba_expand", "mamba_proj_bias", "mamba_conv_bias",
                 "mamba_chunk_size", "mamba_n_heads", "mamba_n_groups", "mamba_d_head", "mamba_dt_rank",
                 "time_step_min", "time_step_max", "time_step_floor", "time_step_limit", "time_step_rank",
                 "time_step_scale", "time_step_init_scheme", "use_conv_bias", "conv_kernel", "expand", "state_size",
                 "layers_block_type", "attn_layer_period", "attn_layer_offset", "n_mamba_heads"),
    *refused_all("encoder-decoder / cross-attention structure: out of scope", "add_cross_attention", "d_model",
                 "decoder_layers", "encoder_layers", "decoder_ffn_dim", "encoder_ffn_dim", "decoder_attention_heads",
                 "encoder_attention_heads"),
    *refused_all("token-type embeddings (BERT-style): not built by the bridge", "type_vocab_size"),
    # Granite-SWA: per-layer RoPE bases (0: that layer has no RoPE); the config class fills it with rope_theta
    refused("layer_rope_theta", "a per-layer RoPE base (0: no RoPE on that layer) other than rope_theta: the bridge "
            "has one rotary_base", unless=lambda v, s: v is None or (
                isinstance(v, list) and all(t == bridge_value(s, "rotary_base") for t in v))),
    *refused_all("a second attention shape for sliding-window layers: not built by the bridge",
                 "swa_num_key_value_heads", "swa_num_attention_heads", "swa_head_dim", "sliding_window_size"),
    *refused_all("clamped/soft-capped activations or projections: no megatron-core setting",
                 "clip_qkv", "mlp_gate_softcap", "mlp_up_softcap"),
    *refused_all("embeddings scaled by sqrt(d_model): no megatron-core setting", "scale_embedding"),
    *refused_all("attention scaled by the inverse layer index: no megatron-core setting",
                 "scale_attn_by_inverse_layer_idx"),
    *refused_all("grouped expert routing under a spelling no transformers router reads (n_group/topk_group are "
                 "mapped)", "num_expert_group"),
    refused("scale_attn_weights", "attention without the 1/sqrt(head_dim) scale: the bridge always scales",
            unless=equals(True), valid=boolean),
    refused("moe_renormalize", "top-k probabilities not renormalised (see norm_topk_prob)", unless=equals(True),
            valid=boolean),
    refused("rotary_dim", "a rotary-dimension spelling the bridge does not read (partial_rotary_factor)",
            unless=lambda v, s: v is None or v == _rotary_dims(s), valid=positive_int),
    *(refused(name, f"a size spelling the bridge does not read (it reads {BRIDGE_READS[field][0][0]})",
              unless=same_as_bridge(field), valid=positive_int)
      for name, field in (("num_layers", "num_layers"),
                          ("n_layers", "num_layers"),
                          ("n_heads", "num_attention_heads"),
                          ("num_experts_per_token", "moe_router_topk"))),
    # GraniteMoeShared / GraniteMoE-Hybrid: the layer-level shared_mlp's size; 0 builds none (its keys then absent)
    mapped("shared_intermediate_size", "moe_shared_expert_intermediate_size", why=_DIMS, valid=non_negative_int),
    *(mapped(name, field, why=f"{what} (GPT-2 spelling)", valid=positive_int, limit=agrees_with_bridge(field))
      for name, field, what in (("n_embd", "hidden_size", "hidden size"), ("n_layer", "num_layers", "layers"),
                                ("n_head", "num_attention_heads", "attention heads"),
                                ("n_positions", "max_position_embeddings", "positions (wpe rows with learned "
                                 "positions)"))),
    mapped("ffn_dim", "ffn_hidden_size", why="MLP size (OPT spelling)", valid=positive_int,
           limit=agrees_with_bridge("ffn_hidden_size")),
    # OPT (modeling_opt.py): pre-norm blocks when do_layer_norm_before (OPT-350m's post-norm is refused), biases
    # decided by the keys, project_in/project_out only when word_embed_proj_dim differs from hidden_size
    refused("do_layer_norm_before", "a post-norm block (OPT-350m: LayerNorm after the attention / MLP residual "
            "add): megatron-core 0.16.1's TransformerLayer normalises sub-block inputs only", unless=equals(True),
            valid=boolean),
    refused("_remove_final_layer_norm", "no final LayerNorm (OPT's legacy flag): the bridge builds "
            "decoder.final_layernorm", unless=falsy, valid=boolean),
    refused("layer_norm_elementwise_affine", "LayerNorms without weight and bias: megatron-core's LayerNorm always "
            "has them", unless=equals(True), valid=boolean),
    refused("word_embed_proj_dim", "embeddings narrower than the hidden size (OPT project_in/project_out): "
            "megatron-core's LanguageModelEmbedding and output layer have no projection",
            unless=lambda v, s: v is None or v == s.lookup("hidden_size", "n_embd"), valid=positive_int),
    structural("enable_bias", "add_qkv_bias", "add_bias_linear", why=_STRUCT, valid=boolean),
    mapped("n_inner", "ffn_hidden_size", why="MLP size (GPT-2 spelling; null means 4 * n_embd, derived by the bridge)",
           valid=positive_int, limit=agrees_with_bridge("ffn_hidden_size")),
    refused("eps", "an epsilon spelling the bridge does not read (rms_norm_eps, layer_norm_eps)",
            unless=same_as_bridge("norm_epsilon"), valid=positive_number),
    structural("use_bias", "add_qkv_bias", "add_bias_linear", why=_STRUCT, valid=boolean),
    structural("attention_out_bias", "add_bias_linear", why=_STRUCT, valid=boolean),
    structural("lm_head_bias", "untie_embeddings_and_output_weights", why=_STRUCT + "; a head bias is unclassified",
               valid=boolean),
    structural("qk_layernorm", "qk_layernorm", why=_STRUCT, valid=boolean),
    structural("mlp_layer_types", "mlp_kinds", why=_STRUCT),
    structural("num_dense_layers", "mlp_kinds", why=_STRUCT, valid=non_negative_int),
    *inert("transformers' decoder flag: mapgen builds causal decoders (scope and keys decide the rest)",
           "is_decoder"),
    *inert("GPT-BigCode's softmax-precision switches: transformers' attention takes the softmax in fp32 "
           "whatever they say (modeling_gpt_bigcode.py stores them and never reads them)", "attention_softmax_in_fp32",
           "scale_attention_softmax_in_fp32"),
    *inert("kernel/implementation choice in transformers: same maths", "use_mamba_kernels", "use_mambapy",
           "use_associative_scan", "residual_in_fp32", "reorder_and_upcast_attn", "rescale_prenorm_residual"),
    *inert("sequence-summary head of classification models: not part of the causal LM", "summary_type",
           "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
           "summary_last_dropout"),
    *inert("context-length bookkeeping for tokenizers/generation", "model_max_length", "max_seq_len"),
    # -- inert: cannot change the converted model's outputs -------------------------------------------------
    *inert("a legacy flag transformers does not read: M-RoPE is decided by rope_parameters.mrope_section",
           "use_mrope"),
    *inert("token ids: tokenizer and prompting, not weights", "eod_token_id", "eoa_token_index", "bos_token_id",
           "eos_token_id", "pad_token_id",
           "sep_token_id", "decoder_start_token_id", "forced_eos_token_id", "forced_bos_token_id",
           "image_token_id", "video_token_id", "audio_token_id", "vision_start_token_id", "vision_end_token_id",
           "vision_token_id", "image_token_index", "video_token_index", "boi_token_index", "eoi_token_index",
           "boi_token_id", "eoi_token_id", "boa_token_id", "eoa_token_id", "mm_tokens_per_image"),
    *inert("storage dtype: mapgen keeps every tensor's stored dtype", "torch_dtype", "dtype"),
    *inert("provenance and identity: no effect on the weights' maths", "transformers_version", "_name_or_path",
           "model_type", "architectures", "_commit_hash"),
    *inert("remote-code pointers: mapgen never imports or runs checkpoint code", "auto_map", "custom_pipelines"),
    *inert("generation/tokenizer settings", "use_cache", "tokenizer_class", "max_length", "num_logits_to_keep",
           "attn_implementation", "_attn_implementation", "return_dict", "chunk_size_feed_forward",
           "output_hidden_states", "output_attentions", "output_router_logits", "torchscript", "problem_type",
           "prefix", "task_specific_params", "id2label", "label2id"),
    *inert("initialisation: only for training from scratch", "initializer_range", "embedding_initializer_range",
           "init_std",
           "initializer_factor"),
    *inert("dropout: inactive at inference; Megatron's is set by the training run", "attention_dropout",
           "hidden_dropout", "embd_pdrop", "resid_pdrop", "attn_pdrop", "classifier_dropout", "dropout",
           "activation_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "embedding_dropout",
           "emb_pdrop", "residual_dropout", "layerdrop", "decoder_layerdrop", "encoder_layerdrop"),
    *inert("auxiliary losses and router noise: training only (moe_aux_loss_coeff is the training run's)",
           "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "router_z_loss_coef", "router_jitter_noise"),
    *inert("tensor-parallel pretraining detail: the same maths at any value", "pretraining_tp"),
    *inert("Baichuan2's z-loss weight: training only (Baichuan2's NormHead is refused as a model-type fact)",
           "z_loss_weight"),
    *inert("expert-parallel size of DeepSeek's training code: how experts were placed, the same maths", "ep_size"),
    *inert("GDN state precision in transformers' kernel; the computation is the same", "mamba_ssm_dtype"),
    *inert("original context length: read only by YaRN/LongRoPE scaling, judged by rope_scaling",
           "original_max_position_embeddings", "initial_context_length"),
    *inert("reward-model pooling/classifier settings (the model itself is out of scope)", "pooling"),
    # -- issue 11 triage: keys of families scan classifies and the planner refuses by name -----------------------
    *inert("training-only noise / auxiliary loss (PhiMoE input_jitter_noise multiplies inputs only in training; "
           "JetMoE aux_loss_coef)", "input_jitter_noise", "aux_loss_coef"),
    *inert("initialisation of DiffLlama's lambda vectors: only for training from scratch", "lambda_std_dev"),
    structural("use_post_norm", why=_STRUCT + ": HyperCLOVA X post_norm1/post_norm2 (refused by the planner: "
               "megatron-core has no norm on a sub-block's output)", valid=boolean),
    # EXAONE-4 / Gemma-3: the pattern only derives layer_types when the config has none (configuration_*.py)
    *(refused(name, "a sliding-window layer pattern without layer_types: the bridge reads the windowed layers from "
              "layer_types", unless=lambda v, s: isinstance(s.lookup("layer_types"), list))
      for name in ("sliding_window_pattern", "_sliding_window_pattern")),
    *inert("dropout (GPT-Neo spellings): inactive at inference", "embed_dropout", "resid_dropout"),
    *refused_all("GPT-Neo's local-attention layer pattern and window (alternating global/local layers): the bridge "
                 "reads windowed layers from layer_types", "attention_types", "attention_layers", "window_size"),
    refused("afn", "GPT-1's activation spelling: the bridge reads hidden_act / activation_function"),
    refused("intermediate_multiple_size", "an MLP size given as a multiple of hidden_size (GPT-NeoX-Japanese): the "
            "bridge reads intermediate_size", valid=positive_number),
    refused("kv_channels", "JetMoE's head size of its mixture-of-attention heads (megatron-core cannot build MoA; "
            "the planner refuses the layout)", valid=positive_int),
    refused("block_size", "MiniMax lightning-attention block size (linear-attention layers megatron-core cannot "
            "build)", unless=lambda v, s: "linear_attention" not in (s.lookup("layer_types") or ()),
            valid=positive_int),
    *(refused(name, "MiniMax residual scaling (residual * alpha + sublayer * beta): megatron-core's "
              "TransformerLayer adds the residual unscaled", unless=equals(1), valid=positive_number)
      for name in ("full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor",
                   "linear_attn_beta_factor", "mlp_alpha_factor", "mlp_beta_factor")),
    *inert("vision/audio tower settings: towers are carried through unchanged", "vision_config", "audio_config",
           "mm_hidden_size", "mm_projector_type", "mm_resampler_type", "mm_use_im_patch_token",
           "mm_use_im_start_end", "mm_vision_select_feature", "mm_vision_select_layer", "mm_vision_tower",
           "image_aspect_ratio", "use_mm_proj", "freeze_mm_mlp_adapter", "freeze_mm_vision_resampler",
           "tune_mm_mlp_adapter", "tune_mm_vision_resampler", "unfreeze_mm_vision_tower", "vision_feature_layer",
           "vision_feature_select_strategy", "projector_hidden_act", "image_seq_length", "multimodal_projector_bias"),
    # -- issue 11 (breadth-c): the hybrid/MoE families' remaining keys, so each refusal names its real blocker ----
    *refused_all("state-space (Mamba) layers: the bridge builds attention and gated delta-net layers only (Bamba's "
                 "attention-layer list beside its Mamba layers)", "attn_layer_indices"),
    *inert("training-only auxiliary loss (Bamba's z-loss on the logits)", "z_loss_coefficient"),
    structural("expert_layer_period", "mlp_kinds", why=_STRUCT + " (Jamba: every n-th layer is MoE)",
               valid=positive_int),
    structural("expert_layer_offset", "mlp_kinds", why=_STRUCT + " (Jamba: the first MoE layer)",
               valid=non_negative_int),
    refused("position_embedding_type", "no rotary embedding unless 'rope' (GraniteMoE-Hybrid passes no positions "
            "to attention otherwise, NoPE): the bridge builds RoPE attention", unless=lambda v, _: v == "rope"),
    *inert("precision of HY-V3's routed + shared expert sum (fp32 before casting back): the same sum",
           "enable_moe_fp32_combine"),
    mapped("router_scaling_factor", "moe_router_topk_scaling_factor", why="HY-V3's routed-expert weights scaled "
           "after renormalisation (mapgen.contract.routing scheme 'sigmoid_renorm')", valid=positive_number,
           limit=_routing_limit("router_scaling_factor"), unread=_routing_unread("router_scaling_factor"),
           default=True),
    refused("global_attn_every_n_layers", "a sliding-window layer pattern without layer_types (AFMoE): the bridge "
            "reads the windowed layers from layer_types",
            unless=lambda v, s: isinstance(s.lookup("layer_types"), list)),
    refused("mup_enabled", "muP input scaling (embeddings times sqrt(hidden_size)): no megatron-core setting",
            unless=falsy, valid=boolean),
    refused("gating", "Laguna's softplus output gate on attention (g_proj, per head or per element): "
            "megatron-core's attention output gate is a sigmoid of a slice of linear_qkv"),
    refused("moe_apply_router_weight_on_input", "router weights applied to the expert input: megatron-core "
            "weights the expert outputs", unless=falsy, valid=boolean),
    refused("moe_routed_scaling_factor", "routed-expert output scaled (Laguna spelling): the bridge's router reads "
            "this scale only as routed_scaling_factor", unless=equals(1, 1.0), valid=positive_number),
    refused("moe_router_logit_softcapping", "router logits soft-capped (tanh): no megatron-core setting",
            unless=equals(0, 0.0)),
    refused("num_attention_heads_per_layer", "a per-layer attention head count: megatron-core builds one "
            "num_attention_heads for every layer",
            unless=lambda v, s: v is None or (isinstance(v, list)
                                              and all(n == s.lookup("num_attention_heads") for n in v)),
            default=False),  # absent: transformers repeats num_attention_heads for every layer
    # ERNIE-4.5-MoE (configuration_ernie4_5_moe.py attribute_map: moe_k -> num_experts_per_tok), Aria
    # a later spelling that disagrees with the one the bridge takes (an earlier one in TOP_K_READS /
    # EXPERT_COUNT_READS) is refused: the model code reads only its own
    mapped("moe_k", "moe_router_topk", why="routed experts per token (ERNIE-4.5-MoE spelling)", valid=_topk,
           limit=all_of(agrees_with_bridge("moe_router_topk"), _routing_limit("num_experts_per_tok"))),
    mapped("moe_num_experts", "num_moe_experts", why=_DIMS + " (ERNIE-4.5-MoE / Aria spelling)",
           valid=positive_int, limit=agrees_with_bridge("num_moe_experts")),
    structural("moe_layer_interval", "mlp_kinds", why=_STRUCT + " (ERNIE-4.5: every n-th layer is MoE)",
               valid=positive_int),
    structural("moe_layer_start_index", "mlp_kinds", why=_STRUCT, valid=non_negative_int),
    structural("moe_layer_end_index", "mlp_kinds", why=_STRUCT + " (-1: the last layer)",
               valid=lambda v, _: None if is_int(v) else f"must be an integer, got {v!r}"),
    refused("moe_norm_min", "a floor on the top-k renormalisation sum (ERNIE-4.5: clamp(sum, min)): megatron-core "
            "adds 1e-20; a floor at or below 1e-6 never binds for softmax scores (the top-k sum is at least k / E)",
            unless=lambda v, _: v is None or (isinstance(v, int | float) and 0 <= v <= 1e-6)),
    # classic decoders (issue 11 breadth-c): sizes under spellings the bridge does not read, MPT's unread keys
    *(refused(name, f"a size spelling the bridge does not read (it reads {BRIDGE_READS[field][0][0]})",
              unless=same_as_bridge(field), valid=positive_int)
      for name, field in (("dff", "ffn_hidden_size"),  # CTRL
                          ("attention_heads", "num_attention_heads"))),  # XGLM
    refused("attn_config", "MPT's attention settings (ALiBi biases, softmax_scale, clip_qkv, qk_ln): not read by the "
            "bridge; megatron-core has no ALiBi"),
    *inert("MPT keys transformers' modelling code does not read (modeling_mpt.py hard-codes LayerNorm blocks, an "
           "MLP of 4 * hidden_size without biases and ALiBi positions): the tensors decide", "learned_pos_emb",
           "norm_type", "init_device", "no_bias", "expansion_ratio", "embedding_fraction"),
    # -- issue 11 (breadth-d): Falcon-H1 and OLMo-Hybrid, so that each refusal names its real blocker ----------------
    *refused_all("state-space (Mamba) layers: the bridge builds attention and gated delta-net layers only (Falcon-H1's "
                 "Mamba-2 mixer beside attention in every layer)", "mamba_d_ssm", "mamba_norm_before_gate"),
    refused("mamba_rms_norm", "Falcon-H1's gated RMSNorm inside the Mamba mixer (state-space layers: the bridge builds "
            "attention and gated delta-net layers only)", unless=falsy),
    *(refused(name, "Falcon-H1 muP multipliers (attention / SSM / MLP inputs and outputs, keys, the LM head): no "
              "megatron-core setting", unless=equals(1, 1.0), valid=positive_number)
      for name in ("attention_in_multiplier", "attention_out_multiplier", "key_multiplier", "lm_head_multiplier",
                   "ssm_in_multiplier", "ssm_out_multiplier")),
    *(refused(name, "Falcon-H1 per-projection muP multipliers: no megatron-core setting",
              unless=lambda v, _: isinstance(v, list) and all(x == 1 for x in v))
      for name in ("mlp_multipliers", "ssm_multipliers")),
    structural("projectors_bias", "add_bias_linear", why=_STRUCT + " (Falcon-H1: biases on the attention / MLP "
               "projections)", valid=boolean),
    *inert("gated delta-net initialisation ranges (OLMo-Hybrid _init_weights): training only", "linear_a_log_min",
           "linear_a_log_max", "linear_dt_min", "linear_dt_max", "linear_dt_init_floor"),
    *refused_all("A.X-K2's gated RMSNorms (the rank of their low-rank sigmoid gate): megatron-core's norms are plain",
                 "gated_norm_rank"),
    refused("linear_allow_neg_eigval", "OLMo-Hybrid's gated delta-net beta scaled by 2 (eigenvalues in [-1, 1]): "
            "megatron-core's GatedDeltaNet uses sigmoid(b) as beta", unless=falsy, valid=boolean),
)

_ROPE_INERT = "a parameter of the scaling named by rope_type (judged there)"

ROPE_PARAMETERS: tuple[Row, ...] = (
    mapped("rope_type", "rope_scaling", why="RoPE scaling kind", valid=one_of(*ROPE_TYPES)),
    mapped("type", "rope_scaling", why="RoPE scaling kind (legacy spelling)", valid=one_of(*ROPE_TYPES)),
    mapped("rope_theta", "rotary_base", why="RoPE base", valid=positive_number),
    mapped("partial_rotary_factor", "rotary_percent", why="fraction of head dims rotated", valid=fraction),
    mapped("factor", "rope_scaling_factor", why="Llama-3 scaling factor", valid=positive_number),
    mapped("low_freq_factor", "rope_scaling", why="Llama-3 scaling (must be 1)", valid=positive_number),
    mapped("high_freq_factor", "rope_scaling", why="Llama-3 scaling (must be 4)", valid=positive_number),
    mapped("original_max_position_embeddings", "rope_scaling", why="Llama-3 scaling (must be 8192)",
           valid=positive_int),
    mapped("mrope_section", "position_embedding_type", "mrope_section", why="M-RoPE sections (megatron-core "
           "position_embedding_type='mrope', mrope_section)", valid=_mrope_valid),
    *inert(_INTERLEAVED_MROPE, "mrope_interleaved"),
    # Gemma-3, Mellum: {"full_attention": {...}, "sliding_attention": {...}}, a RoPE per attention type
    *refused_all("RoPE parameters per layer type (a base for full and one for sliding-window layers): the bridge "
                 "builds one RoPE for every layer", "full_attention", "sliding_attention"),
    *inert(_ROPE_INERT, "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
           "short_factor", "long_factor", "extrapolation_factor", "finetuned"),
)

# Legacy ``rope_scaling``: the bridge reads the scaling from it, never the base or the rotary fraction.
ROPE_SCALING: tuple[Row, ...] = (
    *(r for r in ROPE_PARAMETERS if r.name not in ("rope_theta", "partial_rotary_factor")),
    refused("rope_theta", "a RoPE base inside rope_scaling: the bridge reads rope_theta / rope_parameters",
            unless=same_as_bridge("rotary_base")),
    refused("partial_rotary_factor", "a rotary fraction inside rope_scaling: the bridge reads partial_rotary_factor",
            unless=same_as_bridge("rotary_percent")),
)

NESTED: dict[str, tuple[Row, ...]] = {"rope_parameters": ROPE_PARAMETERS, "rope_scaling": ROPE_SCALING}


def _rotary_dims(scope: Scope) -> int | None:
    """The rotary dimensions the bridge builds: kv_channels * rotary_percent."""
    head_dim = scope.lookup("head_dim", config_only=True)
    if head_dim is None:
        hidden, heads = bridge_value(scope, "hidden_size"), bridge_value(scope, "num_attention_heads")
        head_dim = hidden // heads if is_int(hidden) and is_int(heads) and heads else None
    percent = bridge_value(scope, "rotary_percent")
    return int(head_dim * percent) if is_int(head_dim) and isinstance(percent, int | float) else None


def _mla_qk_head_dim(scope: Scope) -> int | None:
    nope, rope = scope.lookup("qk_nope_head_dim"), scope.lookup("qk_rope_head_dim")
    return nope + rope if is_int(nope) and is_int(rope) else None


def index(rows: tuple[Row, ...]) -> dict[str, Row]:
    out: dict[str, Row] = {}
    for row in rows:
        if row.name in out:
            raise ValueError(f"catalog row {row.name!r} is declared twice")
        out[row.name] = row
    return out


TOP_INDEX = index(TOP)
NESTED_INDEX = {name: index(rows) for name, rows in NESTED.items()}
