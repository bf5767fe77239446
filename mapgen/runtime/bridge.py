"""What a generated bridge module is made of, at run time.

Generated modules import only this module. Importing it must stay cheap (no torch, no megatron-core):
registry look-ups and ``mapgen scan`` never pay for a framework import.

A generated module defines ``FINGERPRINT``, ``megatron_config(hf, layout) -> ModelSpec``, ``RULES`` and
``BRIDGE = Bridge(...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mapgen.ir import LayerGroup, Layout
from mapgen.plan.rules import Rule
from mapgen.plan.spec import LayerKind, MlpKind, ModelSpec

__all__ = [
    "Bridge",
    "HFConfig",
    "Layout",
    "ModelSpec",
    "Rule",
    "head_dim",
    "layer_kinds",
    "mlp_kinds",
    "mtp_depth",
    "mtp_layer_kind",
    "mtp_mlp_kind",
    "rope_scaling",
    "rope_scaling_factor",
]

_MISSING = object()


class HFConfig:
    """Read-only view of a Hugging Face ``config.json``; ``text_config`` (VL wrappers) is searched first."""

    def __init__(self, data: Mapping[str, Any], source: str = "config.json") -> None:
        self._data = dict(data)
        text = data.get("text_config")
        self._text = dict(text) if isinstance(text, Mapping) else {}
        self.source = source

    def has(self, *names: str) -> bool:
        return any(self._lookup(n) is not None for n in names)

    def _lookup(self, name: str) -> Any:
        for scope in (self._text, self._data):
            value: Any = scope
            for part in name.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            if value is not None:
                return value
        return None

    def get(self, *names: str, default: Any = _MISSING) -> Any:
        """The first of ``names`` present (dotted names reach into nested objects such as
        ``rope_parameters.rope_theta``); ``default`` if none is, else a ``config.missing-key`` error."""
        for name in names:
            value = self._lookup(name)
            if value is not None:
                return value
        if default is not _MISSING:
            return default
        from mapgen.errors import error

        raise error(
            "config.missing-key",
            f"the config has none of {', '.join(names)}",
            file=self.source,
            expected="one of these keys (top level or under text_config)",
            hint="this bridge needs it to size the Megatron model; add it to config.json",
        )

    @property
    def data(self) -> dict[str, Any]:
        return dict(self._data)


def head_dim(hf: HFConfig) -> int:
    """``head_dim`` when the config states it, else ``hidden_size // num_attention_heads``."""
    value = hf.get("head_dim", default=None)
    if value is None:
        value = int(hf.get("hidden_size")) // int(hf.get("num_attention_heads"))
    return int(value)


_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope(hf: HFConfig) -> dict[str, Any] | None:
    """The config's RoPE scaling dict (``rope_scaling`` or transformers 5's ``rope_parameters``), None when it
    is plain RoPE. Scalings megatron-core cannot reproduce are refused instead of silently ignored."""
    for name in ("rope_scaling", "rope_parameters"):
        value = hf.get(name, default=None)
        if isinstance(value, Mapping):
            kind = value.get("rope_type") or value.get("type") or "default"
            if kind == "default":
                continue
            if kind == "llama3" and all(
                float(value.get(k, v)) == v for k, v in _LLAMA3_DEFAULTS.items()
            ):
                return dict(value)
            from mapgen.errors import error

            raise error(
                "config.unsupported-rope",
                f"RoPE scaling {kind!r} with {dict(value)} has no megatron-core equivalent here",
                file=hf.source, key=name,
                expected="plain RoPE, or llama3 scaling with low/high frequency factors 1/4 over 8192 positions",
                hint="converting anyway would change the model's outputs; add support for this scaling first",
            )
    return None


def rope_scaling(hf: HFConfig) -> bool:
    return _rope(hf) is not None


def rope_scaling_factor(hf: HFConfig) -> float:
    rope = _rope(hf)
    return float(rope.get("factor", 8.0)) if rope else 8.0


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
