"""Planning: a scanned :class:`Layout` -> a :class:`BridgePlan` (Megatron config recipe + ordered rules).

Pure and deterministic. Every rule names its Megatron parameter pattern in the global local-spec namespace
(see :mod:`mapgen.plan.rules`), the HF key pattern(s), the primitive and its declared sharding. Layer,
expert and MTP indices are placeholders whose index sets come from the layout's groups; nothing is
hard-coded to ``mtp.layers.0``.

Families the runtime cannot convert yet (MLA, attention sinks, MXFP4 experts, fused qkv, Qwen3-Next fused
GDN projections) make :func:`plan` raise a specific "not supported" error instead of producing a partial
bridge.
"""

from __future__ import annotations

import hashlib
import json
import re

from mapgen.errors import Diagnostic, MapgenError
from mapgen.families import behaviour, embedding, facts_for, input_norm_target, norms
from mapgen.families import mtp as mtp_family
from mapgen.families.moe import experts_of
from mapgen.ir import LayerGroup, Layout, to_jsonable
from mapgen.plan.plan import BridgePlan, ConfigField
from mapgen.plan.rules import Rule

_IDENT = re.compile(r"[^0-9a-zA-Z_]+")


# ---------------------------------------------------------------------------------------------------------
# Fingerprint: the layout with dimensions (and index sets, counts, depths) removed.
# ---------------------------------------------------------------------------------------------------------
_DIMENSION_FIELDS = frozenset(
    {"dims", "summary", "diagnostics", "unclassified", "layers", "num_layers", "depth", "index_offset", "num_keys",
     "patterns", "config", "counts"}
)
"""Layout fields that are sizes, counts or reports, not structure (a component's ``counts`` by their role)."""


def _strip(data: object) -> object:
    if isinstance(data, dict):
        return {k: _strip(v) for k, v in sorted(data.items()) if k not in _DIMENSION_FIELDS}
    if isinstance(data, list):
        return [_strip(v) for v in data]
    return data


def fingerprint_data(layout: Layout) -> object:
    """The canonical data a layout fingerprint is computed from (public for tests and ``mapgen diff``)."""
    return _strip(to_jsonable(layout))


