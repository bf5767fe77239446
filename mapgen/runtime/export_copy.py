"""The streaming export's file-to-file copies: HF output tensors that are byte ranges of a dist checkpoint.

The inverse of the streaming convert's copies. An op declares (:meth:`mapgen.ops.Op.spans`, at TP=1: the
export sees the whole Megatron tensor) the HF row blocks whose dim-0 concatenation is the Megatron tensor
when its load only copies them; read the other way, each block of an HF tensor is a byte range of the
Megatron tensor. :func:`mapgen.runtime.megatron.locate_dist_entries` says where a Megatron tensor's bytes
lie in the ``.distcp`` files (the items' data records, from the checkpoint's own metadata and megatron-core's
load plan). Where an HF tensor is tiled exactly by such blocks, in its own dtype, it is written by
:func:`mapgen.runtime.hfio.write_safetensors` as a :class:`~mapgen.runtime.hfio.CopiedTensor`: the bytes go
from the checkpoint files to the output in the kernel, never through memory. Nothing is inferred from
shapes: a key is copied only where the declared spans tile it and the checkpoint items tile the entry.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from mapgen import ops
from mapgen.contract.expand import Instance
from mapgen.contract.spec import ModelSpec
from mapgen.ops import Shard
from mapgen.ops._base import Index, PrimitiveError
from mapgen.runtime.hfio import CopiedTensor, FileRange, cut_ranges


class _ShapeReader:
    """A :class:`mapgen.ops.Reader` that knows HF shapes and dtypes only (``spans`` needs no bytes)."""

    def __init__(self, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.shapes = shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self.shapes[key][1]

    def read(self, key: str, index: Index = ()) -> torch.Tensor:
        raise PrimitiveError(f"{key}: the export's copy planner reads no tensor data")


@dataclass(frozen=True)
class _Piece:
    """Bytes ``[at, at + nbytes)`` of an HF key are bytes ``[entry_at, ...)`` of the Megatron entry ``local``."""

    at: int
    nbytes: int
    local: str
    entry_at: int


@dataclass(frozen=True)
class Planned:
    """An HF tensor (``shape``, ``dtype``) tiled in order by ``pieces`` of Megatron entries."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[_Piece, ...]


def _block(shape: tuple[int, ...], index: Index, itemsize: int) -> tuple[int, int, tuple[int, ...]] | None:
    """``(byte offset, bytes, block shape)`` of the block ``index`` (ints, then at most one unit-step slice) of
    a row-major tensor of ``shape``; ``None`` for anything else."""
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    at, dims = 0, list(shape)
    for i, item in enumerate(index):
        if isinstance(item, int):
            if not 0 <= item < shape[i] or dims[0] != shape[i]:
                return None
            at += item * strides[i]
            dims.pop(0)
        elif isinstance(item, slice) and i == len(index) - 1 and item.step in (None, 1):
            start, stop, _ = item.indices(shape[i])
            if stop < start:
                return None
            at += start * strides[i]
            dims[0] = stop - start
        else:
            return None
    return at * itemsize, math.prod(dims) * itemsize, tuple(dims)


@dataclass(frozen=True)
class CopyPlanner:
    """What the planner needs of the export (the same for every output shard): the spec, the model's meta
    tensors by local name, the local name of each Megatron parameter, the instances writing each HF key,
    the expert slots of each packed key, and the dtype each key is written in."""

    spec: ModelSpec
    entries: Mapping[str, torch.Tensor]
    local_of: Mapping[str, str]
    producers: Mapping[str, list[Instance]]
    packed_counts: Mapping[str, set[int]]
    dtype_for: Callable[[str, torch.Tensor], torch.dtype]

    def plan(self, insts: Iterable[Instance], keyset: set[str]) -> dict[str, Planned]:
        """HF key -> its shape, dtype and the pieces of Megatron entries that tile it, for each key of
        ``keyset`` that is exactly such a concatenation, in the dtype it is written in."""
        insts = list(insts)
        reader = _ShapeReader(self._shapes(insts))
        pieces: dict[str, list[_Piece]] = {}
        spanned: set[int] = set()
        for inst in insts:
            placed = self._pieces(inst, reader)
            if placed is not None:
                spanned.add(id(inst))
                for key, piece in placed:
                    pieces.setdefault(key, []).append(piece)
        plan: dict[str, Planned] = {}
        for key, found in pieces.items():
            shape, dtype = reader.shapes[key]
            makers = self.producers.get(key, [])
            if key not in keyset or self.dtype_for(key, torch.empty(0, dtype=dtype, device="meta")) != dtype:
                continue
            if not all(id(i) in spanned for i in makers) or (
                    len(makers) > 1 and not all(i.expert is not None for i in makers)):
                continue  # another instance writes into it, or several copies of one tensor (compared when produced)
            ordered = sorted(found, key=lambda p: p.at)
            if [p.at for p in ordered] == list(itertools.accumulate((p.nbytes for p in ordered[:-1]), initial=0)) \
                    and sum(p.nbytes for p in ordered) == math.prod(shape) * dtype.itemsize:
                plan[key] = Planned(shape, dtype, tuple(ordered))
        return plan

    def _shapes(self, insts: list[Instance]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Each HF key's stored shape and dtype, from the ops' ``save`` run on the meta tensors."""
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for inst in insts:
            meta = self.entries[self.local_of[inst.megatron]]
            try:
                produced = ops.save(inst.rule, inst.hf, self.spec, meta, expert=inst.expert)
            except (PrimitiveError, RuntimeError, NotImplementedError):
                continue  # its save needs values: that instance is produced
            for frag in produced:
                shape = tuple(frag.tensor.shape)
                if frag.index is not None:
                    shape = (len(self.packed_counts.get(frag.key, ())), *shape)
                shapes.setdefault(frag.key, (shape, frag.tensor.dtype))
        return shapes

    def _pieces(self, inst: Instance, reader: _ShapeReader) -> list[tuple[str, _Piece]] | None:
        """The instance's declared spans (at TP=1) as pieces of HF keys, if they tile its whole entry."""
        local = self.local_of[inst.megatron]
        meta = self.entries[local]
        if meta.dim() == 0 or any(k not in reader.shapes for k in inst.hf):
            return None
        blocks = ops.spans(inst.rule, inst.hf, self.spec, Shard(0, 1), reader, expert=inst.expert)
        if blocks is None:
            return None
        placed: list[tuple[str, _Piece]] = []
        entry_at, rows = 0, 0
        for key, index in blocks:
            shape, dtype = reader.shapes[key]
            block = _block(shape, index, dtype.itemsize)
            if block is None or dtype != meta.dtype or tuple(block[2][1:]) != tuple(meta.shape[1:]):
                return None
            placed.append((key, _Piece(block[0], block[1], local, entry_at)))
            entry_at += block[1]
            rows += block[2][0] if block[2] else 1
        return placed if rows == meta.shape[0] and entry_at == meta.nbytes else None


def copied_tensors(plan: Mapping[str, Planned],
                   located: Mapping[str, tuple[FileRange, ...] | None]) -> dict[str, CopiedTensor]:
    """The planned keys whose every entry's bytes were located in the checkpoint, as file ranges."""
    out: dict[str, CopiedTensor] = {}
    for key, planned in plan.items():
        ranges: list[FileRange] = []
        for piece in planned.pieces:
            entry = located.get(piece.local)
            cut = cut_ranges(entry, piece.entry_at, piece.nbytes) if entry is not None else None
            if cut is None:
                break
            ranges += cut
        else:
            out[key] = CopiedTensor(planned.dtype, planned.shape, tuple(ranges))
    return out
