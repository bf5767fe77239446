"""Finding the generated bridge for a layout: the one place that names the bridge package.

The runtime never imports its output package; it asks here. A package of generated bridges exposes
``get_bridge(fingerprint, *, layout, source) -> Bridge`` (its ``__init__.py``, rendered by ``mapgen emit``),
which maps a fingerprint to exactly one bridge or fails with ``bridge.unknown-layout`` (never a fallback).
"""

from __future__ import annotations

import importlib

from mapgen.contract.bridge import Bridge
from mapgen.contract.fingerprint import fingerprint
from mapgen.errors import error
from mapgen.ir import Layout

__all__ = ["BRIDGE_PACKAGE", "find_bridge"]

BRIDGE_PACKAGE = "generated"


def find_bridge(layout: Layout, *, source: str = "") -> Bridge:
    """The generated bridge for ``layout``'s fingerprint (never a 'similar' one)."""
    registry = importlib.import_module(BRIDGE_PACKAGE)
    bridge = registry.get_bridge(fingerprint(layout), layout=layout, source=source)
    if not isinstance(bridge, Bridge):
        raise error("bridge.corrupt-module", f"{BRIDGE_PACKAGE}.get_bridge returned {type(bridge).__name__}",
                    hint="regenerate the bridges with `mapgen emit --from-inputs`")
    return bridge
