"""The stable :class:`~mapgen.ir.Summary` of a layout, and its readable text form (pure: returns text)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from mapgen.families import behaviour, suggest
from mapgen.families.moe import experts_of, num_experts
from mapgen.infer.patterns import layer_pattern
from mapgen.ir import Component, ExpertLayout, LanguageModel, LayerGroup, Layout, Summary, Tower

KIND_LABELS = {
    "attention": "attention",
    "sliding_attention": "sliding-window attention",
    "gated_delta_net": "gated-delta-net",
    "mla": "MLA",
    "linear_attention": "lightning attention",
    "mamba": "Mamba",
}


def per_layer_kinds(groups: Sequence[LayerGroup]) -> list[str]:
    by_layer = {i: behaviour(g.mixer).kind(g.mixer) for g in groups for i in g.layers}
    return [by_layer[i] for i in sorted(by_layer)]


def _expert_layout(groups: Sequence[LayerGroup]) -> ExpertLayout:
    layouts = [str(e.flag("layout")) for g in groups if (e := experts_of(g.mlp)) is not None]
    return "packed" if layouts and layouts[0] == "packed" else "per_expert" if layouts else "none"


def _pattern(kinds: list[str], num_layers: int) -> str:
    """The layer pattern of the classified layers; layers no family classified are counted, never hidden."""
    if len(kinds) >= num_layers:
        return layer_pattern(kinds, KIND_LABELS)
    if not kinds:
        return f"{num_layers} layers, none classified (see the unclassified keys)"
    return f"{layer_pattern(kinds, KIND_LABELS)}; {num_layers - len(kinds)} of {num_layers} layers unclassified"


def make_summary(
    *,
    model_type: str,
    language_model: LanguageModel,
    towers: Sequence[Tower],
    unclassified_keys: int,
    mtp_declared: int,
) -> Summary:
    groups = language_model.groups
    kinds = per_layer_kinds(groups)
    moe = [g for g in groups if experts_of(g.mlp) is not None]
    mtp = language_model.mtp
    return Summary(
        model_type=model_type,
        num_layers=language_model.num_layers,
        attention=tuple(sorted(Counter(kinds).items())),
        moe_layers=sum(len(g.layers) for g in moe),
        num_experts=max((num_experts(g.mlp) for g in moe), default=0),
        expert_layout=_expert_layout(groups),
        shared_experts=any(g.mlp.child("shared") is not None for g in moe),
        mtp_depth=mtp.depth if mtp else 0,
        mtp_scheme=mtp.scheme if mtp else "none",
        mtp_expert_layout=_expert_layout(mtp.inner) if mtp else "none",
        tied_embeddings=language_model.tied_embeddings,
        unclassified_keys=unclassified_keys,
        towers=tuple(t.name for t in towers),
        layer_pattern=_pattern(kinds, language_model.num_layers),
        mtp_declared=mtp_declared,
    )


# ---------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------
def describe(c: Component) -> str:
    """One human line for a mixer or MLP component (its family module words it)."""
    return behaviour(c).describe(c)


def table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> list[str]:
    """Plain aligned columns (no dependencies)."""
    allrows = [list(header)] if header else []
    allrows += [list(r) for r in rows]
    if not allrows:
        return []
    widths = [max(len(r[i]) for r in allrows) for i in range(len(allrows[0]))]
    out = []
    for n, r in enumerate(allrows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if header and n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


_IN_LAYER = re.compile(r"^(?:.*?\.)?(?:layers|mtp_layers)\.(?:\{[0-9.,]+\}|[0-9]+)\.")


def did_you_mean(pattern: str) -> str:
    """The known spellings closest to an unclassified key pattern's in-layer suffix (``self_attn.q_nrm.weight``
    -> ``self_attn.q_norm.weight``), joined with " or "; empty when nothing is close."""
    suffix = _IN_LAYER.sub("", pattern)
    return " or ".join(suggest(suffix)) if suffix != pattern or "." in pattern else ""


def _printable(text: str) -> str:
    return text if text.isprintable() else ascii(text)


def render_summary(layout: Layout, origin: str = "") -> str:
    s, lm = layout.summary, layout.language_model
    rows: list[tuple[str, str]] = [
        ("source", _printable(origin)),
        (
            "model_type",
            s.model_type + (f" (text: {layout.text_model_type})" if layout.text_model_type != s.model_type else ""),
        ),
        ("architectures", ", ".join(layout.architectures) or "-"),
        ("language model", f"prefix {lm.prefix!r}, embedding {lm.embedding}"),
        ("layers", s.layer_pattern),
        ("MoE layers", f"{s.moe_layers} of {s.num_layers}" if s.moe_layers else "none"),
    ]
    if s.moe_layers:
        rows.append(("experts", f"{s.num_experts} per layer, {s.expert_layout.replace('_', '-')}"))
        rows.append(("shared experts", "yes" if s.shared_experts else "no"))
    mtp = lm.mtp
    if mtp is not None:
        inner = "; ".join(f"{g.name}: {describe(g.mixer)}, {describe(g.mlp)}" for g in mtp.inner)
        rows.append(
            (
                "MTP",
                f"depth {mtp.depth}, scheme {mtp.scheme}, root {mtp.root}"
                + (" (shared fc/norms)" if mtp.shared else ""),
            )
        )
        rows.append(("MTP inner layer", inner or "-"))
        if mtp.scheme != "none":
            rows.append(("MTP experts", s.mtp_expert_layout.replace("_", "-")))
    else:
        rows.append(
            ("MTP", "none" + (f" (config declares {s.mtp_declared}; no MTP tensors)" if s.mtp_declared else ""))
        )
    rows.append(("embeddings", "tied (no lm_head)" if lm.tied_embeddings else f"untied, lm_head {lm.lm_head}"))
    rows.append(("final norm", lm.final_norm))
    if layout.quantization != "none":
        rows.append(("quantization", layout.quantization))
    for t in layout.towers:
        rows.append((f"tower: {t.name}", f"{t.prefix}* ({t.num_keys} keys, {len(t.patterns)} patterns)"))
    rows.append(("unclassified", str(s.unclassified_keys)))
    lines = table(rows, ("component", "detail"))
    lines.append("")
    group_rows = [
        (g.name, str(len(g.layers)), g.layers.braces(), describe(g.mixer), describe(g.mlp)) for g in lm.groups
    ]
    lines += table(group_rows, ("group", "n", "layers", "mixer", "mlp"))
    if layout.unclassified:
        lines.append("")
        lines.append(f"unclassified keys ({s.unclassified_keys}):")
        for u in layout.unclassified:
            hint = did_you_mean(u.pattern)
            lines.append(f"  {_printable(u.pattern)}  ({u.count} keys)" + (f"  did you mean {hint}?" if hint else ""))
    return "\n".join(lines) + "\n"
