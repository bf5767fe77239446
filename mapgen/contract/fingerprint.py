"""The layout fingerprint: the key from a scanned layout to its generated bridge.

It is the layout with dimensions (and index sets, counts, depths) removed, hashed. Checkpoints that differ
only in dimensions share a fingerprint, so they share one bridge; emit (``mapgen.plan``) and the runtime
compute it with this one function.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from mapgen.ir import Layout, to_jsonable

__all__ = ["dequantized", "fingerprint", "fingerprint_data", "without_quantization_config"]

_DIMENSION_FIELDS = frozenset(
    {"dims", "summary", "diagnostics", "unclassified", "layers", "num_layers", "depth", "index_offset", "num_keys",
     "patterns", "config", "config_fields", "counts"}
)
"""Layout fields that are sizes, counts or reports, not structure (a component's ``counts`` by their role)."""


def _strip(data: object) -> object:
    if isinstance(data, dict):
        return {k: _strip(v) for k, v in sorted(data.items()) if k not in _DIMENSION_FIELDS}
    if isinstance(data, list):
        return [_strip(v) for v in data]
    return data


_READ_TIME_QUANTIZATION = frozenset({"fp8_block", "mxfp4"})
"""Quantizations undone while reading (a weight's tiles and its scales, under the same name; MXFP4 blocks and
scales, as the tensor they dequantize to): the bridge of the unquantized layout applies, so they do not change
the fingerprint."""


def without_quantization_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` less its ``quantization_config`` (top level and ``text_config``)."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    text = out.get("text_config")
    if isinstance(text, dict) and "quantization_config" in text:
        out["text_config"] = {k: v for k, v in text.items() if k != "quantization_config"}
    return out


def dequantized(layout: Layout) -> Layout:
    """The unquantized layout a read-time-quantized one (FP8 blocks, MXFP4) shares its bridge with: the same
    fingerprint, ``quantization: none`` and no ``quantization_config`` (what its tiny twin is)."""
    if layout.quantization not in _READ_TIME_QUANTIZATION:
        return layout
    return dataclasses.replace(layout, quantization="none", config=without_quantization_config(layout.config))


def fingerprint_data(layout: Layout) -> object:
    """The canonical data a layout fingerprint is computed from (public for tests and ``mapgen diff``)."""
    data = _strip(to_jsonable(layout))
    if isinstance(data, dict) and data.get("quantization") in _READ_TIME_QUANTIZATION:
        data["quantization"] = "none"
    return data


def fingerprint(layout: Layout) -> str:
    canonical = json.dumps(fingerprint_data(layout), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
