"""A read-only view of a Hugging Face ``config.json`` and the few values derived from it.

Shared by the planner (shapes, the proof's config), the runtime and the generated bridges; cheap to import
(no torch, no megatron-core).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mapgen.errors import error

__all__ = [
    "ACTIVATIONS",
    "CLAMPED_SWIGLU",
    "HFConfig",
    "activation",
    "activation_clamp",
    "activation_name",
    "computed_activation",
    "glu_linear_offset",
    "head_dim",
    "mla_rope",
    "mla_yarn_problem",
    "mrope_section",
    "no_rope_layers",
    "position_embedding_type",
    "rope_scaling",
    "rope_scaling_factor",
    "softmax_scale",
    "window_layers",
    "window_size",
    "yarn_fields",
    "yarn_problem",
]

_MISSING = object()


class HFConfig:
    """Read-only view of a Hugging Face ``config.json``; ``text_config`` (VL wrappers) is searched first."""

    def __init__(self, data: Mapping[str, Any], source: str = "config.json") -> None:
        self._data = dict(data)
        text = data.get("text_config")
        self._text = dict(text) if isinstance(text, Mapping) else {}
        self.source = source

    def has(self, *names: str) -> bool:
        return any(self._lookup(n) is not None for n in names)

    def _lookup(self, name: str) -> Any:
        for scope in (self._text, self._data):
            value: Any = scope
            for part in name.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            if value is not None:
                return value
        return None

    def get(self, *names: str, default: Any = _MISSING) -> Any:
        """The first of ``names`` present (dotted names reach into nested objects such as
        ``rope_parameters.rope_theta``); ``default`` if none is, else a ``config.missing-key`` error."""
        for name in names:
            value = self._lookup(name)
            if value is not None:
                return value
        if default is not _MISSING:
            return default
        raise error(
            "config.missing-key",
            f"the config has none of {', '.join(names)}",
            file=self.source,
            expected="one of these keys (top level or under text_config)",
            hint="this bridge needs it to size the Megatron model; add it to config.json",
        )

    @property
    def data(self) -> dict[str, Any]:
        return dict(self._data)


def head_dim(hf: HFConfig) -> int:
    """``head_dim`` when the config states it, else ``hidden_size // num_attention_heads``."""
    value = hf.get("head_dim", default=None)
    if value is None:
        value = int(hf.get("hidden_size", "n_embd")) // int(hf.get("num_attention_heads", "n_head"))
    return int(value)


EXPERT_COUNT_READS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
"""The routed-expert count's spellings, tried in order (Mixtral ``num_local_experts``, DeepSeek ``n_routed_experts``,
ERNIE-4.5-MoE / Aria ``moe_num_experts``): the bridge, the catalog, scan and synth read these."""
TOP_K_READS = ("num_experts_per_tok", "moe_topk", "moe_k")
"""The routed experts per token's spellings, tried in order (Aria ``moe_topk``, ERNIE-4.5-MoE ``moe_k``)."""
SHARED_SIZE_READS = ("shared_expert_intermediate_size", "shared_intermediate_size")
"""The shared expert's intermediate size where the config states it (Qwen2-MoE, GraniteMoeShared)."""
SHARED_COUNT_READS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
"""How many routed-expert-sized experts the shared expert fuses (DeepSeek / GLM-4-MoE, HY-V3 / AFMoE, Aria)."""


def shared_expert_size(hf: HFConfig) -> int:
    """The shared expert's intermediate size: stated (:data:`SHARED_SIZE_READS`), else the shared experts' count
    (:data:`SHARED_COUNT_READS`, 1 when absent) times one routed expert's (``moe_intermediate_size``, else
    ``intermediate_size``): DeepSeek-V2's two shared experts are one MLP of twice the size (modeling_deepseek_v2.py
    ``DeepseekV2MLP(intermediate_size=moe_intermediate_size * n_shared_experts)``)."""
    stated = hf.get(*SHARED_SIZE_READS, default=None)
    if stated is not None:
        return int(stated)
    return int(hf.get(*SHARED_COUNT_READS, default=1)) * int(hf.get("moe_intermediate_size", "intermediate_size"))


QUERY_GROUP_READS = ("num_key_value_heads", "num_attention_heads", "n_head")
"""What ``num_query_groups`` reads when the config is not multi-query (MHA configs state no KV heads)."""


