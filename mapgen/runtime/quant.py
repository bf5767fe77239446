"""Block-scaled FP8 weights (DeepSeek-V3/R1, Kimi-K2 releases), read exactly.

On disk: a weight ``<m>.weight`` stored as ``float8_e4m3fn`` beside its inverse scales ``<m>.weight_scale_inv``
(fp32, one per ``block_m x block_n`` tile, the last tile of a dimension cut short), and in ``config.json``
``quantization_config = {"quant_method": "fp8", "weight_block_size": [block_m, block_n], ...}``.

Import dequantizes while reading: ``value = fp32(q) * scale`` per element, cast once to the target dtype -- the
expression of transformers' ``Fp8Dequantize`` (integrations/finegrained_fp8.py: ``(q_fp32 * s_fp32)
.to(output_dtype)``), so the result is bit-identical to transformers' own dequantization. A rank reads only the
rows/columns of its slice and the scale tiles that cover them (:class:`DequantizingReader`).

Export quantizes back with :func:`quantize_blocks` when asked to (``--quantize``): each tile is divided by the
*source's* scale for that tile when its values fit the e4m3 range under it, so an unchanged model reproduces the
source's FP8 bytes and scales exactly; a tile that no longer fits gets a fresh scale (``amax / 448``, as
transformers' ``Fp8Quantize`` computes it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mapgen.errors import error
from mapgen.infer.build import fp8_scales
from mapgen.ops._base import Index
from mapgen.runtime.hfio import SafetensorsReader

__all__ = ["BlockFp8", "DequantizingReader", "dequantize", "expand_scales", "quantize_blocks",
           "reader_for", "requantize"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Below 464 (halfway to 480, the next step e4m3fn lacks) a value rounds to 448 or less with at most half a step
# of error, as every other value does: a tile whose bf16 values rounded up past 448 x scale still fits.
_FITS = FP8_MAX * (1 + 2**-5)
_MATRIX = 2  # block scales tile the two dimensions of a weight matrix


@dataclass(frozen=True)
class BlockFp8:
    """The quantization of one checkpoint: tile shape, which weights are quantized (weight key -> scale key),
    and the dtype dequantized weights take."""

    block: tuple[int, int]
    scales: Mapping[str, str]
    out_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def from_checkpoint(cls, config: Mapping[str, Any], keys: Mapping[str, str], *,
                        out_dtype: torch.dtype = torch.bfloat16) -> BlockFp8:
        """From ``config.json`` (``quantization_config.weight_block_size``) and the checkpoint's keys: every
        ``X.weight_scale_inv`` pairs with ``X.weight`` (scan has checked that each pair is complete)."""
        qc = config.get("quantization_config")
        if not isinstance(qc, Mapping):
            text = config.get("text_config")
            qc = text.get("quantization_config") if isinstance(text, Mapping) else None
        size = qc.get("weight_block_size") if isinstance(qc, Mapping) else None
        if not (isinstance(size, list | tuple) and len(size) == _MATRIX
                and all(isinstance(v, int) and v > 0 for v in size)):
            raise error("quant.fp8-block-size", f"quantization_config.weight_block_size is {size!r}",
                        file="config.json", key="quantization_config.weight_block_size",
                        expected="two positive integers [block_m, block_n]")
        return cls((int(size[0]), int(size[1])), fp8_scales(keys), out_dtype)

    def scale_key(self, key: str) -> str | None:
        return self.scales.get(key)


def expand_scales(scales: torch.Tensor, block: tuple[int, int], rows: tuple[int, int],
                  cols: tuple[int, int]) -> torch.Tensor:
    """The per-element scale of the rows ``rows`` and columns ``cols`` (global, half-open) of a weight, from
    ``scales``: the tiles covering them, the first being tile ``(rows[0] // bm, cols[0] // bn)``."""
    bm, bn = block
    r = torch.arange(rows[0], rows[1]) // bm - rows[0] // bm
    c = torch.arange(cols[0], cols[1]) // bn - cols[0] // bn
    return scales.float()[r][:, c]


Span = tuple[tuple[int, int], tuple[int, int]]


def dequantize(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], out_dtype: torch.dtype,
               at: Span | None = None) -> torch.Tensor:
    """``fp32(q) * scale`` cast to ``out_dtype``: ``q`` holds the rows and columns ``at`` of the weight
    (default: all of it), ``scales`` the tiles covering them."""
    rows, cols = at or ((0, q.shape[-2]), (0, q.shape[-1]))
    return (q.float() * expand_scales(scales, block, rows, cols)).to(out_dtype)


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int],
                    source_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 inverse scales) of a 2-d ``weight``. Each tile keeps its ``source_scales`` entry when
    ``|w| / scale < 464`` holds for the whole tile (an unchanged model round-trips byte for byte), else gets
    ``amax / 448`` (1 for an all-zero tile)."""
    if weight.dim() != _MATRIX:
        raise ValueError(f"block FP8 quantization needs a 2-d weight, got shape {tuple(weight.shape)}")
    bm, bn = block
    rows, cols = weight.shape
    tiles = (math.ceil(rows / bm), math.ceil(cols / bn))
    w = weight.float()
    padded = torch.zeros(tiles[0] * bm, tiles[1] * bn)
    padded[:rows, :cols] = w.abs()
    amax = padded.reshape(tiles[0], bm, tiles[1], bn).amax(dim=(1, 3))
    fresh = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if source_scales is not None and tuple(source_scales.shape) == tiles:
        keep = amax < _FITS * source_scales.float()
        scales = torch.where(keep, source_scales.float(), fresh)
    else:
        scales = fresh
    q = (w / expand_scales(scales, block, (0, rows), (0, cols))).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scales


def _span(item: slice | int, size: int) -> tuple[int, int]:
    if isinstance(item, int):
        i = item % size if -size <= item < size else item
        if not 0 <= i < size:
            raise IndexError(f"index {item} out of range for a dimension of size {size}")
        return i, i + 1
    start, stop, step = item.indices(size)
    if step != 1:
        raise IndexError("only unit-step slices are supported")
    return start, max(start, stop)


class DequantizingReader:
    """A :class:`~mapgen.ops._base.Reader` that returns quantized weights dequantized (in ``fmt.out_dtype``)
    and every other tensor as stored. A slice reads only its own FP8 rows/columns and the scale tiles covering
    them; ``bytes_read`` counts both (from the wrapped reader)."""

    def __init__(self, inner: SafetensorsReader, fmt: BlockFp8) -> None:
        self.inner = inner
        self.fmt = fmt

    @property
    def bytes_read(self) -> int:
        return self.inner.bytes_read

    def shard_rank(self, key: str) -> int:
        return self.inner.shard_rank(key)

    def release_below(self, rank: int) -> None:
        self.inner.release_below(rank)

    def close(self) -> None:
        self.inner.close()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.inner.shape(key))

    def dtype(self, key: str) -> torch.dtype:
        return self.fmt.out_dtype if key in self.fmt.scales else self.inner.dtype(key)

    def read(self, key: str, index: Index = ()) -> torch.Tensor:
        scale_key = self.fmt.scale_key(key)
        if scale_key is None:
            return self.inner.read(key, index)
        shape = self.shape(key)
        if len(shape) != _MATRIX:
            raise error("quant.fp8-shape", f"{key}: a block-scaled FP8 weight must be 2-d, got {shape}", key=key)
        if len(index) > _MATRIX:
            raise IndexError(f"{key}: {len(index)} indices for a 2-d tensor")
        items = (*index, *(slice(None),) * (_MATRIX - len(index)))
        (r0, r1), (c0, c1) = (_span(items[d], shape[d]) for d in range(_MATRIX))
        bm, bn = self.fmt.block
        q = self.inner.read(key, (slice(r0, r1), slice(c0, c1)))
        s = self.inner.read(scale_key, (slice(r0 // bm, -(-r1 // bm)), slice(c0 // bn, -(-c1 // bn))))
        out = dequantize(q, s, self.fmt.block, self.fmt.out_dtype, ((r0, r1), (c0, c1)))
        squeeze = [d for d in range(len(index)) if isinstance(index[d], int)]
        for d in reversed(squeeze):
            out = out.squeeze(d)
        return out


def requantize(items: Iterable[tuple[str, torch.Tensor]], fmt: BlockFp8,
               source: SafetensorsReader) -> Iterator[tuple[str, torch.Tensor]]:
    """``--quantize``: each quantized weight of ``fmt`` as (e4m3 weight, its ``_scale_inv``) with the source's
    tiles (:func:`quantize_blocks`, reading the source's scales from ``source``); other tensors unchanged."""
    for key, value in items:
        scale_key = fmt.scale_key(key)
        if scale_key is None:
            yield key, value
            continue
        q, scales = quantize_blocks(value, fmt.block, source.read(scale_key))
        yield key, q
        yield scale_key, scales


def reader_for(inner: SafetensorsReader, fmt: BlockFp8 | None) -> SafetensorsReader | DequantizingReader:
    """``inner`` itself when the checkpoint is not block-quantized."""
    return inner if fmt is None else DequantizingReader(inner, fmt)
