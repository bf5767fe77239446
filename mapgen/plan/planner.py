"""Planning: a scanned :class:`Layout` -> a :class:`BridgePlan` (layout-decided facts + ordered rules).

Pure and deterministic. Every rule names its Megatron parameter pattern in the global local-spec namespace
(see :mod:`mapgen.contract.rules`), the HF key pattern(s), the primitive and its declared sharding. Layer,
expert and MTP indices are placeholders whose index sets come from the layout's groups; nothing is
hard-coded to ``mtp.layers.0``.

Families the runtime cannot convert yet (MLA, attention sinks, MXFP4 experts, fused qkv, Qwen3-Next fused
GDN projections) make :func:`plan` raise a specific "not supported" error instead of producing a partial
bridge.
"""

from __future__ import annotations

import keyword
import re

from mapgen.contract.config import Facts
from mapgen.contract.fingerprint import fingerprint
from mapgen.contract.rules import Rule
from mapgen.errors import Diagnostic, MapgenError
from mapgen.infer.ir import (
    MTP,
    Attention,
    DenseMLP,
    GatedDeltaNet,
    LayerGroup,
    Layout,
    MoE,
)
from mapgen.plan.plan import BridgePlan

# Model types whose HF RMSNorms compute ``(1 + w) * x`` (zero-centred gamma) for every norm except the
# gated delta-net output norm, which is a plain ``w * x`` RMSNorm initialised to ones.
ZERO_CENTERED_MODEL_TYPES = frozenset(
    {"qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"}
)

_IDENT = re.compile(r"[^0-9a-zA-Z_]+")


class _Unsupported(Exception):
    pass


def module_name(layout: Layout) -> str:
    """The generated module of the layout's model type (it holds one bridge per fingerprint)."""
    base = _IDENT.sub("_", layout.model_type.lower()).strip("_") or "model"
    if not base[0].isalpha() or keyword.iskeyword(base) or base in {"inputs", "supported"}:
        base = f"m_{base}"
    return base


# ---------------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------------
def _opts(**kw: str | int | bool) -> tuple[tuple[str, str | int | bool], ...]:
    return tuple(sorted(kw.items()))


