"""Expanding symbolic structure into concrete names.

* :func:`layout_keys` — every HF key a layout describes (the IR is symbolic; this is its meaning). Scan
  checks that it equals the checkpoint's key set, the proof checks that the rules consume exactly it.
* :func:`rule_instances` — every concrete (Megatron name, HF keys) pair a rule stands for, with the layer,
  HF layer and expert it was instantiated for. The runtime and the proof share it, so what is proven is
  what runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from mapgen.families.moe import experts_of, num_experts
from mapgen.ir import MTP, LayerGroup, Layout
from mapgen.plan.rules import Rule

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}|\{([0-9,\.]+)\}")


def group_suffixes(group: LayerGroup) -> list[str]:
    """Every key suffix of a layer group: the slots of its components (by their declared role, keys only)."""
    return [key for component in group.components for key in component.all_keys()]


def _expand_suffix(suffix: str, experts: int | None) -> Iterator[str]:
    if "{expert}" in suffix:
        if experts is None:
            raise ValueError(f"{suffix!r} names an expert outside a MoE block")
        for e in range(experts):
            yield suffix.replace("{expert}", str(e))
    else:
        yield suffix


def group_keys(group: LayerGroup, offset: int = 0) -> Iterator[str]:
    experts = num_experts(group.mlp) if experts_of(group.mlp) is not None else None
    suffixes = group_suffixes(group)
    for layer in group.layers:
        root = group.root.replace("{layer}", str(layer + offset))
        for suffix in suffixes:
            for s in _expand_suffix(suffix, experts):
                yield root + s


def mtp_keys(mtp: MTP) -> Iterator[str]:
    fields = [k for s in ("enorm", "hnorm", "eh_proj", "final_norm") if (k := mtp.parts.key(s))]
    copies = [k for s in ("embed_copy", "head_copy") if (k := mtp.parts.key(s))]
    if mtp.shared:
        yield from fields
        fields = []
    for depth in range(mtp.depth):
        root = mtp.root.replace("{layer}", str(depth + mtp.index_offset))
        for f in fields + copies:
            yield root + f
    for group in mtp.inner:
        yield from group_keys(group, mtp.index_offset)


def expand_braces(pattern: str) -> Iterator[str]:
    """``a.{0..2}.b`` / ``a.{0,3}.b`` -> concrete strings (for tower patterns)."""
    m = _BRACES.search(pattern)
    if m is None:
        yield pattern
        return
    if m.group(1) is not None:
        values = [str(v) for v in range(int(m.group(1)), int(m.group(2)) + 1)]
    else:
        values = []
        for part in m.group(3).split(","):
            lo, _, hi = part.partition("..")
            values += [str(v) for v in range(int(lo), int(hi or lo) + 1)]
    for v in values:
        yield from expand_braces(pattern[: m.start()] + v + pattern[m.end():])


def language_model_keys(layout: Layout) -> set[str]:
    lm = layout.language_model
    keys = {lm.embedding, lm.final_norm}
    if lm.lm_head is not None:
        keys.add(lm.lm_head)
    for group in lm.groups:
        keys.update(group_keys(group))
    if lm.mtp is not None:
        keys.update(mtp_keys(lm.mtp))
    return keys


def tower_keys(layout: Layout) -> set[str]:
    out: set[str] = set()
    for tower in layout.towers:
        for pattern in tower.patterns:
            out.update(expand_braces(pattern))
    return out


def layout_keys(layout: Layout) -> set[str]:
    return language_model_keys(layout) | tower_keys(layout)


# ---------------------------------------------------------------------------------------------------------
# Rule instances
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instance:
    rule: Rule
    megatron: str
    hf: tuple[str, ...]
    layer: int | None
    hf_layer: int | None
    expert: int | None


def _domain_group(layout: Layout, domain: str) -> tuple[LayerGroup | None, list[int], int]:
    """(group, layer indices, hf offset) for a rule domain."""
    lm = layout.language_model
    if domain == "global":
        return None, [], 0
    kind, _, name = domain.partition(":")
    if kind == "decoder":
        for g in lm.groups:
            if g.name == name:
                return g, list(g.layers), 0
        raise KeyError(f"domain {domain!r}: the layout has no decoder layer group {name!r}")
    if kind == "mtp":
        if lm.mtp is None:
            return None, [], 0  # no MTP in this checkpoint: MTP rules have no instances
        if not name:
            return None, list(range(lm.mtp.depth)), lm.mtp.index_offset
        for g in lm.mtp.inner:
            if g.name == name:
                return g, list(g.layers), lm.mtp.index_offset
        raise KeyError(f"domain {domain!r}: the layout's MTP block has no inner layer group {name!r}")
    raise KeyError(f"unknown rule domain {domain!r}")


def rule_instances(rule: Rule, layout: Layout, mtp_inner: str) -> Iterator[Instance]:
    group, layers, offset = _domain_group(layout, rule.domain)

    def fill(pattern: str, layer: int | None, expert: int | None) -> str:
        out = pattern.replace("{mtp_inner}", mtp_inner)
        if layer is not None:
            out = out.replace("{layer}", str(layer)).replace("{hf_layer}", str(layer + offset))
        if expert is not None:
            out = out.replace("{expert}", str(expert))
        return out

    if rule.domain == "global":
        yield Instance(rule, fill(rule.megatron, None, None), tuple(fill(h, None, None) for h in rule.hf),
                       None, None, None)
        return
    moe = experts_of(group.mlp) if group is not None else None
    if rule.experts and (moe is None or group is None):
        raise KeyError(f"rule {rule.megatron!r} ranges over experts but domain {rule.domain!r} has no MoE block")
    experts: list[int | None] = list(range(num_experts(group.mlp))) if rule.experts and group is not None else [None]
    for layer in layers:
        for expert in experts:
            yield Instance(rule, fill(rule.megatron, layer, expert), tuple(fill(h, layer, expert) for h in rule.hf),
                           layer, layer + offset, expert)


def plan_instances(rules: tuple[Rule, ...], layout: Layout, mtp_inner: str) -> Iterator[Instance]:
    for rule in rules:
        yield from rule_instances(rule, layout, mtp_inner)
