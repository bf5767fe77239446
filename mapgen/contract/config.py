"""The Megatron model config of a bridge: one reviewed table from the HF ``config.json`` to :class:`ModelSpec`.

Each :class:`ConfigRow` sets one ``ModelSpec`` field from exactly one source:

* ``hf``:     candidate HF config names, tried in order (``text_config`` first, dotted names reach into nested
              objects); ``default`` when none is present, else a ``config.missing-key`` error;
* ``derive``: a named derivation from the config or the scanned layout (:data:`DERIVATIONS`);
* ``fact``:   a layout-decided :class:`Facts` field (what the checkpoint's keys say, not its config), negated
              with ``negate``, or mapped to one of two values with ``choices`` (false value, true value).

``when`` names a :class:`Facts` field that must hold for the row to apply; otherwise the field keeps its
``ModelSpec`` default (a dense model never reads ``num_experts``). Fields no row sets keep their defaults.
Rows are data: the table is evaluated by :func:`model_spec` at run time, for the proof and for every bridge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mapgen.contract.hf_config import (
    EXPERT_COUNT_READS,
    TOP_K_READS,
    HFConfig,
    activation,
    activation_clamp,
    glu_linear_offset,
    head_dim,
    mla_rope,
    mrope_section,
    no_rope_layers,
    position_embedding_type,
    query_groups,
    rope_scaling,
    rope_scaling_factor,
    shared_expert_size,
    softmax_scale,
    window_layers,
    window_size,
    yarn_fields,
)
from mapgen.contract.routing import RouterScheme, Routing, routing
from mapgen.contract.spec import LayerKind, MlpKind, ModelSpec
from mapgen.errors import error
from mapgen.ir import LayerGroup, Layout

__all__ = ["CONFIG", "DERIVATIONS", "ConfigRow", "Facts", "model_spec"]


@dataclass(frozen=True)
class Facts:
    """What the scanned layout decides about the Megatron model. The planner sets them from the checkpoint's
    keys and model type; a generated bridge states them (only those that are true)."""

    tied: bool = False  # the output layer is the token embedding
    add_qkv_bias: bool = False  # q/k/v projections have biases
    add_bias_linear: bool = False  # the attention output projection has a bias
    qk_layernorm: bool = False  # per-head q/k norms
    attention_output_gate: bool = False  # q_proj carries a sigmoid output gate (Qwen3.5/3.6)
    zero_centered: bool = False  # HF norms compute (1 + w) * x
    moe: bool = False  # some layer (or the MTP inner layer) has routed experts
    expert_bias: bool = False  # the router has an expert score-correction bias
    shared_expert: bool = False  # the MoE block has a shared expert
    shared_expert_gate: bool = False  # ... with a sigmoid gate
    gated_delta_net: bool = False  # some layer is a gated delta-net
    layernorm: bool = False  # norms are LayerNorm with bias (a model-type fact), else RMSNorm
    rotary_interleaved: bool = False  # RoPE over adjacent pairs of dims (a model-type fact)
    non_gated_mlp: bool = False  # dense MLPs are fc1 -> activation -> fc2 (no gate)
    mla: bool = False  # some layer is multi-latent attention
    attention_sinks: bool = False  # attention has a learned sink logit per head (gpt-oss)
    # -- MoE routing (mapgen.contract.routing): the model type's router code, and transformers' config-class
    # defaults for the routing keys config.json may leave out (the catalog judged the same values)
    router: RouterScheme = ""
    default_norm_topk_prob: bool | None = None
    default_routed_scaling_factor: float | None = None
    default_n_group: int | None = None
    default_topk_group: int | None = None
    default_topk_method: str | None = None
    default_router_scaling_factor: float | None = None
    # the norms' epsilon when config.json states none and the model code fixes it (OPT: nn.LayerNorm's 1e-5)
    default_norm_epsilon: float | None = None


# -- derivations ----------------------------------------------------------------------------------------------
def _mixer_kind(group: LayerGroup) -> LayerKind:
    if group.mixer.family == "mla":
        return "mla"
    return "gated_delta_net" if group.mixer.family == "gated_delta_net" else "attention"


def _has_mla(layout: Layout) -> bool:
    lm = layout.language_model
    return any(g.mixer.family == "mla" for g in (*lm.groups, *(lm.mtp.inner if lm.mtp else ())))


def _mlp_kind(group: LayerGroup) -> MlpKind:
    return "moe" if group.mlp.family == "moe" else "dense"


def _per_layer(layout: Layout, fn: Callable[[LayerGroup], str]) -> tuple[Any, ...]:
    lm = layout.language_model
    out: list[str | None] = [None] * lm.num_layers
    for group in lm.groups:
        for i in group.layers:
            out[i] = fn(group)
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise ValueError(f"layers {missing} belong to no layer group")
    return tuple(out)


def _mtp_inner(layout: Layout) -> LayerGroup | None:
    mtp = layout.language_model.mtp
    return mtp.inner[0] if mtp is not None and mtp.inner else None


def _mtp_depth(layout: Layout) -> int | None:
    mtp = layout.language_model.mtp
    return mtp.depth if mtp is not None and mtp.depth > 0 else None


def _mtp_layer_kind(layout: Layout) -> LayerKind:
    inner = _mtp_inner(layout)
    return _mixer_kind(inner) if inner is not None else "attention"


def _mtp_mlp_kind(layout: Layout) -> MlpKind:
    inner = _mtp_inner(layout)
    return _mlp_kind(inner) if inner is not None else "dense"


def _mla_rope_field(name: str) -> Callable[[HFConfig, Layout], Any]:
    return lambda hf, _: mla_rope(hf)[name]


def _yarn_field(name: str) -> Callable[[HFConfig, Layout], Any]:
    """A ``yarn_*`` field: MLA's YaRN (mla_rope) in a model with MLA layers, else standard attention's."""
    return lambda hf, layout: (mla_rope(hf) if _has_mla(layout) else yarn_fields(hf))[name]


def _per_layer_flags(layout: Layout, flags: tuple[bool, ...], what: str) -> tuple[bool, ...]:
    """Per-layer window / NoPE flags; megatron-core numbers MTP layers past ``num_layers`` and indexes these lists
    with that number, so a partial pattern has no entry for them: refused rather than an IndexError."""
    if flags and not all(flags) and _mtp_depth(layout):
        raise error(
            "config.unsupported-pattern", f"{what} on some layers only, with MTP layers: megatron-core 0.16.1 looks "
            "MTP layers up past the end of its per-layer list", key=what,
            expected="the pattern on every layer or on none, or no MTP layers",
            hint="converting would fail while building the Megatron model",
        )
    return flags


Derivation = Literal[
    "gpt2_inner", "num_query_groups", "shared_expert_size",
    "head_dim", "rope_scaling", "rope_scaling_factor", "layer_kinds", "mlp_kinds", "mtp_depth", "mtp_layer_kind",
    "mtp_mlp_kind", "mla_rope_type", "yarn_scaling_factor", "yarn_original_max_position_embeddings",
    "yarn_beta_fast", "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim", "yarn_truncate",
    "activation", "glu_linear_offset", "activation_clamp", "window_size", "window_layers", "no_rope_layers",
    "position_embedding_type",
    "mrope_section", "softmax_scale", "max_position_embeddings",
    "router_score_function", "router_pre_softmax", "router_scaling_factor", "router_num_groups", "router_group_topk",
    "router_dtype",
]
def _gpt2_inner(hf: HFConfig) -> int:
    """GPT-2's ``n_inner: null`` means ``4 * n_embd`` (modeling_gpt2.py GPT2Block); other configs must state a size."""
    if not hf.has("n_embd"):
        hf.get("intermediate_size", "moe_intermediate_size", "n_inner")  # config.missing-key, naming them
    return 4 * int(hf.get("n_embd"))


