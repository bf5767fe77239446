"""What a generated bridge is, at run time, and the per-layer facts a bridge reads off the scanned layout.

Importing it must stay cheap (no torch, no megatron-core): registry look-ups and ``mapgen scan`` never pay
for a framework import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mapgen.contract.hf_config import HFConfig
from mapgen.contract.rules import Rule
from mapgen.contract.spec import LayerKind, MlpKind, ModelSpec
from mapgen.infer.ir import LayerGroup, Layout

__all__ = ["Bridge", "layer_kinds", "mlp_kinds", "mtp_depth", "mtp_layer_kind", "mtp_mlp_kind"]


def _mixer_kind(group: LayerGroup) -> LayerKind:
    return "gated_delta_net" if group.mixer.family == "gated_delta_net" else "attention"


def _mlp_kind(group: LayerGroup) -> MlpKind:
    return "moe" if group.mlp.family == "moe" else "dense"


def _per_layer(groups: tuple[LayerGroup, ...], count: int, fn: Callable[[LayerGroup], str]) -> tuple[Any, ...]:
    out: list[str | None] = [None] * count
    for group in groups:
        for i in group.layers:
            out[i] = fn(group)
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise ValueError(f"layers {missing} belong to no layer group")
    return tuple(out)


def layer_kinds(layout: Layout) -> tuple[LayerKind, ...]:
    lm = layout.language_model
    return _per_layer(lm.groups, lm.num_layers, _mixer_kind)


def mlp_kinds(layout: Layout) -> tuple[MlpKind, ...]:
    lm = layout.language_model
    return _per_layer(lm.groups, lm.num_layers, _mlp_kind)


def mtp_depth(layout: Layout) -> int | None:
    mtp = layout.language_model.mtp
    return mtp.depth if mtp is not None and mtp.depth > 0 else None


def mtp_layer_kind(layout: Layout) -> LayerKind:
    mtp = layout.language_model.mtp
    return _mixer_kind(mtp.inner[0]) if mtp is not None and mtp.inner else "attention"


def mtp_mlp_kind(layout: Layout) -> MlpKind:
    mtp = layout.language_model.mtp
    return _mlp_kind(mtp.inner[0]) if mtp is not None and mtp.inner else "dense"


@dataclass(frozen=True)
class Bridge:
    """A generated bridge: the layout fingerprint it serves, its config recipe and its rules."""

    fingerprint: str
    model_type: str
    megatron_config: Callable[[HFConfig, Layout], ModelSpec]
    rules: tuple[Rule, ...]