def multi_query(hf: HFConfig) -> bool:
    """One KV head shared by every query head: GPT-BigCode's and Falcon's ``multi_query`` (except in Falcon's new
    decoder, which reads ``num_kv_heads``), as modeling_gpt_bigcode.py and modeling_falcon.py read them."""
    return bool(hf.get("multi_query", default=False)) and not hf.get("new_decoder_architecture", default=False)


def query_groups(hf: HFConfig) -> int:
    """Megatron's ``num_query_groups``: 1 for a multi-query config, else the KV heads (the heads for MHA)."""
    return 1 if multi_query(hf) else int(hf.get(*QUERY_GROUP_READS))


_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope(hf: HFConfig) -> dict[str, Any] | None:
    """The config's RoPE scaling dict (``rope_scaling`` or transformers 5's ``rope_parameters``), None when it
    is plain RoPE. Scalings megatron-core cannot reproduce are refused instead of silently ignored."""
    for name in ("rope_scaling", "rope_parameters"):
        value = hf.get(name, default=None)
        if isinstance(value, Mapping):
            kind = value.get("rope_type") or value.get("type") or "default"
            if kind in ("default", "mrope", "yarn"):
                continue  # M-RoPE and YaRN are position_embedding_type (below), not a frequency scaling
            if kind == "llama3" and all(
                float(value.get(k, v)) == v for k, v in _LLAMA3_DEFAULTS.items()
            ):
                return dict(value)
            raise error(
                "config.unsupported-rope",
                f"RoPE scaling {kind!r} with {dict(value)} has no megatron-core equivalent here",
                file=hf.source, key=name,
                expected="plain RoPE, or llama3 scaling with low/high frequency factors 1/4 over 8192 positions",
                hint="converting anyway would change the model's outputs; add support for this scaling first",
            )
    return None


def rope_scaling(hf: HFConfig) -> bool:
    return _rope(hf) is not None


def rope_scaling_factor(hf: HFConfig) -> float:
    rope = _rope(hf)
    return float(rope.get("factor", 8.0)) if rope else 8.0


# -- multi-latent attention's RoPE (megatron-core MLATransformerConfig: rope_type "rope" or "yarn") -------------
_MLA_ROPE_DEFAULTS: dict[str, Any] = {
    "mla_rope_type": "rope", "yarn_scaling_factor": 1.0, "yarn_original_max_position_embeddings": 4096,
    "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_mscale": 1.0, "yarn_mscale_all_dim": 0.0,
    "yarn_truncate": True,
}


