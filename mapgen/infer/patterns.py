"""Key patterns: compress thousands of keys into a few brace patterns, and describe layer positions."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from mapgen.ir import IndexSet

_NUMBER = re.compile(r"0|[1-9][0-9]*")


def compress_keys(keys: Iterable[str]) -> list[tuple[str, int]]:
    """Group keys that differ only in numeric path segments.

    ``model.layers.0.mlp.down_proj.weight`` ... ``model.layers.47.mlp.down_proj.weight`` become
    ``("model.layers.{0..47}.mlp.down_proj.weight", 48)``. A position with a single value keeps the number.
    Returns ``(pattern, count)`` sorted by pattern.
    """
    groups: dict[tuple[str | None, ...], tuple[list[set[int]], list[int]]] = {}
    for key in keys:
        parts = key.split(".")
        template = tuple(None if _NUMBER.fullmatch(p) else p for p in parts)
        numbers = [int(p) for p in parts if _NUMBER.fullmatch(p)]
        slot = groups.get(template)
        if slot is None:
            slot = ([set() for _ in numbers], [0])
            groups[template] = slot
        for values, n in zip(slot[0], numbers, strict=True):
            values.add(n)
        slot[1][0] += 1
    out: list[tuple[str, int]] = []
    for template, (per_position, count) in groups.items():
        it = iter(per_position)
        parts_out: list[str] = []
        for part in template:
            if part is not None:
                parts_out.append(part)
                continue
            vals = next(it)
            parts_out.append(str(next(iter(vals))) if len(vals) == 1 else IndexSet.of(vals).braces())
        out.append((".".join(parts_out), count[0]))
    return sorted(out)


def _ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"


def describe_positions(positions: Sequence[int], total: int) -> str:
    """Human description of which of ``total`` layers are in ``positions``: ``every 4th``, ``first 3``,
    ``layers {0..2,5}``."""
    pos = sorted(positions)
    if not pos:
        return "none"
    if len(pos) == total:
        return "all"
    for k in range(2, total + 1):
        if pos == list(range(k - 1, total, k)):
            return f"every {_ordinal(k)}"
    for k in range(2, total + 1):
        if pos == list(range(0, total, k)):
            return f"every {_ordinal(k)} from layer 0"
    if pos == list(range(len(pos))):
        return f"first {len(pos)}"
    if pos == list(range(total - len(pos), total)):
        return f"last {len(pos)}"
    return "layers " + IndexSet.of(pos).braces()


def layer_pattern(kinds: Sequence[str], labels: dict[str, str] | None = None) -> str:
    """``"40 layers = 30 gated-delta-net + 10 attention (every 4th)"`` from per-layer kinds."""
    labels = labels or {}
    total = len(kinds)
    if total == 0:
        return "0 layers"
    order: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        order.setdefault(kind, []).append(i)
    if len(order) == 1:
        (kind,) = order
        return f"{total} layers, all {labels.get(kind, kind)}"
    ranked = sorted(order.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
    parts = [f"{len(ranked[0][1])} {labels.get(ranked[0][0], ranked[0][0])}"]
    for kind, pos in ranked[1:]:
        parts.append(f"{len(pos)} {labels.get(kind, kind)} ({describe_positions(pos, total)})")
    return f"{total} layers = " + " + ".join(parts)
