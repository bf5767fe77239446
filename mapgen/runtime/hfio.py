"""Hugging Face safetensors I/O for the runtime: a slicing reader and an atomic sharded writer.

Reading opens each shard file once and reads only the requested slices with ``os.preadv`` straight into
the result tensor (or a caller's, ``read_into``), counting the bytes it returns so benchmarks and tests can
check that a TP rank reads only its share. Shards are written by :func:`write_safetensors` (``save_file``'s
bytes, without its in-memory copy of the shard). Writing goes to a hidden temporary directory beside the
target and is renamed into place only when every shard and the index are on disk: an interrupted export
never leaves a directory that looks complete.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mapgen.errors import Diagnostic, MapgenError, error

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,  # block-scaled FP8 weights (read through mapgen.runtime.quant)
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in DTYPES.items()}
# safetensors' dtype order (its Rust ``Dtype`` enum): a file lists the tensors by dtype, last first, then name
_ST_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
             "I64", "U64")
CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def safe_child(root: Path, name: str, *, what: str) -> Path:
    """``root / name`` after refusing absolute names, ``..`` and symlinks that leave ``root``."""
    if not name or os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise error("path.unsafe", f"{what} {name!r} is not a plain relative file name", file=str(root),
                    expected="a file name inside the checkpoint directory", hint="fix the index")
    path = root / name
    real_root = root.resolve()
    if path.exists() and not path.resolve().is_relative_to(real_root):
        raise error("path.outside", f"{what} {name!r} resolves outside the checkpoint directory",
                    file=str(path), expected=f"a file under {real_root}",
                    hint="copy the shard into the checkpoint instead of linking it")
    return path


def read_weight_map(root: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """``(key -> shard file, index metadata)`` of a checkpoint directory (index or single file)."""
    index = root / INDEX_NAME
    if index.is_file():
        data = json.loads(index.read_text())
        return dict(data["weight_map"]), dict(data.get("metadata") or {})
    single = root / SINGLE_NAME
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_NAME), {}
    raise error("checkpoint.missing-index", f"no {INDEX_NAME} or {SINGLE_NAME}", file=str(root),
                hint="point at a Hugging Face checkpoint directory")


@dataclass(frozen=True)
class FileSpan:
    """Bytes ``[offset, offset + nbytes)`` of ``path``: a tensor block of ``dtype`` and ``shape``."""

    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class _Shard:
    """One safetensors file read with ``os.pread`` (no memory map: pages a load has passed are not kept
    mapped, so they never count in the process's RSS): its header, and reads of contiguous byte ranges."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            head = os.pread(self.fd, 8, 0)
            if len(head) != 8:
                raise ValueError("shorter than a safetensors header")
            size = int.from_bytes(head, "little")
            header = json.loads(os.pread(self.fd, size, 8))
        except (ValueError, OSError) as exc:
            os.close(self.fd)
            raise error("checkpoint.bad-shard", f"cannot read the safetensors header: {exc}", file=str(path),
                        hint="the shard is truncated or not a safetensors file; download it again") from None
        self.data_start = 8 + size
        header.pop("__metadata__", None)
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            k: (v["dtype"], tuple(v["shape"]), int(v["data_offsets"][0]), int(v["data_offsets"][1]))
            for k, v in header.items()}

    def _locate(self, key: str, index: tuple[slice | int, ...]) -> tuple[torch.dtype, int, tuple[int, ...],
                                                                       tuple[slice | int, ...]]:
        """``index`` of ``key`` as one contiguous byte range: (dtype, its first byte in the data section, the
        shape of that block, the indices still to apply to the block's trailing dimensions)."""
        dtype_name, shape, begin, end = self.tensors[key]
        dtype = DTYPES[dtype_name]
        strides = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 1]
        if len(index) > len(shape):
            raise IndexError(f"{key}: {len(index)} indices for a {len(shape)}-d tensor")
        offset, d = 0, 0
        while d < len(index) and isinstance(index[d], int):
            i = int(index[d])  # type: ignore[arg-type]
            if not -shape[d] <= i < shape[d]:
                raise IndexError(f"{key}: index {i} out of range for dim {d} of size {shape[d]}")
            offset += (i % shape[d]) * strides[d]
            d += 1
        block: tuple[int, ...]
        rest: tuple[slice | int, ...] = ()
        if d < len(shape):
            first = index[d] if d < len(index) else slice(None)
            if not isinstance(first, slice) or first.step not in (None, 1):
                raise IndexError(f"{key}: only ints and unit-step slices are supported")
            start, stop, _ = first.indices(shape[d])
            stop = max(start, stop)
            offset += start * strides[d]
            count = (stop - start) * strides[d]
            block = (stop - start, *shape[d + 1:])
            rest = tuple(index[d + 1:])
        else:
            count, block = 1, ()
        item = dtype.itemsize
        if (offset + count) * item > end - begin:
            raise error("checkpoint.truncated", f"{key} is cut short in its shard", file=str(self.path), key=key,
                        hint="download the shard again")
        return dtype, begin + offset * item, block, rest

    def _pread_into(self, key: str, at: int, out: torch.Tensor) -> None:
        """Fill the contiguous ``out`` with its bytes from data offset ``at``: the kernel copies straight from
        the page cache into the tensor (one pass, no intermediate buffer)."""
        view = out.view(-1).view(torch.uint8).numpy().data if out.numel() else None
        done, total = 0, out.numel() * out.element_size()
        while view is not None and done < total:
            n = os.preadv(self.fd, [view[done:]], self.data_start + at + done)
            if n <= 0:
                raise error("checkpoint.truncated", f"{key} is cut short in its shard", file=str(self.path),
                            key=key, hint="download the shard again")
            done += n

    def read(self, key: str, index: tuple[slice | int, ...]) -> torch.Tensor:
        dtype, at, block, rest = self._locate(key, index)
        tensor = torch.empty(block, dtype=dtype)
        self._pread_into(key, at, tensor)
        if rest:
            tensor = tensor[(slice(None), *rest)].contiguous()
        return tensor

    def read_into(self, key: str, index: tuple[slice | int, ...], out: torch.Tensor) -> None:
        dtype, at, block, rest = self._locate(key, index)
        if not rest and out.is_contiguous() and out.dtype == dtype and tuple(out.shape) == block:
            self._pread_into(key, at, out)
        else:
            out.copy_(self.read(key, index))

    def locate(self, key: str, index: tuple[slice | int, ...]) -> tuple[torch.dtype, tuple[int, ...], int, int] | None:
        """``index`` of ``key`` as one byte range of the file: (dtype, shape, offset, bytes), or ``None``
        where it is not one range."""
        dtype, at, block, rest = self._locate(key, index)
        if rest:
            return None
        return dtype, block, self.data_start + at, math.prod(block) * dtype.itemsize

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SafetensorsReader:
    """The primitives' ``Reader`` over a sharded safetensors checkpoint (``os.pread`` of the byte ranges a
    slice needs: a row range is one read; columns read their rows)."""

    def __init__(self, root: Path, weight_map: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        self.weight_map = dict(weight_map) if weight_map is not None else read_weight_map(self.root)[0]
        self.shard_order = list(dict.fromkeys(self.weight_map.values()))
        self._rank = {s: i for i, s in enumerate(self.shard_order)}
        self._handles: dict[str, _Shard] = {}
        self.bytes_read = 0
        self.opened: list[str] = []

    def _handle(self, key: str) -> _Shard:
        shard = self.weight_map.get(key)
        if shard is None:
            raise error("checkpoint.missing-key", f"the checkpoint has no tensor {key!r}", file=INDEX_NAME, key=key,
                        hint="the index and the layout disagree; re-scan the checkpoint")
        handle = self._handles.get(shard)
        if handle is None:
            path = safe_child(self.root, shard, what="shard")
            if not path.is_file():
                raise error("checkpoint.missing-shard", f"shard {shard!r} is missing", file=str(path), key=key)
            handle = _Shard(path)
            self._handles[shard] = handle
            self.opened.append(shard)
        if key not in handle.tensors:
            raise error("checkpoint.key-not-in-shard", f"the index puts {key!r} in {shard!r}, which lacks it",
                        file=shard, key=key, hint="the index is stale; regenerate it")
        return handle

    def shard_rank(self, key: str) -> int:
        shard = self.weight_map.get(key)
        return self._rank.get(shard, len(self.shard_order)) if shard is not None else len(self.shard_order)

    def release_below(self, rank: int) -> None:
        """Close the shards that come before ``rank`` in shard order (the loaders read in shard order)."""
        for shard in list(self._handles):
            if self._rank.get(shard, 0) < rank:
                self._handles.pop(shard).close()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._handle(key).tensors[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._handle(key).tensors[key][0]]

    def read(self, key: str, index: tuple[slice | int, ...] = ()) -> torch.Tensor:
        tensor = self._handle(key).read(key, index)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def read_into(self, key: str, index: tuple[slice | int, ...], out: torch.Tensor) -> None:
        """``out.copy_(read(key, index))`` without the intermediate tensor where the slice is one byte range."""
        self._handle(key).read_into(key, index, out)
        self.bytes_read += out.numel() * out.element_size()

    def locate(self, key: str, index: tuple[slice | int, ...] = ()) -> FileSpan | None:
        """Where ``read(key, index)`` lies in its shard file, when it is one byte range (whole tensors, row
        blocks, one slot of a packed tensor): for copying it file to file without reading it. Not counted
        in ``bytes_read`` (:meth:`count` when the bytes are moved)."""
        handle = self._handle(key)
        found = handle.locate(key, index)
        if found is None:
            return None
        dtype, shape, offset, nbytes = found
        return FileSpan(str(handle.path), offset, nbytes, dtype, shape)

    def count(self, nbytes: int) -> None:
        """Bytes moved by someone else on this reader's behalf (a kernel copy of :meth:`locate`'s ranges)."""
        self.bytes_read += nbytes

    def header_metadata(self, shard: str) -> dict[str, str]:
        path = safe_child(self.root, shard, what="shard")
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def staging_dir(target: Path) -> Path:
    """A hidden sibling of ``target`` that no one mistakes for a finished checkpoint."""
    return target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"


def prepare_target(target: Path, *, overwrite: bool, sources: Iterable[Path] = ()) -> None:
    """Refuse an existing target unless ``overwrite``; never a source directory."""
    target = Path(target)
    real = target.resolve()
    for src in sources:
        if not Path(src).exists():
            continue
        real_src = Path(src).resolve()
        if real == real_src:
            raise error("output.is-source", "the output directory is the source checkpoint", file=str(target),
                        hint="choose another output directory; mapgen never writes into its input")
        if real_src.is_relative_to(real) or real.is_relative_to(real_src):
            # --overwrite replaces the whole target: a parent of the source would take the source with it
            relation = "contains" if real_src.is_relative_to(real) else "is inside"
            raise error("output.overlaps-source", f"the output directory {relation} the source {src}", file=str(target),
                        hint="choose an output directory outside the source checkpoint and not above it")
    if target.exists() and not overwrite:
        raise error("output.exists", "the output directory already exists", file=str(target),
                    hint="choose a new directory or pass --overwrite")


def commit_dir(staging: Path, target: Path) -> None:
    """Move a finished staging directory into place (replacing an old target only now)."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


#: A byte range of a file: (path, offset, nbytes).
FileRange = tuple[str, int, int]


@dataclass(frozen=True)
class CopiedTensor:
    """A tensor of ``dtype`` and ``shape`` whose bytes are the concatenation of ``ranges`` of other files:
    :func:`write_safetensors` copies them file to file instead of from memory."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    ranges: tuple[FileRange, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def cut_ranges(ranges: Iterable[FileRange], start: int, nbytes: int) -> tuple[FileRange, ...] | None:
    """Bytes ``[start, start + nbytes)`` of the concatenation of ``ranges`` as file ranges; ``None`` if they
    reach past its end."""
    out = []
    for path, offset, size in ranges:
        if start >= size:
            start -= size
            continue
        if not nbytes:
            break
        n = min(size - start, nbytes)
        out.append((path, offset + start, n))
        nbytes -= n
        start = 0
    return None if nbytes else tuple(out)


def kernel_copy(src: int, src_at: int, dst: int, dst_at: int, nbytes: int) -> None:
    """``nbytes`` from ``src`` at ``src_at`` to ``dst`` at ``dst_at`` inside the kernel (``copy_file_range``:
    no pass through user memory; a reflink where the file system has them), by ``pread``/``pwrite`` where
    the kernel or file system cannot."""
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src, dst, nbytes - done, src_at + done, dst_at + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
                raise
            n = os.pwrite(dst, os.pread(src, min(nbytes - done, 64 << 20), src_at + done), dst_at + done)
        if n <= 0:
            raise OSError(f"the source ended {nbytes - done} bytes short of a copied tensor")
        done += n


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor | CopiedTensor],
                      metadata: Mapping[str, str] | None = None, *, sync: bool = False) -> None:
    """``safetensors.torch.save_file`` byte for byte (same header, same tensor order: by dtype, then
    name), but each tensor's bytes go from its memory straight to the file: save_file first serialises the
    whole shard into one bytes object, a second copy of it in memory. A :class:`CopiedTensor`'s bytes are
    copied from its file ranges in the kernel (:func:`kernel_copy`). ``sync``: fsync before returning."""
    items = sorted(((k, v if isinstance(v, CopiedTensor) else v.detach().contiguous()) for k, v in tensors.items()),
                   key=lambda kv: (-_ST_ORDER.index(TORCH_TO_ST.get(kv[1].dtype, "BOOL")), kv[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, value in items:
        if value.dtype not in TORCH_TO_ST:
            raise TypeError(f"{key}: safetensors has no dtype {value.dtype}")
        size = value.nbytes
        header[key] = {"dtype": TORCH_TO_ST[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    fds: dict[str, int] = {}
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        try:
            for _, value in items:
                if isinstance(value, CopiedTensor):
                    _copy_ranges(f, value, fds)
                elif value.numel():
                    f.write(value.reshape(-1).view(torch.uint8).numpy().data)
        finally:
            for fd in fds.values():
                os.close(fd)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def copy_ranges(ranges: Iterable[FileRange], dst: int, at: int, fds: dict[str, int]) -> int:
    """``ranges`` (file, offset, bytes), in order, into the open file descriptor ``dst`` from offset ``at``, in
    the kernel (:func:`kernel_copy`); each source file is opened once into ``fds`` (the caller closes them).
    Returns the offset after the last byte."""
    for src, offset, n in ranges:
        fd = fds.get(src)
        if fd is None:
            fd = fds[src] = os.open(src, os.O_RDONLY)
        kernel_copy(fd, offset, dst, at, n)
        at += n
    return at


def _copy_ranges(f: Any, value: CopiedTensor, fds: dict[str, int]) -> None:
    """Append ``value``'s ranges to the open file ``f`` in the kernel."""
    if sum(n for _, _, n in value.ranges) != value.nbytes:
        raise ValueError(f"copied ranges hold {sum(n for _, _, n in value.ranges)} bytes, the tensor {value.nbytes}")
    f.flush()
    f.seek(copy_ranges(value.ranges, f.fileno(), f.tell(), fds))


class ShardedWriter:
    """Writes safetensors shards into a staging directory, then the index, then renames into place."""

    def __init__(self, target: Path, *, overwrite: bool = False) -> None:
        self.target = Path(target)
        self.overwrite = overwrite
        self.staging = staging_dir(self.target)
        self.staging.mkdir(parents=True)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.tensors_written = 0

    def write_shard(self, name: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
        if not tensors:
            return
        clean = {k: v.detach().contiguous() for k, v in tensors.items()}
        write_safetensors(self.staging / name, clean, metadata)
        for key, value in clean.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()
        self.tensors_written += len(clean)

    def write_text(self, name: str, text: str) -> None:
        (self.staging / name).write_text(text)

    def finish(self, *, index_metadata: Mapping[str, Any] | None = None, single_file: bool = False) -> Path:
        if not single_file:
            meta = dict(index_metadata or {})
            meta["total_size"] = self.total_size
            index = {"metadata": meta, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if self.target.exists() and not self.overwrite:
            raise MapgenError(Diagnostic("error", "output.exists", "the output directory appeared meanwhile",
                                         file=str(self.target)))
        commit_dir(self.staging, self.target)
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