def _int_count(value: int | str) -> int:
    return value if isinstance(value, int) else 0


POSITION_READS: tuple[tuple[str, ...], int] = (("max_position_embeddings", "n_positions"), 4096)
"""What the ``max_position_embeddings`` derivation reads (names, fallback) before adding a position offset."""

DERIVATIONS: dict[str, Callable[[HFConfig, Layout], Any]] = {
    "gpt2_inner": lambda hf, _: _gpt2_inner(hf),  # ffn_hidden_size's fallback
    "head_dim": lambda hf, _: head_dim(hf),  # head_dim, else hidden_size // num_attention_heads
    "num_query_groups": lambda hf, _: query_groups(hf),  # KV heads (MHA: the heads); GPT-BigCode's multi_query: 1
    # stated, else the shared experts' count times one routed expert's size
    "shared_expert_size": lambda hf, _: shared_expert_size(hf),
    # Llama-3 RoPE scaling; other scalings are refused (MLA layers judge theirs in mla_rope)
    "rope_scaling": lambda hf, layout: False if _has_mla(layout) else rope_scaling(hf),
    "rope_scaling_factor": lambda hf, layout: 8.0 if _has_mla(layout) else rope_scaling_factor(hf),
    "layer_kinds": lambda _, layout: _per_layer(layout, _mixer_kind),  # per layer, from the scanned groups
    "mlp_kinds": lambda _, layout: _per_layer(layout, _mlp_kind),
    "mtp_depth": lambda _, layout: _mtp_depth(layout),  # from the keys, not from the config
    "mtp_layer_kind": lambda _, layout: _mtp_layer_kind(layout),
    "mtp_mlp_kind": lambda _, layout: _mtp_mlp_kind(layout),
    # MLA RoPE: plain, or YaRN with DeepSeek's mscale (mapgen.contract.hf_config.mla_rope refuses the rest)
    "mla_rope_type": _mla_rope_field("mla_rope_type"),
    # YaRN: MLA's, or standard attention's (position_embedding_type yarn; hf_config.yarn_fields refuses the rest)
    **{name: _yarn_field(name) for name in (
        "yarn_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
        "yarn_mscale", "yarn_mscale_all_dim", "yarn_truncate")},
    "activation": lambda hf, _: activation(hf),  # hidden_act / hidden_activation / activation_function
    "glu_linear_offset": lambda hf, _: glu_linear_offset(hf),  # gpt-oss: (up + 1) * glu
    "activation_clamp": lambda hf, _: activation_clamp(hf),  # gpt-oss: swiglu_limit
    "window_size": lambda hf, _: window_size(hf),  # sliding_window where some layer applies it
    # layer_types, max_window_layers, use_sliding_window
    "window_layers": lambda hf, layout: _per_layer_flags(layout, window_layers(hf), "sliding windows"),
    # SmolLM3 no_rope_layers / no_rope_layer_interval
    "no_rope_layers": lambda hf, layout: _per_layer_flags(layout, no_rope_layers(hf), "layers without RoPE"),
    # learned_absolute with a position table in the keys (GPT-2 wpe), else mrope with an mrope_section, else rope
    # (MLA layers build their own YaRN: never position_embedding_type yarn)
    "position_embedding_type": lambda hf, layout: (
        "learned_absolute" if layout.language_model.top.key("position_embedding")
        else position_embedding_type(hf, yarn=not _has_mla(layout))),
    "mrope_section": lambda hf, _: mrope_section(hf),
    # the learned position table's rows: OPT keeps 2 rows before position 0 (the component's position_offset)
    "max_position_embeddings": lambda hf, layout: int(hf.get(*POSITION_READS[0], default=POSITION_READS[1]))
    + _int_count(layout.language_model.top.count("position_offset", 0)),
    "softmax_scale": lambda hf, _: softmax_scale(hf),  # attention_multiplier, query_pre_attn_scalar
}


