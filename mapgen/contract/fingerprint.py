"""The layout fingerprint: the key from a scanned layout to its generated bridge.

It is the layout with dimensions (and index sets, counts, depths) removed, hashed. Checkpoints that differ
only in dimensions share a fingerprint, so they share one bridge; emit (``mapgen.plan``) and the runtime
compute it with this one function.
"""

from __future__ import annotations

import hashlib
import json

from mapgen.ir import Layout, to_jsonable

__all__ = ["fingerprint", "fingerprint_data"]

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


def fingerprint_data(layout: Layout) -> object:
    """The canonical data a layout fingerprint is computed from (public for tests and ``mapgen diff``)."""
    data = _strip(to_jsonable(layout))
    if isinstance(data, dict) and data.get("quantization") in _READ_TIME_QUANTIZATION:
        data["quantization"] = "none"
    return data


def fingerprint(layout: Layout) -> str:
    canonical = json.dumps(fingerprint_data(layout), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
