"""Read the JSON header of a ``.safetensors`` file — never the tensor data.

Format: 8 bytes little-endian ``u64`` header length ``N``, then ``N`` bytes of UTF-8 JSON mapping tensor names
to ``{"dtype", "shape", "data_offsets"}`` (plus an optional ``__metadata__`` string map), then the data.
The length is checked against a bound and against the file size *before* anything else is read, so a
corrupt or hostile file cannot make us allocate gigabytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, NamedTuple

from mapgen.errors import Diagnostic, MapgenError

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Refuse headers above this size (real ones are a few MB even for 20k-tensor shards)."""


class HeaderEntry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]


def _fail(code: str, message: str, file: str, expected: str = "", hint: str = "") -> MapgenError:
    return MapgenError(Diagnostic("error", code, message, file=file, expected=expected, hint=hint))


def parse_header(data: bytes, *, file: str, data_bytes: int | None = None) -> dict[str, HeaderEntry]:
    """Parse header JSON bytes (without the 8-byte length prefix). With ``data_bytes`` (the size of the file
    after the header), every tensor's ``data_offsets`` must lie inside it: a shard cut short is refused here,
    not when a tensor is read half-way through a conversion."""
    try:
        obj: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(
            "safetensors.malformed-header",
            f"safetensors header is not valid UTF-8 JSON: {exc}",
            file,
            expected="a JSON object mapping tensor names to {dtype, shape, data_offsets}",
        ) from None
    if not isinstance(obj, dict):
        raise _fail("safetensors.malformed-header", "safetensors header is not a JSON object", file)
    out: dict[str, HeaderEntry] = {}
    for name, info in obj.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if (
            not isinstance(dtype, str)
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise MapgenError(
                Diagnostic(
                    "error",
                    "safetensors.malformed-entry",
                    "tensor entry lacks a string dtype or a list of non-negative int dims",
                    file=file,
                    key=str(name),
                    expected='{"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}',
                )
            )
        out[str(name)] = HeaderEntry(dtype, tuple(shape))
        offsets = info.get("data_offsets")
        if data_bytes is not None and isinstance(offsets, list) and len(offsets) == 2:
            end = offsets[1]
            if isinstance(end, int) and end > data_bytes:
                raise _fail(
                    "safetensors.truncated",
                    f"tensor {name!r} ends at data byte {end} but only {data_bytes} data bytes follow the header",
                    file,
                    hint="the file is truncated (an interrupted download?): fetch it again",
                )
    return out


def read_header(path: Path, *, display: str | None = None, max_bytes: int = MAX_HEADER_BYTES) -> dict[str, HeaderEntry]:
    """Tensor name -> dtype and shape, from the header of the safetensors file at ``path``."""
    file = display or str(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _fail(
                    "safetensors.truncated",
                    f"file is {size} bytes, too short for the 8-byte header length",
                    file,
                    expected="8-byte little-endian header length followed by a JSON header",
                )
            (length,) = struct.unpack("<Q", prefix)
            if length > max_bytes:
                raise _fail(
                    "safetensors.header-too-large",
                    f"header length field says {length} bytes; refusing more than {max_bytes}",
                    file,
                    hint="the file is corrupt or not a safetensors file",
                )
            if length > size - 8:
                raise _fail(
                    "safetensors.truncated",
                    f"header length field says {length} bytes but only {size - 8} follow",
                    file,
                    hint="the file is truncated (an interrupted download?): fetch it again",
                )
            data = fh.read(length)
    except OSError as exc:
        raise _fail("safetensors.unreadable", f"cannot read file: {exc.strerror}", file) from None
    return parse_header(data, file=file, data_bytes=size - 8 - length)
