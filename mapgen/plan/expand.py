"""Expanding symbolic structure into concrete names.

:func:`layout_keys` — every HF key a layout describes (the IR is symbolic; this is its meaning). Scan checks
that it equals the checkpoint's key set, the proof checks that the rules consume exactly it. The concrete
instances of the rules and the tower keys (carried through unchanged) live in :mod:`mapgen.contract.expand`,
shared with the runtime.
"""

from __future__ import annotations

from collections.abc import Iterator

from mapgen.contract.expand import tower_keys
from mapgen.families.moe import experts_of, num_experts
from mapgen.ir import MTP, LayerGroup, Layout


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


def language_model_keys(layout: Layout) -> set[str]:
    lm = layout.language_model
    keys = set(lm.top.own_keys())  # embedding, final norm (+ its bias), lm_head when untied
    for group in lm.groups:
        keys.update(group_keys(group))
    if lm.mtp is not None:
        keys.update(mtp_keys(lm.mtp))
    return keys


def layout_keys(layout: Layout) -> set[str]:
    return language_model_keys(layout) | tower_keys(layout)