def fingerprint(layout: Layout) -> str:
    canonical = json.dumps(fingerprint_data(layout), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def module_name(layout: Layout, fp: str) -> str:
    base = _IDENT.sub("_", layout.model_type.lower()).strip("_") or "model"
    if not base[0].isalpha():
        base = f"m_{base}"
    return f"{base}_{fp}"


# ---------------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------------
def _opts(**kw: str | int | bool) -> tuple[tuple[str, str | int | bool], ...]:
    return tuple(sorted(kw.items()))


class _Planner:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.lm = layout.language_model
        self.zero_centered = facts_for((layout.text_model_type, layout.model_type)).zero_centered
        self.rules: list[Rule] = []
        self.problems: list[Diagnostic] = []

    def unsupported(self, what: str, key: str) -> None:
        self.problems.append(
            Diagnostic(
                "error",
                "plan.unsupported",
                f"{what} is recognised by scan but the conversion runtime does not support it yet",
                key=key,
                hint="scan reports it; conversion of this family needs a primitive and a rule (see README, "
                "'Adding a layer family')",
            )
        )

    def add(self, family: str, megatron: str, hf: tuple[str, ...], op: str, sharding: str, *,
            domain: str, experts: bool = False, options: tuple[tuple[str, str | int | bool], ...] = (),
            comment: str = "") -> None:
        self.rules.append(
            Rule(
                family=family,
                megatron=megatron,
                hf=hf,
                op=op,  # type: ignore[arg-type]
                sharding=sharding,  # type: ignore[arg-type]
                domain=domain,
                experts=experts,
                options=options,
                comment=comment,
            )
        )

    # -- top level --------------------------------------------------------------------------------------
    def plan(self) -> None:
        lm = self.lm
        embedding.plan_embedding(lm.top, self)
        for group in lm.groups:
            self.group(group, "decoder.layers.{layer}.", group.root, f"decoder:{group.name}")
        embedding.plan_head(lm.top, self)
        if lm.mtp is not None:
            mtp_family.plan(lm.mtp, lm.tied_embeddings, self)
            for group in lm.mtp.inner:
                hroot = group.root.replace("{layer}", "{hf_layer}") if lm.mtp.index_offset else group.root
                self.group(group, "mtp.layers.{layer}.{mtp_inner}.", hroot, f"mtp:{group.name}")

    # -- one decoder layer group: the block's norms around its mixer and MLP -----------------------------
    def group(self, group: LayerGroup, mroot: str, hroot: str, domain: str) -> None:
        input_norm = input_norm_target(group.mixer)
        for where, component in (("mixer", group.mixer), ("mlp", group.mlp)):
            norms.plan_before(group.block, where, input_norm, self, mroot, hroot, domain, group.name)
            behaviour(component).plan(component, self, mroot, hroot, domain, group.name)


# ---------------------------------------------------------------------------------------------------------
# Config recipe
# ---------------------------------------------------------------------------------------------------------
def _config(layout: Layout, zero_centered: bool) -> tuple[ConfigField, ...]:
    lm = layout.language_model
    groups = list(lm.groups) + (list(lm.mtp.inner) if lm.mtp else [])
    attns = [g.mixer for g in groups if g.mixer.family == "attention"]
    moes = [g.mlp for g in groups if g.mlp.family == "moe"]
    gdn = any(g.mixer.family == "gated_delta_net" for g in groups)
    a0 = attns[0] if attns else None

    def cfg(
        field: str, *names: str, default: object = None, has_default: bool = False, comment: str = ""
    ) -> ConfigField:
        return ConfigField(field, "config", names=names, default=default, has_default=has_default,  # type: ignore[arg-type]
                           comment=comment)

    def const(field: str, value: bool | int | float | str | None, comment: str = "") -> ConfigField:
        return ConfigField(field, "const", default=value, has_default=True, comment=comment)

    fields = [
        cfg("num_layers", "num_hidden_layers"),
        cfg("hidden_size", "hidden_size"),
        cfg("num_attention_heads", "num_attention_heads"),
        cfg("num_query_groups", "num_key_value_heads", "num_attention_heads",
            comment="GQA groups; MHA when the config has no num_key_value_heads"),
        ConfigField("kv_channels", "head_dim", comment="head_dim, else hidden_size // num_attention_heads"),
        cfg("ffn_hidden_size", "intermediate_size", "moe_intermediate_size"),
        cfg("vocab_size", "vocab_size"),
        cfg("max_position_embeddings", "max_position_embeddings", default=4096, has_default=True),
        ConfigField("layer_kinds", "layer_kinds", comment="per layer, from the scanned layer groups"),
        ConfigField("mlp_kinds", "mlp_kinds", comment="per layer, from the scanned layer groups"),
        const("add_qkv_bias", bool(a0 and a0.key("q_bias"))),
        const("add_bias_linear", bool(a0 and a0.key("o_bias"))),
        const("qk_layernorm", bool(a0 and a0.key("q_norm"))),
        const("attention_output_gate", bool(a0 and a0.flag("output_gate"))),
        cfg("rotary_base", "rope_theta", "rope_parameters.rope_theta", default=10000.0, has_default=True),
        cfg("rotary_percent", "partial_rotary_factor", "rope_parameters.partial_rotary_factor", default=1.0,
            has_default=True),
        ConfigField("rope_scaling", "rope_scaling", comment="Llama-3 RoPE scaling; other scalings are refused"),
        ConfigField("rope_scaling_factor", "rope_scaling_factor"),
        cfg("norm_epsilon", "rms_norm_eps", "layer_norm_eps", default=1e-6, has_default=True),
        const("layernorm_zero_centered_gamma", zero_centered,
              "HF norms compute (1 + w) * x" if zero_centered else ""),
        const("untie_embeddings_and_output_weights", not lm.tied_embeddings),
    ]
    if moes:
        m0 = moes[0]
        fields += [
            cfg("num_moe_experts", "num_experts", "num_local_experts", "n_routed_experts"),
            cfg("moe_router_topk", "num_experts_per_tok", "moe_topk"),
            cfg("moe_ffn_hidden_size", "moe_intermediate_size", "intermediate_size"),
            const("moe_router_enable_expert_bias", bool(m0.key("expert_bias"))),
            const("moe_shared_expert_gate", bool((shared := m0.child("shared")) and shared.key("gate"))),
        ]
        if m0.child("shared") is not None:
            fields.append(cfg("moe_shared_expert_intermediate_size", "shared_expert_intermediate_size",
                              "moe_intermediate_size"))
    if gdn:
        fields += [
            cfg("linear_num_key_heads", "linear_num_key_heads"),
            cfg("linear_num_value_heads", "linear_num_value_heads"),
            cfg("linear_key_head_dim", "linear_key_head_dim"),
            cfg("linear_value_head_dim", "linear_value_head_dim"),
            cfg("linear_conv_kernel_dim", "linear_conv_kernel_dim"),
        ]
    if lm.mtp is not None:
        fields += [
            ConfigField("mtp_num_layers", "mtp_depth", comment="MTP depth from the keys, not from the config"),
            ConfigField("mtp_layer_kind", "mtp_layer_kind"),
            ConfigField("mtp_mlp_kind", "mtp_mlp_kind"),
        ]
    return tuple(fields)


def _group_line(group: LayerGroup) -> str:
    mlp = group.mlp
    experts = experts_of(mlp)
    if experts is not None:
        shared = ", shared expert" if mlp.child("shared") else ""
        mlp_text = f"MoE ({experts.flag('layout')} experts{shared})"
    else:
        mlp_text = "dense gated MLP"
    return f"{group.name}: {group.mixer.family} + {mlp_text}"


def _description(layout: Layout, fp: str) -> tuple[str, ...]:
    """Docstring lines; only fingerprint-relevant facts (never dimensions), so that every checkpoint with
    this layout renders the same module."""
    lm = layout.language_model
    lines = [
        f"Bridge for model_type {layout.model_type!r}, layout fingerprint {fp}.",
        f"Language model under {lm.prefix!r}; tied embeddings: {lm.tied_embeddings}.",
        "Decoder layer groups: " + "; ".join(_group_line(g) for g in lm.groups) + ".",
    ]
    if lm.mtp is not None:
        inner = "; ".join(_group_line(g) for g in lm.mtp.inner)
        lines.append(f"MTP: scheme {lm.mtp.scheme}, any depth; inner layer {inner}.")
    else:
        lines.append("MTP: none.")
    if layout.towers:
        lines.append("Carried through unchanged: " + ", ".join(t.name for t in layout.towers) + ".")
    return tuple(lines)


def plan(layout: Layout) -> BridgePlan:
    """Plan a bridge for ``layout`` or raise :class:`MapgenError` listing every unsupported family."""
    planner = _Planner(layout)
    planner.plan()
    if planner.problems:
        raise MapgenError(sorted(set(planner.problems)))
    fp = fingerprint(layout)
    return BridgePlan(
        fingerprint=fp,
        module_name=module_name(layout, fp),
        model_type=layout.model_type,
        description=_description(layout, fp),
        config=_config(layout, planner.zero_centered),
        rules=tuple(planner.rules),
    )