_SAME = 1e-12  # relative slack when a stated value must equal the one implied


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_values(value: Mapping[str, Any], max_positions: Any, *, mla: bool = True) -> tuple[dict[str, Any] | None,
                                                                                             str | None]:
    """transformers' YaRN (``_compute_yarn_parameters`` and DeepSeek's softmax ``mscale_all_dim`` factor) as
    megatron-core's YaRN settings (MLA's, or with ``mla=False`` GPTModel's ``position_embedding_type="yarn"``,
    which also takes ``truncate``), or the reason it has no equivalent."""
    original = value.get("original_max_position_embeddings")
    if not isinstance(original, int | float) or original <= 0:
        return None, "YaRN needs original_max_position_embeddings"
    factor = value.get("factor")
    if factor is None:  # transformers: the context extension ratio
        if not isinstance(max_positions, int | float):
            return None, "YaRN without a factor needs max_position_embeddings"
        factor = max_positions / original
    if mla and not value.get("truncate", True):
        return None, "YaRN with truncate=false (megatron-core's MLA rounds the correction range)"
    if float(value.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return None, "YaRN over part of the rotary dims"
    mscale, all_dim = value.get("mscale"), value.get("mscale_all_dim")
    if all_dim and not mscale:
        # transformers: cos/sin scaled by get_mscale(factor), softmax by get_mscale(factor, all_dim)^2; megatron-core
        # ties the two (cos/sin by get_mscale(factor, mscale) / get_mscale(factor, all_dim)).
        return None, "YaRN with mscale_all_dim but no mscale"
    m, a = (float(mscale), float(all_dim)) if mscale and all_dim else (1.0, 0.0)
    given = value.get("attention_factor")
    implied = _yarn_mscale(float(factor), m) / _yarn_mscale(float(factor), a)
    if given is not None and abs(float(given) - implied) > _SAME:
        return None, f"YaRN with an explicit attention_factor={given} other than the one mscale implies"
    return {
        "mla_rope_type": "yarn", "yarn_scaling_factor": float(factor),
        "yarn_original_max_position_embeddings": int(original),
        "yarn_beta_fast": float(value.get("beta_fast") or 32), "yarn_beta_slow": float(value.get("beta_slow") or 1),
        "yarn_mscale": m, "yarn_mscale_all_dim": a, "yarn_truncate": bool(value.get("truncate", True)),
    }, None


def mla_yarn_problem(value: Mapping[str, Any], max_positions: Any) -> str | None:
    """Why a YaRN RoPE dict has no exact megatron-core MLA equivalent (None when it has one)."""
    return _yarn_values(value, max_positions)[1]


def mla_rope(hf: HFConfig) -> dict[str, Any]:
    """The RoPE settings of an MLA model as ModelSpec fields (``mla_rope_type``, ``yarn_*``): plain RoPE, or YaRN
    with DeepSeek's mscale mapped exactly; any other scaling is refused by name."""
    for name in ("rope_scaling", "rope_parameters"):
        value = hf.get(name, default=None)
        if not isinstance(value, Mapping):
            continue
        kind = value.get("rope_type") or value.get("type") or "default"
        if kind == "default":
            continue
        values, problem = _yarn_values(value, hf.get("max_position_embeddings", default=None)) if kind == "yarn" \
            else (None, f"RoPE scaling {kind!r} in multi-latent attention (megatron-core has rope and yarn)")
        if values is None:
            raise error(
                "config.unsupported-rope", f"{problem}: {dict(value)}", file=hf.source, key=name,
                expected="plain RoPE, or YaRN as DeepSeek-V3 writes it (factor, original_max_position_embeddings, "
                "beta_fast/slow, mscale with mscale_all_dim)",
                hint="converting anyway would change the model's outputs; add support for this scaling first",
            )
        return values
    return dict(_MLA_ROPE_DEFAULTS)


# -- YaRN on standard attention (megatron-core GPTModel position_embedding_type="yarn") ------------------------
def _yarn_dict(hf: HFConfig) -> tuple[str, Mapping[str, Any]] | None:
    for name in ("rope_scaling", "rope_parameters"):
        value = hf.get(name, default=None)
        if isinstance(value, Mapping) and (value.get("rope_type") or value.get("type")) == "yarn":
            return name, value
    return None


def yarn_problem(value: Mapping[str, Any], max_positions: Any, rotary_fraction: Any = 1.0) -> str | None:
    """Why a YaRN RoPE dict on standard attention has no exact megatron-core equivalent (None when it has one).
    megatron-core's ``YarnRotaryEmbedding`` rotates every head dim (it does not read ``rotary_percent``)."""
    if float(rotary_fraction or 1.0) != 1.0:
        return "YaRN over part of the rotary dims (megatron-core's YarnRotaryEmbedding rotates all of them)"
    return _yarn_values(value, max_positions, mla=False)[1]


def yarn_fields(hf: HFConfig) -> dict[str, Any]:
    """The ``yarn_*`` ModelSpec fields of standard attention: YaRN as transformers computes it (GPTModel's
    ``position_embedding_type="yarn"``: the same frequency blend, correction range rounded iff ``truncate``, and
    cos/sin scaled by the attention factor ``get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)``),
    the defaults when the config has no YaRN; any YaRN it cannot express is refused by name."""
    found = _yarn_dict(hf)
    if found is None:
        return {k: v for k, v in _MLA_ROPE_DEFAULTS.items() if k != "mla_rope_type"}
    name, value = found
    fraction = hf.get("partial_rotary_factor", "rope_parameters.partial_rotary_factor", default=1.0)
    problem = yarn_problem(value, hf.get("max_position_embeddings", default=None), fraction)
    values = None if problem else _yarn_values(value, hf.get("max_position_embeddings", default=None), mla=False)[0]
    if values is None:
        raise error(
            "config.unsupported-rope", f"{problem}: {dict(value)}", file=hf.source, key=name,
            expected="YaRN with factor, original_max_position_embeddings, beta_fast/slow, truncate and optionally "
            "mscale with mscale_all_dim, over every head dim",
            hint="converting anyway would change the model's outputs; add support for this scaling first",
        )
    return {k: v for k, v in values.items() if k != "mla_rope_type"}


# -- activations ----------------------------------------------------------------------------------------------
# transformers' ACT2FN name -> the ModelSpec activation that computes the same function (formulas checked against
# transformers/activations.py: gelu_new, gelu_fast, gelu_accurate and gelu_python_tanh are the tanh approximation
# written out, equal to F.gelu(approximate="tanh") up to float rounding; gelu_python is the erf GELU).
ACTIVATIONS: dict[str, str] = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "relu": "relu", "relu2": "relu2", "quick_gelu": "quick_gelu",
}
ACTIVATION_KEYS = ("hidden_act", "hidden_activation", "activation_function")
# Config classes that rewrite the name they are given (GemmaConfig turns the legacy "gelu" into the tanh
# approximation; these model types compute SiLU whatever the key says).
_ACTIVATION_REWRITES: dict[str, dict[str, str]] = {"gemma": {"gelu": "gelu_pytorch_tanh"}}
_ACTIVATION_FIXED = {"blt": "silu", "minimax_m3_vl": "silu", "step3p7": "silu",
                     "gpt_oss": "quick_gelu"}  # gate * sigmoid(swiglu_alpha * gate): quick_gelu at alpha 1.702
