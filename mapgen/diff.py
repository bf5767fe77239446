"""Layout differences between two checkpoints (pure: returns data and text; ``mapgen diff`` prints it).

:func:`diff_layouts` walks both IR trees and reports

* **structure** — what the layout fingerprint sees: model types, key names and prefixes, layer families,
  expert storage (per block: the MTP block's own), MTP scheme, towers. Each change names a readable path
  (``MTP inner layer 'attention': routed experts per_expert -> packed (mtp.layers.{layer}.mlp...)``);
* **dimensions** — what a bridge takes from the config at run time: sizes, layer and expert counts, which
  layers belong to which group, MTP depth, tower key counts;

and whether the two layouts share one bridge (equal :func:`~mapgen.contract.fingerprint.fingerprint`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mapgen.contract.fingerprint import fingerprint, fingerprint_data
from mapgen.families.moe import experts_of, num_experts
from mapgen.ir import MTP, Component, LayerGroup, Layout

__all__ = ["Change", "LayoutDiff", "diff_layouts", "render_diff"]

_LABELS = {
    "experts": "routed experts",
    "shared": "shared expert",
    "mlp": "",
    "router": "router",
    "router_bias": "router bias",
    "expert_bias": "expert score bias",
    "input_norm": "input norm",
    "post_attention_norm": "post-attention norm",
}
_FAMILY_LABELS = {
    "attention": "attention",
    "gated_delta_net": "gated-delta-net",
    "mla": "MLA",
    "dense_mlp": "dense MLP",
    "moe": "MoE",
    "experts": "routed experts",
    "shared_expert": "shared expert",
    "norms": "block norms",
}
# Config sizes not in :class:`~mapgen.ir.Dims` that a bridge still reads.
_CONFIG_SIZES = (
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "first_k_dense_replace",
    "full_attention_interval",
    "decoder_sparse_step",
    "max_position_embeddings",
)


@dataclass(frozen=True)
class Change:
    """One difference: where (a readable path), what it was and what it is; ``keys`` are B's key patterns
    (A's when the thing is gone in B) that the change concerns."""

    path: str
    before: str
    after: str
    keys: tuple[str, ...] = ()

    def render(self) -> str:
        keys = f" ({', '.join(self.keys)})" if self.keys else ""
        sep = " " if ":" in self.path else ": "
        return f"{self.path}{sep}{self.before} -> {self.after}{keys}"


@dataclass(frozen=True)
class LayoutDiff:
    structure: tuple[Change, ...]
    dimensions: tuple[Change, ...]
    fingerprint_a: str
    fingerprint_b: str

    @property
    def same_bridge(self) -> bool:
        return self.fingerprint_a == self.fingerprint_b

    @property
    def identical(self) -> bool:
        return self.same_bridge and not self.structure and not self.dimensions


# ---------------------------------------------------------------------------------------------------------
# Structure: a walk over the IR trees
# ---------------------------------------------------------------------------------------------------------
def _family(c: Component) -> str:
    return _FAMILY_LABELS.get(c.family, c.family)


def _keys(c: Component, root: str) -> tuple[str, ...]:
    """The key patterns (``root`` + suffix) a component holds, gate/up before down as people list them."""
    own = sorted(c.slots, key=lambda kv: kv[0].startswith("down"))
    return tuple(root + v for _, v in own) + tuple(k for _, child in c.children for k in _keys(child, root))


def _path(parts: tuple[str, ...]) -> str:
    """``("layer group 'x'", "shared expert", "gate")`` -> ``layer group 'x': shared expert gate``."""
    head, rest = parts[0], [p for p in parts[1:] if p]
    return f"{head}: {' '.join(rest)}" if rest else head


def _fmt(value: Any, root: str, key_field: bool) -> str:
    if value is None:
        return "absent"
    if key_field and isinstance(value, str):
        return root + value
    if isinstance(value, tuple | list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _storage(x: Component) -> str:
    """``per_expert`` / ``packed`` plus what differs from plain ``[E, out, in]`` packing."""
    layout, quant = str(x.flag("layout")), str(x.flag("quant", "none"))
    extra = [
        flag
        for flag, on in (
            ("in_out", layout == "packed" and x.flag("orientation") == "in_out"),
            ("gate/up interleaved", bool(x.flag("gate_up_interleave"))),
            (quant, quant != "none"),
        )
        if on
    ]
    return layout + (f" [{', '.join(extra)}]" if extra else "")


def _walk(path: tuple[str, ...], a: Component | None, b: Component | None, root_a: str, root_b: str,
          out: list[Change]) -> None:
    """Compare two components by their typed roles: slots (keys), flags, children. Counts are dimensions."""
    if a is None and b is None:
        return
    if a is None or b is None or a.family != b.family:
        before = _family(a) if a is not None else "absent"
        after = _family(b) if b is not None else "absent"
        keys = _keys(b, root_b) if b is not None else _keys(a, root_a) if a is not None else ()
        out.append(Change(_path(path), before, after, keys))
        return
    if a.family == "experts" and a.flag("layout") != b.flag("layout"):
        out.append(Change(_path(path), _storage(a), _storage(b), _keys(b, root_b)))
        return
    sa, sb = dict(a.slots), dict(b.slots)
    for name in sorted(sa.keys() | sb.keys()):
        if sa.get(name) != sb.get(name):
            label = _LABELS.get(name, name.replace("_", " "))
            before, after = _fmt(sa.get(name), root_a, True), _fmt(sb.get(name), root_b, True)
            out.append(Change(_path((*path, label)), before, after))
    fa, fb = dict(a.flags), dict(b.flags)
    for name in sorted(fa.keys() | fb.keys()):
        if fa.get(name) != fb.get(name):
            out.append(Change(_path((*path, name.replace("_", " "))), _fmt(fa.get(name), "", False),
                              _fmt(fb.get(name), "", False)))
    if a.variant != b.variant and not out:
        out.append(Change(_path((*path, "variant")), a.variant, b.variant))
    ca, cb = dict(a.children), dict(b.children)
    for name in sorted(ca.keys() | cb.keys()):
        if ca.get(name) != cb.get(name):
            x, y = ca.get(name), cb.get(name)
            sub = _LABELS.get(name, _family(x if x is not None else y))  # type: ignore[arg-type]
            _walk((*path, sub), x, y, root_a, root_b, out)


def _by_name(groups: tuple[LayerGroup, ...], strip: str = "") -> dict[str, LayerGroup]:
    return {g.name.removeprefix(strip): g for g in groups}


def _groups(kind: str, a: tuple[LayerGroup, ...], b: tuple[LayerGroup, ...], strip: str, out: list[Change]) -> None:
    ga, gb = _by_name(a, strip), _by_name(b, strip)
    for name in sorted(ga.keys() | gb.keys(), key=lambda n: (n not in ga, n)):
        path = f"{kind} '{name}'"
        x, y = ga.get(name), gb.get(name)
        if x is None or y is None:
            present = x or y
            assert present is not None
            desc = f"{_family(present.mixer)} + {_family(present.mlp)}"
            keys = (*_keys(present.block, present.root), *_keys(present.mixer, present.root))[:3]
            out.append(Change(path, desc if x else "absent", desc if y else "absent", (*keys, "...")))
            continue
        if x.root != y.root:
            out.append(Change(f"{path}: key root", x.root, y.root))
        _walk((path, ""), x.block, y.block, x.root, y.root, out)
        same = x.mixer.family == y.mixer.family
        _walk((path, _family(x.mixer) if same else "mixer"), x.mixer, y.mixer, x.root, y.root, out)
        same = x.mlp.family == y.mlp.family
        label = ("" if x.mlp.family == "moe" else _family(x.mlp)) if same else "MLP"
        _walk((path, label), x.mlp, y.mlp, x.root, y.root, out)


def _mtp(a: MTP | None, b: MTP | None, out: list[Change]) -> None:
    if a is None and b is None:
        return
    if a is None or b is None:
        present = a or b
        assert present is not None
        desc = f"{present.scheme} (root {present.root})"
        out.append(Change("MTP", desc if a else "none", desc if b else "none"))
        return
    for fname in ("scheme", "root"):
        va, vb = getattr(a, fname), getattr(b, fname)
        if va != vb:
            out.append(Change(f"MTP: {fname.replace('_', ' ')}", str(va), str(vb)))
    for fname in ("shared", "eh_proj_order"):
        va, vb = a.parts.flag(fname), b.parts.flag(fname)
        if va != vb:
            out.append(Change(f"MTP: {fname.replace('_', ' ')}", str(va), str(vb)))
    for fname in ("enorm", "hnorm", "eh_proj", "final_norm", "embed_copy", "head_copy"):
        va, vb = a.parts.key(fname), b.parts.key(fname)
        if va != vb:
            out.append(
                Change(
                    f"MTP: {fname.replace('_', ' ')}",
                    _fmt(va, "" if a.shared else a.root, True),
                    _fmt(vb, "" if b.shared else b.root, True),
                )
            )
    _groups("MTP inner layer", a.inner, b.inner, "mtp_", out)


def _structure(a: Layout, b: Layout) -> list[Change]:
    out: list[Change] = []
    for fname, label in (
        ("model_type", "model type"),
        ("text_model_type", "text model type"),
        ("architectures", "architectures"),
        ("quantization", "quantization"),
    ):
        va, vb = getattr(a, fname), getattr(b, fname)
        if va != vb:
            out.append(Change(label, _fmt(va, "", False), _fmt(vb, "", False)))
    la, lb = a.language_model, b.language_model
    for fname in ("prefix", "embedding", "final_norm", "lm_head", "tied_embeddings"):
        va, vb = getattr(la, fname), getattr(lb, fname)
        if va != vb:
            out.append(Change(f"language model: {fname.replace('_', ' ')}", _fmt(va, "", False), _fmt(vb, "", False)))
    _groups("layer group", la.groups, lb.groups, "", out)
    _mtp(la.mtp, lb.mtp, out)
    ta, tb = {t.name: t for t in a.towers}, {t.name: t for t in b.towers}
    for name in sorted(ta.keys() | tb.keys()):
        x, y = ta.get(name), tb.get(name)
        if x is None or y is None:
            out.append(Change(f"tower '{name}'", f"{x.prefix}*" if x else "absent", f"{y.prefix}*" if y else "absent"))
        elif x.prefix != y.prefix:
            out.append(Change(f"tower '{name}': prefix", x.prefix, y.prefix))
    return out


def _generic(a: Any, b: Any, path: str = "") -> Iterator[Change]:
    """A plain JSON diff: the safety net when the walk above misses a fingerprint difference."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys()):
            yield from _generic(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _generic(x, y, f"{path}[{i}]")
    elif a != b:
        yield Change(path, str(a), str(b))


# ---------------------------------------------------------------------------------------------------------
# Dimensions
# ---------------------------------------------------------------------------------------------------------
def _config_value(config: Mapping[str, Any], name: str) -> Any:
    text = config.get("text_config")
    for scope in (text if isinstance(text, Mapping) else {}, config):
        if scope.get(name) is not None:
            return scope[name]
    return None


def _experts_count(group: LayerGroup) -> int | None:
    return num_experts(group.mlp) if experts_of(group.mlp) is not None else None


def _dimensions(a: Layout, b: Layout) -> list[Change]:
    out: list[Change] = []
    la, lb = a.language_model, b.language_model
    if la.num_layers != lb.num_layers:
        out.append(Change("decoder layers", str(la.num_layers), str(lb.num_layers)))
    for f in dataclasses.fields(a.dims):
        va, vb = getattr(a.dims, f.name), getattr(b.dims, f.name)
        if va != vb:
            out.append(Change(f.name, str(va or "-"), str(vb or "-")))
    for name in _CONFIG_SIZES:
        va, vb = _config_value(a.config, name), _config_value(b.config, name)
        if va != vb:
            out.append(Change(name, "-" if va is None else str(va), "-" if vb is None else str(vb)))

    def groups(kind: str, ga: tuple[LayerGroup, ...], gb: tuple[LayerGroup, ...], strip: str) -> None:
        xa, xb = _by_name(ga, strip), _by_name(gb, strip)
        for name in sorted(xa.keys() & xb.keys()):
            x, y = xa[name], xb[name]
            if x.layers != y.layers:
                out.append(Change(f"{kind} '{name}': layers", x.layers.braces(), y.layers.braces()))
            ea, eb = _experts_count(x), _experts_count(y)
            if ea is not None and eb is not None and ea != eb:
                out.append(Change(f"{kind} '{name}': routed experts", str(ea), str(eb)))

    groups("layer group", la.groups, lb.groups, "")
    da = la.mtp.depth if la.mtp else 0
    db = lb.mtp.depth if lb.mtp else 0
    if da != db:
        out.append(Change("MTP depth", str(da), str(db)))
    if la.mtp is not None and lb.mtp is not None:
        if la.mtp.index_offset != lb.mtp.index_offset:
            out.append(Change("MTP first layer index", str(la.mtp.index_offset), str(lb.mtp.index_offset)))
        groups("MTP inner layer", la.mtp.inner, lb.mtp.inner, "mtp_")
    if a.summary.mtp_declared != b.summary.mtp_declared:
        out.append(Change("MTP depth declared by the config", str(a.summary.mtp_declared), str(b.summary.mtp_declared)))
    ta, tb = {t.name: t for t in a.towers}, {t.name: t for t in b.towers}
    for name in sorted(ta.keys() & tb.keys()):
        if ta[name].num_keys != tb[name].num_keys:
            out.append(Change(f"tower '{name}': keys", str(ta[name].num_keys), str(tb[name].num_keys)))
    if a.summary.unclassified_keys != b.summary.unclassified_keys:
        out.append(Change("unclassified keys", str(a.summary.unclassified_keys), str(b.summary.unclassified_keys)))
    return out


def diff_layouts(a: Layout, b: Layout) -> LayoutDiff:
    fa, fb = fingerprint(a), fingerprint(b)
    structure = _structure(a, b)
    if fa != fb and not structure:  # never report "same structure" for different bridges
        structure = list(_generic(fingerprint_data(a), fingerprint_data(b)))
    return LayoutDiff(tuple(structure), tuple(_dimensions(a, b)), fa, fb)


def render_diff(diff: LayoutDiff, name_a: str, name_b: str) -> str:
    lines = [f"--- {name_a}  (fingerprint {diff.fingerprint_a})", f"+++ {name_b}  (fingerprint {diff.fingerprint_b})"]
    lines.append("structure:")
    lines += [f"  {c.render()}" for c in diff.structure] or ["  identical"]
    lines.append("dimensions:")
    lines += [f"  {c.render()}" for c in diff.dimensions] or ["  identical"]
    if diff.same_bridge:
        lines.append(f"bridge: shared (fingerprint {diff.fingerprint_a})")
    else:
        lines.append(f"bridge: different ({diff.fingerprint_a} -> {diff.fingerprint_b})")
    return "\n".join(lines) + "\n"