class _Planner:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.lm = layout.language_model
        self.zero_centered = layout.model_type in ZERO_CENTERED_MODEL_TYPES or (
            layout.text_model_type in ZERO_CENTERED_MODEL_TYPES
        )
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
        self.add("embedding", "embedding.word_embeddings.weight", (lm.embedding,), "copy", "vocab",
                 domain="global", comment="Token embedding: vocab-parallel; padded on import, truncated on export.")
        for group in lm.groups:
            self.group(group, "decoder.layers.{layer}.", group.root, f"decoder:{group.name}")
        self.add("final_norm", "decoder.final_layernorm.weight", (lm.final_norm,), "copy", "replicated",
                 domain="global", comment="Final norm before the output layer.")
        if lm.lm_head is not None and not lm.tied_embeddings:
            self.add("output", "output_layer.weight", (lm.lm_head,), "copy", "vocab", domain="global",
                     comment="Output layer (untied): vocab-parallel.")
        if lm.mtp is not None:
            self.mtp(lm.mtp)

    # -- one decoder layer group --------------------------------------------------------------------------
    def group(self, group: LayerGroup, mroot: str, hroot: str, domain: str) -> None:
        name = group.name
        mixer = group.mixer
        if isinstance(mixer, Attention):
            self.add("norm.input", f"{mroot}input_layernorm.weight", (hroot + group.input_norm,), "copy",
                     "replicated", domain=domain, comment=f"[{name}] Pre-attention norm.")
            self.attention(mixer, mroot, hroot, domain, name)
        elif isinstance(mixer, GatedDeltaNet):
            self.add("norm.input", f"{mroot}self_attention.in_proj.layer_norm_weight",
                     (hroot + group.input_norm,), "copy", "replicated", domain=domain,
                     comment=f"[{name}] Pre-mixer norm, fused into the gated delta-net in_proj.")
            self.gdn(mixer, mroot, hroot, domain, name)
        else:
            self.unsupported(f"{mixer.family} attention", hroot + getattr(mixer, "o", ""))
            return
        self.add("norm.post_attention", f"{mroot}pre_mlp_layernorm.weight", (hroot + group.post_attention_norm,),
                 "copy", "replicated", domain=domain, comment=f"[{name}] Pre-MLP norm.")
        if isinstance(group.mlp, DenseMLP):
            self.dense(group.mlp, f"{mroot}mlp.", hroot, domain, name, "mlp")
        else:
            self.moe(group.mlp, mroot, hroot, domain, name)

    def attention(self, a: Attention, mroot: str, hroot: str, domain: str, name: str) -> None:
        if a.qkv is not None or a.q is None or a.k is None or a.v is None:
            self.unsupported("a fused qkv projection", hroot + (a.qkv or "self_attn"))
            return
        if a.sinks is not None:
            self.unsupported("attention sinks", hroot + a.sinks)
            return
        gate = _opts(output_gate=a.output_gate, part="weight")
        self.add("attention.qkv", f"{mroot}self_attention.linear_qkv.weight",
                 (hroot + a.q, hroot + a.k, hroot + a.v), "qkv", "qkv_groups", domain=domain, options=gate,
                 comment=f"[{name}] q/k/v -> linear_qkv, interleaved per query group"
                 + (" (q_proj carries the output gate)" if a.output_gate else "") + "; TP splits whole groups.")
        biases = (a.q_bias, a.k_bias, a.v_bias)
        if any(biases):
            if not all(biases):
                self.unsupported("a partial q/k/v bias", hroot + str(next(b for b in biases if b)))
                return
            self.add("attention.qkv_bias", f"{mroot}self_attention.linear_qkv.bias",
                     tuple(hroot + str(b) for b in biases), "qkv", "qkv_groups", domain=domain,
                     options=_opts(output_gate=a.output_gate, part="bias"),
                     comment=f"[{name}] q/k/v biases, grouped like the weights.")
        self.add("attention.o", f"{mroot}self_attention.linear_proj.weight", (hroot + a.o,), "copy", "row",
                 domain=domain, comment=f"[{name}] Output projection: row-parallel.")
        if a.o_bias:
            self.add("attention.o_bias", f"{mroot}self_attention.linear_proj.bias", (hroot + a.o_bias,), "copy",
                     "replicated", domain=domain, comment=f"[{name}] Output projection bias.")
        if a.q_norm:
            self.add("attention.q_norm", f"{mroot}self_attention.q_layernorm.weight", (hroot + a.q_norm,),
                     "copy", "replicated", domain=domain, comment=f"[{name}] QK-norm on queries (per head).")
        if a.k_norm:
            self.add("attention.k_norm", f"{mroot}self_attention.k_layernorm.weight", (hroot + a.k_norm,),
                     "copy", "replicated", domain=domain, comment=f"[{name}] QK-norm on keys (per head).")

    def gdn(self, g: GatedDeltaNet, mroot: str, hroot: str, domain: str, name: str) -> None:
        if g.in_proj_qkvz is not None or g.in_proj_ba is not None:
            self.unsupported("Qwen3-Next fused in_proj_qkvz/in_proj_ba", hroot + str(g.in_proj_qkvz))
            return
        parts = (g.in_proj_qkv, g.in_proj_z, g.in_proj_b, g.in_proj_a)
        if not all(parts):
            self.unsupported("an incomplete gated delta-net projection set", hroot + "linear_attn")
            return
        sa = f"{mroot}self_attention."
        self.add("gdn.in_proj", f"{sa}in_proj.weight", tuple(hroot + str(p) for p in parts), "gdn_in_proj",
                 "gdn_heads", domain=domain,
                 comment=f"[{name}] in_proj_qkv/z/b/a -> fused in_proj, per TP rank [q k v z b a].")
        self.add("gdn.conv1d", f"{sa}conv1d.weight", (hroot + g.conv1d,), "gdn_conv1d", "gdn_heads",
                 domain=domain, comment=f"[{name}] Depthwise conv over [q k v] channels, split per TP rank.")
        if g.conv1d_bias:
            self.add("gdn.conv1d_bias", f"{sa}conv1d.bias", (hroot + g.conv1d_bias,), "gdn_conv1d", "gdn_heads",
                     domain=domain, comment=f"[{name}] Conv bias, split like the conv weight.")
        self.add("gdn.a_log", f"{sa}A_log", (hroot + g.a_log,), "copy", "column", domain=domain,
                 comment=f"[{name}] Per value-head decay (log), split over heads.")
        self.add("gdn.dt_bias", f"{sa}dt_bias", (hroot + g.dt_bias,), "copy", "column", domain=domain,
                 comment=f"[{name}] Per value-head dt bias, split over heads.")
        transform = "zero_centered" if self.zero_centered else "none"
        self.add("gdn.out_norm", f"{sa}out_norm.weight", (hroot + g.norm,), "copy", "replicated", domain=domain,
                 options=_opts(transform=transform),
                 comment=f"[{name}] Gated output norm"
                 + (": plain RMSNorm in HF, zero-centred in Megatron (w - 1 / w + 1)." if self.zero_centered
                    else "."))
        self.add("gdn.out_proj", f"{sa}out_proj.weight", (hroot + g.out_proj,), "copy", "row", domain=domain,
                 comment=f"[{name}] Output projection: row-parallel.")

    def dense(self, m: DenseMLP, mprefix: str, hroot: str, domain: str, name: str, family: str) -> None:
        if m.gate_bias or m.up_bias or m.down_bias:
            self.unsupported("MLP biases", hroot + str(m.gate_bias or m.up_bias or m.down_bias))
            return
        if m.gate_up is not None:
            fc1: tuple[str, ...] = (hroot + m.gate_up,)
            opts = _opts(fused=True)
        else:
            fc1 = (hroot + str(m.gate), hroot + str(m.up))
            opts = _opts(fused=False)
        self.add(f"{family}.fc1", f"{mprefix}linear_fc1.weight", fc1, "gated_fc1", "gated_column", domain=domain,
                 options=opts, comment=f"[{name}] gate + up -> linear_fc1, laid out per TP rank as [gate_r; up_r].")
        self.add(f"{family}.fc2", f"{mprefix}linear_fc2.weight", (hroot + m.down,), "copy", "row", domain=domain,
                 comment=f"[{name}] down -> linear_fc2: row-parallel.")

    def moe(self, m: MoE, mroot: str, hroot: str, domain: str, name: str) -> None:
        mlp = f"{mroot}mlp."
        self.add("moe.router", f"{mlp}router.weight", (hroot + m.router,), "copy", "replicated", domain=domain,
                 comment=f"[{name}] Router (replicated).")
        if m.router_bias:
            self.unsupported("a router bias", hroot + m.router_bias)
        if m.expert_bias:
            self.add("moe.expert_bias", f"{mlp}router.expert_bias", (hroot + m.expert_bias,), "copy",
                     "replicated", domain=domain, options=_opts(dtype="fp32"),
                     comment=f"[{name}] Expert score-correction bias, kept in fp32.")
        e = m.experts
        if e.quant != "none":
            self.unsupported(f"{e.quant} quantised experts", hroot + str(e.gate_up))
            return
        if e.gate_bias or e.up_bias or e.down_bias or e.gate_up_bias:
            self.unsupported("expert biases", hroot + str(e.gate_up_bias or e.down_bias))
            return
        local = f"{mlp}experts.local_experts.{{expert}}."
        if e.layout == "per_expert":
            fc1: tuple[str, ...] = (hroot + str(e.gate), hroot + str(e.up))
            opts = _opts(layout="per_expert")
            where = "per expert"
        else:
            fc1 = (hroot + str(e.gate_up),)
            opts = _opts(layout="packed", orientation=e.orientation, interleave=e.gate_up_interleave)
            where = f"packed 3-D [{'E, out, in' if e.orientation == 'out_in' else 'E, in, out'}]"
        self.add("moe.experts.fc1", f"{local}linear_fc1.weight", fc1, "expert_fc1", "expert_gated_column",
                 domain=domain, experts=True, options=opts,
                 comment=f"[{name}] Routed experts ({where}) gate + up -> local expert linear_fc1; EP picks the "
                 "experts, ETP splits each.")
        fc2_opts = _opts(layout=e.layout, orientation=e.orientation) if e.layout == "packed" else opts
        self.add("moe.experts.fc2", f"{local}linear_fc2.weight", (hroot + e.down,), "expert_fc2", "expert_row",
                 domain=domain, experts=True, options=fc2_opts,
                 comment=f"[{name}] Routed experts ({where}) down -> local expert linear_fc2.")
        if m.shared is not None:
            self.dense(m.shared.mlp, f"{mlp}shared_experts.", hroot, domain, name, "moe.shared")
            if m.shared.gate:
                self.add("moe.shared.gate", f"{mlp}shared_experts.gate_weight", (hroot + m.shared.gate,), "copy",
                         "replicated", domain=domain, comment=f"[{name}] Sigmoid gate of the shared expert.")

    # -- MTP ------------------------------------------------------------------------------------------------
    def mtp(self, mtp: MTP) -> None:
        hroot = mtp.root.replace("{layer}", "{hf_layer}") if mtp.index_offset else mtp.root

        def key(field: str) -> str:
            return field if mtp.shared else hroot + field

        shared_note = " (one HF tensor shared by every depth)" if mtp.shared else ""
        shared = _opts(shared=True) if mtp.shared else ()
        m = "mtp.layers.{layer}."
        self.add("mtp.enorm", f"{m}enorm.weight", (key(mtp.enorm),), "copy", "replicated", domain="mtp", options=shared,
                 comment=f"MTP embedding norm{shared_note}.")
        self.add("mtp.hnorm", f"{m}hnorm.weight", (key(mtp.hnorm),), "copy", "replicated", domain="mtp", options=shared,
                 comment=f"MTP hidden-state norm{shared_note}.")
        self.add("mtp.eh_proj", f"{m}eh_proj.weight", (key(mtp.eh_proj),), "mtp_eh_proj", "column", domain="mtp",
                 options=_opts(order=mtp.eh_proj_order, **dict(shared)),
                 comment=f"MTP projection of [embedding; hidden]{shared_note}; HF input order {mtp.eh_proj_order}.")
        self.add("mtp.final_norm", f"{m}final_layernorm.weight", (key(mtp.final_norm),), "copy", "replicated",
                 domain="mtp", options=shared, comment=f"MTP final norm{shared_note}.")
        if mtp.embed_copy:
            self.add("mtp.embed_copy", "embedding.word_embeddings.weight", (hroot + mtp.embed_copy,), "duplicate",
                     "vocab", domain="mtp", comment="HF stores a copy of the token embedding in every MTP layer.")
        if mtp.head_copy:
            target = "embedding.word_embeddings.weight" if self.lm.tied_embeddings else "output_layer.weight"
            self.add("mtp.head_copy", target, (hroot + mtp.head_copy,), "duplicate", "vocab", domain="mtp",
                     comment="HF stores a copy of the output layer in every MTP layer.")
        for group in mtp.inner:
            ghroot = group.root.replace("{layer}", "{hf_layer}") if mtp.index_offset else group.root
            self.group(group, "mtp.layers.{layer}.{mtp_inner}.", ghroot, f"mtp:{group.name}")


