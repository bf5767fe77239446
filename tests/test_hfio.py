"""The runtime's safetensors I/O (mapgen/runtime/hfio.py) and the streaming writer's memory: reads with
``os.pread`` into the result (``read``) or into a caller's tensor (``read_into``) give what safetensors
gives; ``write_safetensors`` writes what ``save_file`` writes, byte for byte; the gated op reads its halves
straight into its result with the same values as the generic path; and the streaming dist-checkpoint
writer holds only the entries in flight, never the checkpoint."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mapgen.ops import DictReader, Shard, load
from mapgen.runtime.hfio import SafetensorsReader, write_safetensors
from tests import tiny
from tests.ops.support import rule, spec


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "packed": torch.randn(3, 8, 6, generator=g).to(torch.bfloat16),
        "gate": torch.randn(10, 4, generator=g),
        "up": torch.randn(10, 4, generator=g),
        "gate_up": torch.randn(20, 4, generator=g).to(torch.float16),
        "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "empty": torch.empty(0, 5),
    }


def test_write_safetensors_is_save_file_byte_for_byte(tmp_path: Path) -> None:
    tensors = {**_tensors(), "flag": torch.tensor([True, False])}
    for metadata in (None, {"format": "pt"}):
        save_file(tensors, str(tmp_path / "a.safetensors"), metadata=metadata)
        write_safetensors(tmp_path / "b.safetensors", tensors, metadata)
        assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.parametrize("index", [(), (1,), (slice(2, 7),), (slice(None), slice(1, 3)), (2, slice(1, 5)),
                                   (0, slice(None), slice(2, 6)), (2, 3)])
def test_reader_reads_what_safetensors_reads(tmp_path: Path, index: tuple[Any, ...]) -> None:
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path, dict.fromkeys(_tensors(), "model.safetensors"))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        want = f.get_slice("packed")[index] if index else f.get_tensor("packed")
    got = reader.read("packed", index)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
    into = torch.full((2, *want.shape), 7.0, dtype=want.dtype)  # a slice of a larger tensor, as the ops use it
    reader.read_into("packed", index, into[1])
    assert torch.equal(into[1], want)
    assert bool((into[0] == 7.0).all())
    assert reader.bytes_read == 2 * want.numel() * want.element_size()
    reader.close()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
def test_gated_halves_read_in_place_equal_the_generic_path(tmp_path: Path, fused: bool, tp: int) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path, dict.fromkeys(tensors, "model.safetensors"))
    keys = ["gate_up"] if fused else ["gate", "up"]
    r = rule("gated_fc1", "gated_column", fused=fused)
    for rank in range(tp):
        want = load(r, keys, spec(), Shard(rank, tp), DictReader(tensors))
        got = load(r, keys, spec(), Shard(rank, tp), reader)
        assert got.dtype == want.dtype
        assert torch.equal(got, want)
    reader.close()


@pytest.mark.distributed
def test_streaming_writer_holds_only_the_entries_in_flight(tmp_path: Path) -> None:
    """torch's DCP writer loop kept every tensor it wrote until the file closed (so the streaming convert's
    memory grew with the checkpoint); mapgen's loop does not. Counted with weak references to every entry
    the producer hands out: at most the entry being written, the next one and the one being made."""
    from mapgen.runtime.api import HFSource, Parallel, bind, build, parallel_context, plan_dtypes
    from mapgen.runtime.engine import EntryProducer
    from mapgen.runtime.megatron import save_dist_checkpoint_streaming

    src = HFSource.open(str(tiny.write("qwen3-moe", tmp_path / "src")))
    binding = bind(src.layout)

    class Tracking:
        """Hands out each entry in memory owned by a numpy array, which lives exactly as long as any tensor,
        view or alias of its storage does."""

        def __init__(self, inner: EntryProducer) -> None:
            self.inner, self.refs, self.most = inner, list[weakref.ref[np.ndarray[Any, Any]]](), 0

        def order(self, local: str) -> tuple[Any, ...]:
            return self.inner.order(local)

        def produce(self, local: str) -> torch.Tensor:
            value = self.inner.produce(local)
            owner = np.empty(value.numel() * value.element_size(), dtype=np.uint8)
            tracked = torch.from_numpy(owner).view(value.dtype).view(value.shape)
            tracked.copy_(value)
            self.refs.append(weakref.ref(owner))
            del owner, value
            self.most = max(self.most, sum(ref() is not None for ref in self.refs))
            return tracked

    with parallel_context(Parallel()):
        model = build(binding, Parallel(), device="meta", dtypes=plan_dtypes(binding, src.dtypes))
        reader = SafetensorsReader(src.root, src.weight_map)
        tracking = Tracking(EntryProducer(model, binding, reader))
        save_dist_checkpoint_streaming(model, tmp_path / "release", tracking)
        reader.close()
    assert len(tracking.refs) > 20
    assert tracking.most <= 3, f"{tracking.most} of {len(tracking.refs)} entries were alive at once"


@pytest.mark.parametrize("kernel", [True, False])
def test_kernel_copy_and_its_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: bool) -> None:
    """The streaming convert's file-to-file copy moves exactly the asked bytes to the asked place, with
    ``copy_file_range`` or, where the kernel or file system refuses it (EXDEV, EINVAL, ...), pread/pwrite;
    a source that ends early is an error."""
    import errno
    import os

    from mapgen.runtime.hfio import kernel_copy as _kernel_copy

    src, dst = tmp_path / "src", tmp_path / "dst"
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    src.write_bytes(data)
    dst.write_bytes(b"x" * 100)
    if not kernel:
        def refuse(*args: Any) -> int:
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    a, b = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        _kernel_copy(a, 12345, b, 100, len(data) - 12345)
        assert dst.read_bytes() == b"x" * 100 + data[12345:]
        with pytest.raises(OSError, match="short"):
            _kernel_copy(a, len(data) - 10, b, 0, 20)
    finally:
        os.close(a)
        os.close(b)


def test_cut_maps_an_item_onto_its_entry_spans() -> None:
    from mapgen.runtime.hfio import FileSpan
    from mapgen.runtime.megatron import _cut

    spans = [FileSpan("g", 1000, 40, torch.bfloat16, (2, 10)), FileSpan("u", 5000, 40, torch.bfloat16, (2, 10))]
    assert _cut(spans, 0, 80) == (("g", 1000, 40), ("u", 5000, 40))
    assert _cut(spans, 40, 40) == (("u", 5000, 40),)  # the up half of a gated fc1 entry
    assert _cut(spans, 30, 20) == (("g", 1030, 10), ("u", 5000, 10))
    assert _cut(spans, 60, 40) is None