# Model types whose experts compute gpt-oss's clamped SwiGLU whatever hidden_act says (modeling_gpt_oss.py,
# GptOssExperts._apply_gate): gate clamped above at swiglu_limit, up clamped to [-limit, limit],
# glu = gate * sigmoid(gate * swiglu_alpha), out = (up + 1) * glu. megatron-core's glu (transformer/mlp.py,
# moe/experts.py) computes act(min(g, c)) * (clamp(u, -c, c) + glu_linear_offset): quick_gelu (x * sigmoid(1.702 x))
# with activation_func_clamp_value = swiglu_limit and glu_linear_offset = 1. Values: transformers' class defaults.
CLAMPED_SWIGLU: dict[str, dict[str, float]] = {"gpt_oss": {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}}
QUICK_GELU_ALPHA = 1.702  # megatron.core.fusions.fused_bias_geglu.quick_gelu


def computed_activation(name: str, model_type: str) -> str:
    """The transformers activation a ``model_type`` computes when its config names ``name``."""
    if model_type in _ACTIVATION_FIXED:
        return _ACTIVATION_FIXED[model_type]
    return _ACTIVATION_REWRITES.get(model_type, {}).get(name, name)


def activation_name(hf: HFConfig) -> str:
    """The transformers activation name the model computes (``silu`` when the config names none)."""
    return computed_activation(str(hf.get(*ACTIVATION_KEYS, default="silu")), str(hf.get("model_type", default="")))


def _clamped_swiglu(hf: HFConfig) -> dict[str, float] | None:
    return CLAMPED_SWIGLU.get(str(hf.get("model_type", default="")))


def activation(hf: HFConfig) -> str:
    """The ModelSpec activation; a name megatron-core cannot reproduce is ``config.unsupported-activation``."""
    clamped = _clamped_swiglu(hf)
    if clamped is not None:
        alpha = hf.get("swiglu_alpha", default=clamped["swiglu_alpha"])
        if alpha != QUICK_GELU_ALPHA:
            raise error(
                "config.unsupported-activation", f"clamped SwiGLU with swiglu_alpha={alpha!r}: megatron-core's "
                f"gated activation with a sigmoid gain is quick_gelu, x * sigmoid({QUICK_GELU_ALPHA} x)",
                file=hf.source, key="swiglu_alpha", expected=str(QUICK_GELU_ALPHA),
                hint="converting anyway would change the model's outputs",
            )
    name = activation_name(hf)
    if name not in ACTIVATIONS:
        raise error(
            "config.unsupported-activation", f"activation {name!r} has no exact megatron-core equivalent here",
            file=hf.source, key="hidden_act", expected=", ".join(sorted(ACTIVATIONS)),
            hint="converting anyway would change the model's outputs",
        )
    return ACTIVATIONS[name]


def glu_linear_offset(hf: HFConfig) -> float:
    """What the gated linear unit adds to the up projection (gpt-oss: 1)."""
    return 1.0 if _clamped_swiglu(hf) is not None else 0.0