# ---------------------------------------------------------------------------------------------------------
# Facts: what the layout decides about the Megatron model (the config table in mapgen.contract.config does the rest)
# ---------------------------------------------------------------------------------------------------------
def _facts(layout: Layout, zero_centered: bool) -> Facts:
    lm = layout.language_model
    groups = list(lm.groups) + (list(lm.mtp.inner) if lm.mtp else [])
    attns = [g.mixer for g in groups if isinstance(g.mixer, Attention)]
    moes = [g.mlp for g in groups if isinstance(g.mlp, MoE)]
    a0 = attns[0] if attns else None
    m0 = moes[0] if moes else None
    return Facts(
        tied=lm.tied_embeddings,
        add_qkv_bias=bool(a0 and a0.q_bias),
        add_bias_linear=bool(a0 and a0.o_bias),
        qk_layernorm=bool(a0 and a0.q_norm),
        attention_output_gate=bool(a0 and a0.output_gate),
        zero_centered=zero_centered,
        moe=m0 is not None,
        expert_bias=bool(m0 and m0.expert_bias),
        shared_expert=bool(m0 and m0.shared),
        shared_expert_gate=bool(m0 and m0.shared and m0.shared.gate),
        gated_delta_net=any(isinstance(g.mixer, GatedDeltaNet) for g in groups),
    )


def _group_line(group: LayerGroup) -> str:
    mlp = group.mlp
    if isinstance(mlp, MoE):
        mlp_text = f"MoE ({mlp.experts.layout} experts" + (", shared expert" if mlp.shared else "") + ")"
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
        module_name=module_name(layout),
        model_type=layout.model_type,
        description=_description(layout, fp),
        facts=_facts(layout, planner.zero_centered),
        rules=tuple(planner.rules),
    )
