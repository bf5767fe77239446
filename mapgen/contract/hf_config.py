"""A read-only view of a Hugging Face ``config.json`` and the few values derived from it.

Shared by the planner (shapes, the proof's config), the runtime and the generated bridges; cheap to import
(no torch, no megatron-core).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mapgen.errors import error

__all__ = ["HFConfig", "head_dim", "mla_rope", "mla_yarn_problem", "rope_scaling", "rope_scaling_factor"]

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


# -- multi-latent attention's RoPE (megatron-core MLATransformerConfig: rope_type "rope" or "yarn") -------------
_MLA_ROPE_DEFAULTS: dict[str, Any] = {
    "mla_rope_type": "rope", "yarn_scaling_factor": 1.0, "yarn_original_max_position_embeddings": 4096,
    "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_mscale": 1.0, "yarn_mscale_all_dim": 0.0,
}


_SAME = 1e-12  # relative slack when a stated value must equal the one implied


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_values(value: Mapping[str, Any], max_positions: Any) -> tuple[dict[str, Any] | None, str | None]:
    """transformers' YaRN (``_compute_yarn_parameters`` and DeepSeek's softmax ``mscale_all_dim`` factor) as
    megatron-core's MLA YaRN settings, or the reason it has no equivalent."""
    original = value.get("original_max_position_embeddings")
    if not isinstance(original, int | float) or original <= 0:
        return None, "YaRN needs original_max_position_embeddings"
    factor = value.get("factor")
    if factor is None:  # transformers: the context extension ratio
        if not isinstance(max_positions, int | float):
            return None, "YaRN without a factor needs max_position_embeddings"
        factor = max_positions / original
    if not value.get("truncate", True):
        return None, "YaRN with truncate=false (megatron-core's MLA rounds the correction range)"
    if float(value.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return None, "YaRN over part of the rotary dims"
    mscale, all_dim = value.get("mscale"), value.get("mscale_all_dim")
    if all_dim and not mscale:
        # transformers: cos/sin scaled by get_mscale(factor), softmax by get_mscale(factor, all_dim)^2; megatron-core
        # ties the two (cos/sin by get_mscale(factor, mscale) / get_mscale(factor, all_dim)).
        return None, "YaRN with mscale_all_dim but no mscale"
    m, a = (float(mscale), float(all_dim)) if mscale and all_dim else (1.0, 0.0)
    given = value.get("attention_factor")
    implied = _yarn_mscale(float(factor), m) / _yarn_mscale(float(factor), a)
    if given is not None and abs(float(given) - implied) > _SAME:
        return None, f"YaRN with an explicit attention_factor={given} other than the one mscale implies"
    return {
        "mla_rope_type": "yarn", "yarn_scaling_factor": float(factor),
        "yarn_original_max_position_embeddings": int(original),
        "yarn_beta_fast": float(value.get("beta_fast") or 32), "yarn_beta_slow": float(value.get("beta_slow") or 1),
        "yarn_mscale": m, "yarn_mscale_all_dim": a,
    }, None


def mla_yarn_problem(value: Mapping[str, Any], max_positions: Any) -> str | None:
    """Why a YaRN RoPE dict has no exact megatron-core MLA equivalent (None when it has one)."""
    return _yarn_values(value, max_positions)[1]


def mla_rope(hf: HFConfig) -> dict[str, Any]:
    """The RoPE settings of an MLA model as ModelSpec fields (``mla_rope_type``, ``yarn_*``): plain RoPE, or YaRN
    with DeepSeek's mscale mapped exactly; any other scaling is refused by name."""
    for name in ("rope_scaling", "rope_parameters"):
        value = hf.get(name, default=None)
        if not isinstance(value, Mapping):
            continue
        kind = value.get("rope_type") or value.get("type") or "default"
        if kind == "default":
            continue
        values, problem = _yarn_values(value, hf.get("max_position_embeddings", default=None)) if kind == "yarn" \
            else (None, f"RoPE scaling {kind!r} in multi-latent attention (megatron-core has rope and yarn)")
        if values is None:
            raise error(
                "config.unsupported-rope", f"{problem}: {dict(value)}", file=hf.source, key=name,
                expected="plain RoPE, or YaRN as DeepSeek-V3 writes it (factor, original_max_position_embeddings, "
                "beta_fast/slow, mscale with mscale_all_dim)",
                hint="converting anyway would change the model's outputs; add support for this scaling first",
            )
        return values
    return dict(_MLA_ROPE_DEFAULTS)
