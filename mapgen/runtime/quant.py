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

MXFP4 experts (gpt-oss releases, ``quant_method: mxfp4``) are stored as ``X_blocks`` (uint8 ``[E, rows, groups,
16]``: 32 e2m1 values a group, two nibbles a byte, low nibble first) beside ``X_scales`` (uint8 E8M0 ``[E, rows,
groups]``: ``2 ** (s - 127)``), and the model's ``X`` is ``[E, groups * 32, rows]`` (:class:`Mxfp4`). Import
computes what transformers' ``convert_moe_packed_tensors`` computes (its lookup table in the output dtype,
``ldexp`` by the scale, the last two dimensions transposed), reading only the experts, rows and groups of a slice
(:class:`Mxfp4Reader`). A scale byte of 255 (E8M0's NaN) or a value past the output dtype's range (bf16/fp32:
from scale byte 253 up) is refused rather than turned into inf or NaN. ``--quantize`` (:func:`quantize_mxfp4`)
keeps the source's scale of a group whenever the group's values fit under it: the values alone do not determine
it (a group of halves under ``2**k`` equals the same group of ones under ``2**(k-1)``), so this is what makes an
unchanged model come back byte for byte; a group that no longer fits gets the OCP MX scale
``2 ** (floor(log2(amax)) - 2)`` and round-to-nearest-even nibbles, saturating at 6.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mapgen.errors import error
from mapgen.infer.build import MXFP4_GROUP, fp8_scales, mxfp4_pairs, mxfp4_shape
from mapgen.ops._base import Index
from mapgen.runtime.hfio import SafetensorsReader

__all__ = ["BlockFp8", "DequantizingReader", "Mxfp4", "Mxfp4Reader", "dequantize", "dequantize_mxfp4",
           "expand_scales", "quantize_blocks", "quantize_mxfp4", "reader_for", "requantize"]

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

    def model_keys(self, keys: Iterable[str]) -> list[str]:
        """``keys`` of a checkpoint as the model names them: without the scales."""
        scales = set(self.scales.values())
        return [k for k in keys if k not in scales]


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


class _Wrapping:
    """What a dequantizing reader passes through to the safetensors reader it wraps."""

    def __init__(self, inner: SafetensorsReader) -> None:
        self.inner = inner

    @property
    def bytes_read(self) -> int:
        return self.inner.bytes_read

    def release_below(self, rank: int) -> None:
        self.inner.release_below(rank)

    def close(self) -> None:
        self.inner.close()


class DequantizingReader(_Wrapping):
    """A :class:`~mapgen.ops._base.Reader` that returns quantized weights dequantized (in ``fmt.out_dtype``)
    and every other tensor as stored. A slice reads only its own FP8 rows/columns and the scale tiles covering
    them; ``bytes_read`` counts both (from the wrapped reader)."""

    def __init__(self, inner: SafetensorsReader, fmt: BlockFp8) -> None:
        super().__init__(inner)
        self.fmt = fmt

    def shard_rank(self, key: str) -> int:
        return self.inner.shard_rank(key)

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


# ---------------------------------------------------------------------------------------------------------
# MXFP4
# ---------------------------------------------------------------------------------------------------------
# e2m1 by nibble: sign bit 3, then exponent and mantissa (transformers' FP4_VALUES, the OCP MX table)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127
E8M0_NAN = 255
_FP4_MAX = 6.0
_FP4_EMAX = 2  # the largest e2m1 exponent: 6 = 1.5 * 2**2
_NIBBLE = 4
_FP4_MAGNITUDES = FP4_VALUES[:8]
_QUARTERS = 4 * 8  # magnitudes in quarters: every midpoint between two e2m1 magnitudes is a whole quarter


def _nearest(m: float) -> int:
    """The e2m1 magnitude code nearest ``m``, a tie to the even code (0, 1, 2, 4 of 0, .5, 1, 2, ...)."""
    return min(range(len(_FP4_MAGNITUDES)), key=lambda c: (abs(_FP4_MAGNITUDES[c] - m), c % 2))


# code of a magnitude ``q`` quarters (``q`` whole) and of one just under ``q`` quarters (``q - 1 < 4m < q``)
_CODE_AT = torch.tensor([_nearest(q / 4) for q in range(_QUARTERS + 1)], dtype=torch.uint8)
_CODE_UNDER = torch.tensor([_nearest(q / 4 - 1 / 8) for q in range(_QUARTERS + 1)], dtype=torch.uint8)
# a byte's two values, low nibble first
_PAIRS = tuple((FP4_VALUES[b & 0x0F], FP4_VALUES[b >> 4]) for b in range(256))
_PACKED = 3  # [experts, in, out] as the model holds X


@dataclass(frozen=True)
class Mxfp4:
    """The MXFP4 tensors of one checkpoint (``X`` -> its ``X_blocks`` and ``X_scales`` keys) and the dtype
    dequantized tensors take."""

    pairs: Mapping[str, tuple[str, str]]
    out_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def from_keys(cls, keys: Iterable[str], *, out_dtype: torch.dtype = torch.bfloat16) -> Mxfp4:
        return cls(mxfp4_pairs(keys), out_dtype)

    @property
    def stored(self) -> frozenset[str]:
        """The keys on disk that hold the pairs."""
        return frozenset(k for pair in self.pairs.values() for k in pair)

    def model_keys(self, keys: Iterable[str]) -> list[str]:
        """``keys`` of a checkpoint as the model names them: each ``X_blocks`` as ``X``, ``X_scales`` left out."""
        blocks = {b: x for x, (b, _) in self.pairs.items()}
        scales = {s for _, s in self.pairs.values()}
        return [blocks.get(k, k) for k in keys if k not in scales]


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``[..., groups, 16]`` blocks and ``[..., groups]`` scales -> ``[..., groups * 32]`` values in ``out_dtype``,
    by transformers' expression: the e2m1 table in ``out_dtype``, low nibble first, ``ldexp`` by ``s - 127``."""
    pairs = torch.tensor(_PAIRS, dtype=out_dtype)  # transformers' table, both nibbles of a byte in one look-up
    b = blocks.to(torch.uint8)
    out = pairs.index_select(0, b.flatten().to(torch.int32)).view(*b.shape[:-1], 2 * b.shape[-1])
    torch.ldexp(out, (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1), out=out)
    return out.flatten(-2)


def _fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """The nibble of each fp32 value (already divided by its scale): nearest magnitude, ties to even, saturating
    at 6; the sign bit from the sign (a negative zero keeps it)."""
    quarters = x.abs().mul_(4).clamp_(max=_QUARTERS)  # exact: a power of two
    ceil = quarters.ceil()
    at = ceil.to(torch.int32).flatten()
    code = torch.where((quarters == ceil).flatten(), _CODE_AT.index_select(0, at), _CODE_UNDER.index_select(0, at))
    return code.view(x.shape) | (torch.signbit(x).to(torch.uint8) << 3)


def quantize_mxfp4(values: torch.Tensor, source_scales: torch.Tensor | None = None) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    """``[..., groups * 32]`` values -> (uint8 blocks ``[..., groups, 16]``, uint8 E8M0 scales ``[..., groups]``).
    A group keeps its ``source_scales`` entry when its largest magnitude rounds to at most 6 under it (below 7x
    the scale: an unchanged model round-trips byte for byte), else gets ``2 ** (floor(log2(amax)) - 2)`` (127,
    i.e. 1, for an all-zero group)."""
    v = values.float().contiguous().reshape(*values.shape[:-1], -1, MXFP4_GROUP)
    amax = v.abs().amax(-1)
    exp = torch.floor(torch.log2(amax)).clamp(-E8M0_BIAS, E8M0_BIAS) - _FP4_EMAX + E8M0_BIAS
    fresh = torch.where(amax > 0, exp.clamp(0, 2 * E8M0_BIAS), torch.full_like(amax, E8M0_BIAS)).to(torch.int32)
    if source_scales is not None and tuple(source_scales.shape) == tuple(amax.shape):
        old = source_scales.to(torch.int32)
        keep = amax < (_FP4_MAX + 1) * torch.ldexp(torch.ones_like(amax), old - E8M0_BIAS)
        scales = torch.where(keep, old, fresh)
    else:
        scales = fresh
    codes = _fp4_codes(torch.ldexp(v, (E8M0_BIAS - scales).unsqueeze(-1)))
    blocks = codes[..., 0::2] | (codes[..., 1::2] << _NIBBLE)
    return blocks, scales.to(torch.uint8)


class Mxfp4Reader(_Wrapping):
    """A :class:`~mapgen.ops._base.Reader` presenting each MXFP4 pair as the model's ``X`` ``[E, in, out]``
    (dequantized, in ``fmt.out_dtype``) and every other tensor as stored. A slice reads only the blocks and scales
    of its experts, its ``out`` rows and the groups covering its ``in`` range."""

    def __init__(self, inner: SafetensorsReader, fmt: Mxfp4) -> None:
        super().__init__(inner)
        self.fmt = fmt

    def shard_rank(self, key: str) -> int:
        pair = self.fmt.pairs.get(key)
        return self.inner.shard_rank(pair[0] if pair else key)

    def shape(self, key: str) -> tuple[int, ...]:
        pair = self.fmt.pairs.get(key)
        return mxfp4_shape(tuple(self.inner.shape(pair[0]))) if pair else tuple(self.inner.shape(key))

    def dtype(self, key: str) -> torch.dtype:
        return self.fmt.out_dtype if key in self.fmt.pairs else self.inner.dtype(key)

    def read(self, key: str, index: Index = ()) -> torch.Tensor:
        pair = self.fmt.pairs.get(key)
        if pair is None:
            return self.inner.read(key, index)
        shape = self.shape(key)
        if len(index) > _PACKED:
            raise IndexError(f"{key}: {len(index)} indices for a 3-d tensor")
        items = (*index, *(slice(None),) * (_PACKED - len(index)))
        (e0, e1), (i0, i1), (o0, o1) = (_span(items[d], shape[d]) for d in range(_PACKED))
        g0, g1 = i0 // MXFP4_GROUP, -(-i1 // MXFP4_GROUP)
        lead = items[0] if isinstance(items[0], int) else slice(e0, e1)
        at = (lead, slice(o0, o1), slice(g0, g1))
        scales = self.inner.read(pair[1], at)
        values = dequantize_mxfp4(self.inner.read(pair[0], at), scales, self.fmt.out_dtype)
        if bool((scales == E8M0_NAN).any()) or not bool(torch.isfinite(values).all()):
            raise error("quant.mxfp4-overflow", f"{key}: an E8M0 scale puts MXFP4 values past the range of "
                        f"{self.fmt.out_dtype} (inf/NaN)", key=pair[1], expected="scale bytes below 253 (255 is NaN)",
                        hint="the checkpoint is corrupt or not an MXFP4 release")
        if isinstance(lead, int):
            values = values.unsqueeze(0)
        out = values[..., i0 - g0 * MXFP4_GROUP:i1 - g0 * MXFP4_GROUP].transpose(-1, -2)
        for d in reversed([d for d in range(len(index)) if isinstance(index[d], int)]):
            out = out.squeeze(d)
        return out.contiguous()


Format = BlockFp8 | Mxfp4


def requantize(items: Iterable[tuple[str, torch.Tensor]], fmt: Format,
               source: SafetensorsReader) -> Iterator[tuple[str, torch.Tensor]]:
    """``--quantize``: each quantized tensor of ``fmt`` in the source's format, reusing the source's scales
    (read from ``source``): an FP8 weight as (e4m3 weight, its ``_scale_inv``) with the source's tiles
    (:func:`quantize_blocks`), an MXFP4 ``X`` as (``X_blocks``, ``X_scales``) (:func:`quantize_mxfp4`); other
    tensors unchanged."""
    for key, value in items:
        if isinstance(fmt, Mxfp4):
            pair = fmt.pairs.get(key)
            if pair is None:
                yield key, value
                continue
            if value.dim() != _PACKED:
                raise ValueError(f"{key}: MXFP4 needs a 3-d [experts, in, out] tensor, got {tuple(value.shape)}")
            if not bool(torch.isfinite(value).all()):
                raise error("quant.mxfp4-non-finite", f"{key} holds inf or NaN: MXFP4 cannot store it", key=key,
                            hint="export without --quantize, or fix the model")
            blocks, scales = quantize_mxfp4(value.transpose(-1, -2), source.read(pair[1]))
            yield pair[0], blocks
            yield pair[1], scales
            continue
        scale_key = fmt.scale_key(key)
        if scale_key is None:
            yield key, value
            continue
        q, fp8_scales_ = quantize_blocks(value, fmt.block, source.read(scale_key))
        yield key, q
        yield scale_key, fp8_scales_


def reader_for(inner: SafetensorsReader, fmt: Format | None) -> SafetensorsReader | DequantizingReader | Mxfp4Reader:
    """``inner`` itself when the checkpoint is not quantized."""
    if fmt is None:
        return inner
    return Mxfp4Reader(inner, fmt) if isinstance(fmt, Mxfp4) else DequantizingReader(inner, fmt)