def activation_clamp(hf: HFConfig) -> float | None:
    """gpt-oss's ``swiglu_limit`` (megatron-core ``activation_func_clamp_value``); None for other model types."""
    clamped = _clamped_swiglu(hf)
    if clamped is None:
        return None
    limit = hf.get("swiglu_limit", default=clamped["swiglu_limit"])
    if isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0:
        raise error(
            "config.invalid-value", f"swiglu_limit={limit!r}: transformers clamps the gate and up projections to it",
            file=hf.source, key="swiglu_limit", expected="a positive number",
            hint="fix config.json",
        )
    return float(limit)


# -- sliding windows ------------------------------------------------------------------------------------------
# model types whose config applies sliding_window only with use_sliding_window (default false), and how their
# config class lays the windowed layers out when config.json has no layer_types
WINDOW_GATED: dict[str, str] = {
    "qwen2": "from_max_window_layers", "qwen3": "from_max_window_layers", "qwen2_vl_text": "from_max_window_layers",
    "qwen2_5_vl_text": "from_max_window_layers", "qwen2_5_omni_text": "from_max_window_layers",
    "qwen2_vl": "from_max_window_layers", "qwen2_5_vl": "from_max_window_layers",
    "qwen2_moe": "odd_below_max_window_layers", "qwen3_moe": "all", "smollm3": "nope_layers",
}
# Config classes that derive windowed layers from max_window_layers without a use_sliding_window switch
# (transformers' Dots1Config: sliding_window and i >= max_window_layers).
WINDOW_UNGATED: dict[str, str] = {"dots1": "from_max_window_layers"}


def _layer_count(hf: HFConfig) -> int:
    return int(hf.get("num_hidden_layers", "n_layer"))


def window_size(hf: HFConfig) -> int | None:
    """transformers' ``sliding_window`` when some layer applies it, else None."""
    return None if not any(_window_layers(hf)) else int(hf.get("sliding_window"))


def window_layers(hf: HFConfig) -> tuple[bool, ...]:
    """Per layer, whether it attends through the window (empty when no layer does)."""
    layers = _window_layers(hf)
    return layers if any(layers) else ()