def bridge_routing(hf: HFConfig, facts: Facts) -> Routing:
    """The megatron-core router of a MoE bridge: :func:`mapgen.contract.routing.routing` on the config, keys
    absent from it taking transformers' defaults the bridge carries (``Facts.default_*``)."""

    def get(key: str) -> Any:
        return hf.get(key, default=getattr(facts, f"default_{key}", None))

    topk = int(hf.get(*TOP_K_READS))
    experts = hf.get(*EXPERT_COUNT_READS, default=None)
    return routing(facts.router, get, topk=topk, num_experts=experts, expert_bias=facts.expert_bias)[0]


# Derivations from the routing (they need the bridge's facts: its router scheme and defaults).
ROUTER_DERIVATIONS: dict[str, Callable[[Routing], Any]] = {
    "router_score_function": lambda r: r.score_function,
    "router_pre_softmax": lambda r: r.pre_softmax,
    "router_scaling_factor": lambda r: r.scaling_factor,
    "router_num_groups": lambda r: r.num_groups,
    "router_group_topk": lambda r: r.group_topk,
    "router_dtype": lambda r: r.dtype,
}


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class ConfigRow:
    """One ``ModelSpec`` field and where its value comes from (exactly one of ``hf``, ``derive``, ``fact``)."""

    field: str
    hf: tuple[str, ...] = ()
    default: bool | int | float | str | None = REQUIRED
    derive: Derivation | None = None
    fact: str | None = None
    negate: bool = False
    choices: tuple[str, str] | None = None
    fallback: Derivation | None = None  # an hf row's value when the config has none of its names
    when: str | None = None
    note: str = ""


