"""Rule instances: every concrete (Megatron name, HF keys) pair a rule stands for, with the layer, HF layer
and expert it was instantiated for. The runtime and the proof share it, so what is proven is what runs.

The layout is reached only through :func:`domain_index` (a rule domain's layer indices, HF index offset and
expert count) and :func:`tower_keys` (the keys carried through unchanged); the key sets a layout describes
(``layout_keys``) live with the planner in :mod:`mapgen.plan.expand`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from mapgen.contract.rules import Rule
from mapgen.ir import LayerGroup, Layout

__all__ = ["Instance", "domain_index", "expand_braces", "plan_instances", "rule_instances", "tower_keys"]

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}|\{([0-9,\.]+)\}")


@dataclass(frozen=True)
class Instance:
    rule: Rule
    megatron: str
    hf: tuple[str, ...]
    layer: int | None
    hf_layer: int | None
    expert: int | None


def _num_experts(group: LayerGroup) -> int | None:
    """The routed-expert count of a group's MoE block (``None`` without one)."""
    experts = group.mlp.child("experts")
    return int(experts.count("num_experts")) if experts is not None else None


def domain_index(layout: Layout, domain: str) -> tuple[list[int], int, int | None]:
    """(layer indices, HF index offset, number of experts or None) of a rule domain (see
    :mod:`mapgen.contract.rules`). ``global`` has no layers; a layout without MTP gives MTP domains none."""
    lm = layout.language_model
    if domain == "global":
        return [], 0, None
    kind, _, name = domain.partition(":")
    if kind == "decoder":
        for g in lm.groups:
            if g.name == name:
                return list(g.layers), 0, _num_experts(g)
        raise KeyError(f"domain {domain!r}: the layout has no decoder layer group {name!r}")
    if kind == "mtp":
        if lm.mtp is None:
            return [], 0, None  # no MTP in this checkpoint: MTP rules have no instances
        if not name:
            return list(range(lm.mtp.depth)), lm.mtp.index_offset, None
        for g in lm.mtp.inner:
            if g.name == name:
                return list(g.layers), lm.mtp.index_offset, _num_experts(g)
        raise KeyError(f"domain {domain!r}: the layout's MTP block has no inner layer group {name!r}")
    raise KeyError(f"unknown rule domain {domain!r}")


def rule_instances(rule: Rule, layout: Layout, mtp_inner: str) -> Iterator[Instance]:
    layers, offset, num_experts = domain_index(layout, rule.domain)

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
    if rule.experts and num_experts is None:
        raise KeyError(f"rule {rule.megatron!r} ranges over experts but domain {rule.domain!r} has no MoE block")
    experts: list[int | None] = list(range(num_experts)) if rule.experts and num_experts is not None else [None]
    for layer in layers:
        for expert in experts:
            yield Instance(rule, fill(rule.megatron, layer, expert), tuple(fill(h, layer, expert) for h in rule.hf),
                           layer, layer + offset, expert)


def plan_instances(rules: tuple[Rule, ...], layout: Layout, mtp_inner: str) -> Iterator[Instance]:
    for rule in rules:
        yield from rule_instances(rule, layout, mtp_inner)


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


def tower_keys(layout: Layout) -> set[str]:
    """Every key of the layout's towers (vision encoders, ...): carried through a conversion unchanged."""
    out: set[str] = set()
    for tower in layout.towers:
        for pattern in tower.patterns:
            out.update(expand_braces(pattern))
    return out
