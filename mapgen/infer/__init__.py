"""mapgen.infer: checkpoint keys (+ config cross-checks) -> the typed IR. No torch.

``infer(source)`` classifies a :class:`~mapgen.source.Source`; ``scan(spec)`` reads and classifies in one go.
"""

from __future__ import annotations

from mapgen.infer.build import infer
from mapgen.infer.patterns import compress_keys, layer_pattern
from mapgen.infer.summary import render_summary
from mapgen.ir import Layout
from mapgen.source import read_source

__all__ = ["compress_keys", "infer", "layer_pattern", "render_summary", "scan"]


def scan(spec: str, *, headers: bool | None = None) -> Layout:
    """Read ``spec`` (local dir, .safetensors file or hub id) and infer its :class:`Layout`."""
    return infer(read_source(spec, headers=headers))