# fmt: off
CONFIG: tuple[ConfigRow, ...] = (
    # -- dimensions --------------------------------------------------------------------------------------
    ConfigRow("num_layers", hf=("num_hidden_layers", "n_layer")),
    ConfigRow("hidden_size", hf=("hidden_size", "n_embd")),
    ConfigRow("num_attention_heads", hf=("num_attention_heads", "n_head")),
    ConfigRow("num_query_groups", derive="num_query_groups", note="MHA without kv heads; multi_query: 1"),
    ConfigRow("kv_channels", derive="head_dim"),
    ConfigRow("ffn_hidden_size", hf=("intermediate_size", "moe_intermediate_size", "n_inner", "ffn_dim"),
              fallback="gpt2_inner"),
    ConfigRow("vocab_size", hf=("vocab_size",)),
    ConfigRow("max_position_embeddings", derive="max_position_embeddings"),
    # -- per-layer structure -----------------------------------------------------------------------------
    ConfigRow("layer_kinds", derive="layer_kinds"),
    ConfigRow("mlp_kinds", derive="mlp_kinds"),
    # -- attention ---------------------------------------------------------------------------------------
    ConfigRow("add_qkv_bias", fact="add_qkv_bias"),
    ConfigRow("add_bias_linear", fact="add_bias_linear"),
    ConfigRow("qk_layernorm", fact="qk_layernorm"),
    ConfigRow("attention_output_gate", fact="attention_output_gate"),
    ConfigRow("rotary_base", hf=("rope_theta", "rope_parameters.rope_theta"), default=10000.0),
    ConfigRow("rotary_percent", hf=("partial_rotary_factor", "rope_parameters.partial_rotary_factor", "rotary_pct",
                                    "rope_pct"), default=1.0),
    ConfigRow("rope_scaling", derive="rope_scaling"),
    ConfigRow("rope_scaling_factor", derive="rope_scaling_factor"),
    ConfigRow("window_size", derive="window_size"),
    ConfigRow("window_layers", derive="window_layers"),
    ConfigRow("no_rope_layers", derive="no_rope_layers"),
    ConfigRow("position_embedding_type", derive="position_embedding_type"),
    ConfigRow("mrope_section", derive="mrope_section"),
    ConfigRow("softmax_scale", derive="softmax_scale"),
    ConfigRow("softmax_type", fact="attention_sinks", choices=("vanilla", "learnable")),
    # -- norms -------------------------------------------------------------------------------------------
    ConfigRow("normalization", fact="layernorm", choices=("RMSNorm", "LayerNorm")),
    ConfigRow("norm_epsilon", hf=("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon"),
              default=1e-6),
    ConfigRow("rotary_interleaved", fact="rotary_interleaved"),
    ConfigRow("layernorm_zero_centered_gamma", fact="zero_centered"),
    ConfigRow("gated_linear_unit", fact="non_gated_mlp", negate=True),
    ConfigRow("untie_embeddings_and_output_weights", fact="tied", negate=True),
    ConfigRow("activation", derive="activation"),
    ConfigRow("glu_linear_offset", derive="glu_linear_offset"),
    ConfigRow("activation_func_clamp_value", derive="activation_clamp"),
    # -- MoE ---------------------------------------------------------------------------------------------
    ConfigRow("num_moe_experts", hf=EXPERT_COUNT_READS, when="moe"),
    ConfigRow("moe_router_topk", hf=TOP_K_READS, when="moe"),
    ConfigRow("moe_ffn_hidden_size", hf=("moe_intermediate_size", "intermediate_size"), when="moe"),
    ConfigRow("moe_router_enable_expert_bias", fact="expert_bias"),
    ConfigRow("moe_router_score_function", derive="router_score_function", when="moe"),
    ConfigRow("moe_router_pre_softmax", derive="router_pre_softmax", when="moe"),
    ConfigRow("moe_router_topk_scaling_factor", derive="router_scaling_factor", when="moe"),
    ConfigRow("moe_router_num_groups", derive="router_num_groups", when="moe"),
    ConfigRow("moe_router_group_topk", derive="router_group_topk", when="moe"),
    ConfigRow("moe_router_dtype", derive="router_dtype", when="moe"),
    ConfigRow("moe_shared_expert_gate", fact="shared_expert_gate"),
    ConfigRow("moe_shared_expert_intermediate_size", derive="shared_expert_size", when="shared_expert"),
    # -- gated delta net ---------------------------------------------------------------------------------
    ConfigRow("linear_num_key_heads", hf=("linear_num_key_heads",), when="gated_delta_net"),
    ConfigRow("linear_num_value_heads", hf=("linear_num_value_heads",), when="gated_delta_net"),
    ConfigRow("linear_key_head_dim", hf=("linear_key_head_dim",), when="gated_delta_net"),
    ConfigRow("linear_value_head_dim", hf=("linear_value_head_dim",), when="gated_delta_net"),
    ConfigRow("linear_conv_kernel_dim", hf=("linear_conv_kernel_dim",), when="gated_delta_net"),
    # -- multi-latent attention ---------------------------------------------------------------------------
    ConfigRow("q_lora_rank", hf=("q_lora_rank",), default=None, when="mla", note="null: full-rank q_proj"),
    ConfigRow("kv_lora_rank", hf=("kv_lora_rank",), when="mla"),
    ConfigRow("qk_head_dim", hf=("qk_nope_head_dim",), when="mla"),
    ConfigRow("qk_pos_emb_head_dim", hf=("qk_rope_head_dim",), when="mla"),
    ConfigRow("v_head_dim", hf=("v_head_dim",), when="mla"),
    ConfigRow("mla_rope_type", derive="mla_rope_type", when="mla"),
    ConfigRow("yarn_scaling_factor", derive="yarn_scaling_factor"),
    ConfigRow("yarn_original_max_position_embeddings", derive="yarn_original_max_position_embeddings"),
    ConfigRow("yarn_beta_fast", derive="yarn_beta_fast"),
    ConfigRow("yarn_beta_slow", derive="yarn_beta_slow"),
    ConfigRow("yarn_mscale", derive="yarn_mscale"),
    ConfigRow("yarn_mscale_all_dim", derive="yarn_mscale_all_dim"),
    ConfigRow("yarn_truncate", derive="yarn_truncate"),
    # -- MTP (depth and inner layer from the scanned keys) -----------------------------------------------
    ConfigRow("mtp_num_layers", derive="mtp_depth"),
    ConfigRow("mtp_layer_kind", derive="mtp_layer_kind"),
    ConfigRow("mtp_mlp_kind", derive="mtp_mlp_kind"),
)
# fmt: on


