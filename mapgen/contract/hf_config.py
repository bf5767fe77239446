"""A read-only view of a Hugging Face ``config.json`` and the few values derived from it.

Shared by the planner (shapes, the proof's config), the runtime and the generated bridges; cheap to import
(no torch, no megatron-core).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mapgen.errors import error

__all__ = ["HFConfig", "head_dim", "rope_scaling", "rope_scaling_factor"]

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
        value = int(hf.get("hidden_size", "n_embd")) // int(hf.get("num_attention_heads", "n_head"))
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