def _window_applies(hf: HFConfig) -> bool:
    window = hf.get("sliding_window", default=None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return False
    gated = str(hf.get("model_type", default="")) in WINDOW_GATED or hf.has("use_sliding_window")
    return not gated or hf.get("use_sliding_window", default=False) is True


def _window_layers(hf: HFConfig) -> tuple[bool, ...]:
    n = _layer_count(hf)
    if not _window_applies(hf):
        return (False,) * n
    kinds = hf.get("layer_types", default=None)
    model_type = str(hf.get("model_type", default=""))
    pattern = WINDOW_GATED.get(model_type) or WINDOW_UNGATED.get(model_type) or (
        "unknown" if hf.has("use_sliding_window") else "all")
    if isinstance(kinds, list) and len(kinds) == n:
        layers = tuple(k == "sliding_attention" for k in kinds)
    elif pattern == "from_max_window_layers":
        layers = tuple(i >= int(hf.get("max_window_layers")) for i in range(n))
    elif pattern == "odd_below_max_window_layers":  # transformers: (i + 1) % 2 and i < max_window_layers
        layers = tuple(i % 2 == 0 and i < int(hf.get("max_window_layers")) for i in range(n))
    elif pattern == "nope_layers":  # SmolLM3: the layers without RoPE are the windowed ones
        layers = tuple(not rope for rope in _rope_layers(hf))
    elif pattern == "all":
        layers = (True,) * n
    else:
        raise error(
            "config.unsupported-window", f"use_sliding_window is set for model_type {model_type!r}, whose config "
            "class mapgen does not know: which layers are windowed is not in config.json", file=hf.source,
            key="use_sliding_window", expected="layer_types listing sliding_attention per layer",
            hint="add layer_types to config.json, or teach mapgen.contract.hf_config.WINDOW_GATED this model type",
        )
    return layers


# -- layers without RoPE (SmolLM3) ----------------------------------------------------------------------------
# Model types whose attention applies RoPE only on sliding-window layers once a window is set (EXAONE-MoE, EXAONE-4:
# ``if self.sliding_window is None or self.is_sliding: apply_rotary_pos_emb``): full-attention layers are NoPE.
NOPE_FULL_ATTENTION_TYPES = frozenset({"exaone_moe", "exaone4"})
# RoPE on the sliding_attention layers only, with or without a window (Lara-mini: modeling_lara_mini.py passes
# position_embeddings to sliding_attention layers alone; its full_attention layers are NoPE)
ROPE_ON_SLIDING_ONLY_TYPES = frozenset({"lara_mini"})


def _rope_layers(hf: HFConfig) -> tuple[bool, ...]:
    """SmolLM3's per-layer flags, 1 = the layer applies RoPE (``no_rope_layers``, else every
    ``no_rope_layer_interval``-th layer skips it, as its config class derives them); for
    ``NOPE_FULL_ATTENTION_TYPES`` with a sliding window, RoPE on the ``sliding_attention`` layers only."""
    n = _layer_count(hf)
    types = hf.get("layer_types", default=None)
    model_type = str(hf.get("model_type", default=""))
    if isinstance(types, list) and (model_type in ROPE_ON_SLIDING_ONLY_TYPES or (
            model_type in NOPE_FULL_ATTENTION_TYPES and hf.get("sliding_window", default=None) is not None)):
        if len(types) != n:
            raise error("config.layer-type-mismatch", file="config.json", key="layer_types",
                        message=f"layer_types has {len(types)} entries for {n} layers",
                        expected=f"{n} entries", hint="fix layer_types in config.json")
        return tuple(t == "sliding_attention" for t in types)
    flags = hf.get("no_rope_layers", default=None)
    if isinstance(flags, list):
        return tuple(bool(f) for f in flags)
    interval = hf.get("no_rope_layer_interval", default=None)
    if interval is None:
        return (True,) * n
    return tuple((i + 1) % int(interval) != 0 for i in range(n))


def no_rope_layers(hf: HFConfig) -> tuple[bool, ...]:
    """Per layer, True where the layer applies no RoPE; empty when every layer applies it."""
    if (str(hf.get("model_type", default="")) not in {"smollm3", *NOPE_FULL_ATTENTION_TYPES,
                                                        *ROPE_ON_SLIDING_ONLY_TYPES}
            and not hf.has("no_rope_layers")):
        return ()
    skip = tuple(not rope for rope in _rope_layers(hf))
    return skip if any(skip) else ()


# -- M-RoPE ---------------------------------------------------------------------------------------------------
def _mrope(hf: HFConfig) -> list[int] | None:
    """Contiguous M-RoPE sections (Qwen2-VL, Qwen2.5-VL). Interleaved M-RoPE (``mrope_interleaved``: Qwen3-VL,
    Qwen3.5) is built as plain RoPE: for text (t = h = w positions) every section rotates by the same position,
    so the two are equal; megatron-core 0.16.1 has no interleaved M-RoPE for multimodal positions."""
    for name in ("rope_parameters", "rope_scaling"):
        value = hf.get(name, default=None)
        if isinstance(value, Mapping) and value.get("mrope_section") is not None:
            if value.get("mrope_interleaved"):
                return None
            return [int(x) for x in value["mrope_section"]]
    return None


def position_embedding_type(hf: HFConfig, *, yarn: bool = True) -> str:
    """mrope with an mrope_section, else yarn for a YaRN scaling (``yarn``: standard attention; MLA builds its
    own YaRN), else rope."""
    if _mrope(hf) is not None:
        return "mrope"
    return "yarn" if yarn and _yarn_dict(hf) is not None else "rope"


def mrope_section(hf: HFConfig) -> tuple[int, ...]:
    return tuple(_mrope(hf) or ())


# -- attention scale ------------------------------------------------------------------------------------------
def softmax_scale(hf: HFConfig) -> float | None:
    """Granite's ``attention_multiplier``, Gemma 2/3's ``query_pre_attn_scalar ** -0.5``; None = 1/sqrt(head_dim)."""
    multiplier = hf.get("attention_multiplier", default=None)
    if multiplier is not None:
        return float(multiplier)
    scalar = hf.get("query_pre_attn_scalar", default=None)
    if scalar is not None and float(scalar) != float(head_dim(hf)):
        return float(float(scalar) ** -0.5)
    return None