def row_value(row: ConfigRow, hf: HFConfig, layout: Layout, facts: Facts) -> Any:
    """The value ``row`` gives its field."""
    if row.fact is not None:
        value = getattr(facts, row.fact)
        if row.choices is not None:
            return row.choices[bool(value)]
        return not value if row.negate else value
    if row.derive in ROUTER_DERIVATIONS:
        return ROUTER_DERIVATIONS[row.derive](bridge_routing(hf, facts))
    derive = row.derive if row.fallback is None or hf.has(*row.hf) else row.fallback
    if derive is not None:
        return DERIVATIONS[derive](hf, layout)
    if row.default is REQUIRED:
        return hf.get(*row.hf)
    fixed = getattr(facts, f"default_{row.field}", None)  # the model code's value (Facts.default_norm_epsilon)
    return hf.get(*row.hf, default=row.default if fixed is None else fixed)


def applies(row: ConfigRow, facts: Facts) -> bool:
    return row.when is None or bool(getattr(facts, row.when))


def model_spec(hf: HFConfig, layout: Layout, facts: Facts, table: tuple[ConfigRow, ...] = CONFIG) -> ModelSpec:
    """The Megatron model for a checkpoint: ``table`` evaluated on its config, its scanned layout and the
    bridge's layout-decided facts."""
    return ModelSpec(**{row.field: row_value(row, hf, layout, facts) for row in table if applies(row, facts)})


def check_table(table: tuple[ConfigRow, ...] = CONFIG) -> list[str]:
    """Problems with a config table (each field once, known fields and facts, exactly one source per row)."""
    spec_fields = {f.name for f in dataclasses.fields(ModelSpec)}
    fact_fields = {f.name for f in dataclasses.fields(Facts)}
    problems, seen = [], set()
    for row in table:
        where = f"ConfigRow({row.field!r})"
        if row.field not in spec_fields:
            problems.append(f"{where}: ModelSpec has no field {row.field!r}")
        if row.field in seen:
            problems.append(f"{where}: the field is set twice")
        seen.add(row.field)
        if sum((bool(row.hf), row.derive is not None, row.fact is not None)) != 1:
            problems.append(f"{where}: needs exactly one of hf, derive, fact")
        if row.derive is not None and row.derive not in DERIVATIONS and row.derive not in ROUTER_DERIVATIONS:
            problems.append(f"{where}: unknown derivation {row.derive!r}")
        if row.fallback is not None and (row.fallback not in DERIVATIONS or not row.hf):
            problems.append(f"{where}: a fallback is a known derivation of an hf row")
        problems += [f"{where}: Facts has no field {name!r}" for name in (row.fact, row.when)
                     if name is not None and name not in fact_fields]
        if (row.negate or row.choices is not None) and row.fact is None:
            problems.append(f"{where}: negate and choices need a fact")
    return problems
