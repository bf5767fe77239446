"""mapgen.source: read a checkpoint's metadata (config.json, the index, safetensors headers) — no torch.

``read_source(spec)`` accepts a local directory, a single ``.safetensors`` file (``config.json`` beside
it), or a Hugging Face hub id ``Org/Name[@revision]`` (used only when no such local path exists).
"""

from __future__ import annotations

from pathlib import Path

from mapgen.errors import Diagnostic, MapgenError
from mapgen.source.base import Source, TensorInfo, canonical_sha256
from mapgen.source.hub import parse_hub_id, read_hub
from mapgen.source.local import read_checkpoint_dir, read_single_file
from mapgen.source.safetensors_header import MAX_HEADER_BYTES, read_header

__all__ = [
    "MAX_HEADER_BYTES",
    "Source",
    "TensorInfo",
    "canonical_sha256",
    "parse_hub_id",
    "read_header",
    "read_source",
]


def read_source(spec: str, *, headers: bool | None = None) -> Source:
    """Read checkpoint metadata from ``spec``.

    ``headers``: read shapes/dtypes from safetensors headers. ``None`` (default) means: for local
    checkpoints read the headers of shard files that are present; for hub ids do not (that costs one range
    request per shard). ``True`` also asks the hub's metadata API; ``False`` never reads a header beyond
    what is needed to list the keys of a single-file checkpoint.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return read_checkpoint_dir(path, origin=spec, headers=headers is not False)
    if path.is_file():
        if path.suffix != ".safetensors":
            if path.name == "config.json" or path.name.endswith(".index.json"):
                return read_checkpoint_dir(path.parent, origin=spec, headers=headers is not False)
            raise MapgenError(
                Diagnostic(
                    "error",
                    "source.unsupported-file",
                    f"{path.name!r} is not a checkpoint file",
                    file=spec,
                    expected="a checkpoint directory, a .safetensors file, or a hub id Org/Name[@revision]",
                )
            )
        return read_single_file(path, origin=spec)
    hub = parse_hub_id(spec)
    if hub is not None and not spec.startswith((".", "/", "~")):
        return read_hub(hub[0], hub[1], headers=bool(headers))
    raise MapgenError(
        Diagnostic(
            "error",
            "source.not-found",
            f"no such file or directory: {spec!r}, and it is not a hub id",
            file=spec,
            expected="a checkpoint directory, a .safetensors file, or a hub id Org/Name[@revision]",
        )
    )
