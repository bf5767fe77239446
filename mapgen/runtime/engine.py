"""The distributed conversion engine: HF -> Megatron loading and Megatron -> HF streaming export.

Both directions execute the same rule instances the bijection proof checked (``mapgen.contract.expand``).

Loading: every rank walks its *own* parameters (rank-local names translated to the global namespace by
megatron-core's own layer offsets and local expert indices), orders them by the shard file their HF
tensors live in, and asks the rule's primitive for its local tensor, which reads only the rows, columns,
query groups or experts that rank owns. Afterwards it asserts that every local parameter was written
exactly once.

Exporting: every rank offers the pieces it holds (its TP/ETP shard of each global parameter); the lowest
rank holding a piece owns it. Rank 0 walks the global instances in output order, receives each piece from
its owner (point-to-point, in an order every rank computes identically), reassembles the full Megatron
tensor with the primitive's ``gather``, converts it back with ``save`` and yields HF tensors one at a time.
Packed expert tensors are stacked from their per-expert fragments as soon as the last one arrives; HF
tensors shared by every MTP depth are emitted once and checked equal across depths.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mapgen import ops
from mapgen.contract.expand import Instance, plan_instances
from mapgen.contract.rules import Rule
from mapgen.contract.spec import ModelSpec
from mapgen.errors import Diagnostic, MapgenError, error
from mapgen.ir import Layout
from mapgen.runtime.layout import Parallel


# ---------------------------------------------------------------------------------------------------------
# Binding a bridge to one checkpoint
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Binding:
    """A bridge's rules instantiated for one layout."""

    spec: ModelSpec
    layout: Layout
    rules: tuple[Rule, ...]
    instances: list[Instance]
    by_megatron: dict[str, Instance]
    duplicates: list[Instance]

    @classmethod
    def create(cls, spec: ModelSpec, layout: Layout, rules: tuple[Rule, ...], mtp_inner: str) -> Binding:
        instances = list(plan_instances(rules, layout, mtp_inner))
        by_megatron: dict[str, Instance] = {}
        duplicates = []
        for inst in instances:
            if inst.rule.op == "duplicate":
                duplicates.append(inst)
                continue
            if inst.megatron in by_megatron:
                raise error("bridge.overlap", "two rules produce the same Megatron parameter", key=inst.megatron,
                            hint="re-run `mapgen emit`; the committed bridge is not the proven one")
            by_megatron[inst.megatron] = inst
        return cls(spec, layout, rules, instances, by_megatron, duplicates)


@dataclass
class Coords:
    """This rank's place in the parallel layout: its ranks from megatron-core's parallel_state, the sizes from
    :meth:`mapgen.runtime.layout.Parallel.current` (the one layout type)."""

    rank: int = 0
    world: int = 1
    tp_rank: int = 0
    tp: int = 1
    etp_rank: int = 0
    etp: int = 1

    @classmethod
    def current(cls) -> Coords:
        if not dist.is_available() or not dist.is_initialized():
            return cls()
        from megatron.core import parallel_state as ps

        tp_rank, etp_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
        layout = Parallel.current()
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), tp_rank=tp_rank, tp=layout.tp,
                   etp_rank=etp_rank, etp=layout.etp_size)

    def shard(self, rule: Rule) -> ops.Shard:
        if ops.shard_dim(rule) is None:
            return ops.Shard(0, 1)
        return ops.Shard(self.etp_rank, self.etp) if rule.experts else ops.Shard(self.tp_rank, self.tp)


@dataclass
class Stats:
    tensors: int = 0
    bytes: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _local_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state") or not isinstance(value, torch.Tensor):
            continue
        out[name] = value
    return out


def _global_names(model: torch.nn.Module) -> dict[str, str]:
    from mapgen.runtime.megatron import local_to_global

    return local_to_global(model)


def _local_instances(params: Mapping[str, torch.Tensor], model: torch.nn.Module,
                     binding: Binding) -> dict[str, Instance]:
    """The rule instance behind each of this rank's entries (local name -> instance); every entry unmapped
    by the bridge is reported at once (``load.unmapped``)."""
    names = _global_names(model)
    out: dict[str, Instance] = {}
    problems: list[Diagnostic] = []
    for local in params:
        glob = names.get(local, local)
        inst = binding.by_megatron.get(glob)
        if inst is None:
            problems.append(Diagnostic("error", "load.unmapped", "no rule produces this Megatron parameter",
                                       key=glob, hint="the bridge does not match this model; re-run `mapgen emit`"))
            continue
        out[local] = inst
    if problems:
        raise MapgenError(problems)
    return out


# ---------------------------------------------------------------------------------------------------------
# HF -> Megatron
# ---------------------------------------------------------------------------------------------------------
def load_model(model: torch.nn.Module, binding: Binding, reader: Any, coords: Coords | None = None,
               *, progress: Callable[[int, int], None] | None = None) -> Stats:
    """Fill every parameter of ``model`` (this rank's piece of the Megatron model) from the HF reader."""
    coords = coords or Coords.current()
    start = time.perf_counter()
    params = _local_params(model)
    plan: list[tuple[int, str, str, Instance]] = []
    for local, inst in _local_instances(params, model, binding).items():
        order = min((reader.shard_rank(k) for k in inst.hf), default=0) if hasattr(reader, "shard_rank") else 0
        plan.append((order, inst.hf[0] if inst.hf else "", local, inst))
    plan.sort(key=lambda item: (item[0], item[1], item[2]))

    problems: list[Diagnostic] = []
    written: dict[str, int] = defaultdict(int)
    stats = Stats()
    with torch.no_grad():
        release = getattr(reader, "release_below", None)
        for i, (shard_rank, _, local, inst) in enumerate(plan):
            if release is not None:
                release(shard_rank)
            target = params[local]
            try:
                value = ops.load(inst.rule, inst.hf, binding.spec, coords.shard(inst.rule), reader, expert=inst.expert)
            except ops.PrimitiveError as exc:
                raise error("load.primitive", str(exc), key=local) from None
            if tuple(value.shape) != tuple(target.shape):
                problems.append(Diagnostic(
                    "error", "load.shape", f"{local}: HF gives {tuple(value.shape)}, Megatron expects "
                    f"{tuple(target.shape)}", key=", ".join(inst.hf),
                    hint="the config and the checkpoint disagree on a dimension"))
                continue
            target.copy_(value)  # converts the dtype in the same pass (no fp32 temporary)
            written[local] += 1
            stats.tensors += 1
            stats.bytes += target.numel() * target.element_size()
            if progress:
                progress(i + 1, len(plan))
    if problems:
        raise MapgenError(problems)
    missing = sorted(set(params) - set(written))
    twice = sorted(n for n, c in written.items() if c != 1)
    if missing or twice:
        raise MapgenError([Diagnostic("error", "load.coverage", f"{n} was written {written.get(n, 0)} times",
                                      key=n) for n in missing + twice])
    _check_duplicates(binding, reader, coords)
    stats.bytes_read = getattr(reader, "bytes_read", 0)
    stats.seconds = time.perf_counter() - start
    return stats


class MetaReader:
    """A reader over another reader's shapes and dtypes that returns meta tensors: what a load would read,
    counted in ``bytes_read``, with nothing read."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bytes_read = 0

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.inner.shape(key))

    def dtype(self, key: str) -> torch.dtype:
        dtype: torch.dtype = self.inner.dtype(key)
        return dtype

    def read(self, key: str, index: tuple[slice | int, ...] = ()) -> torch.Tensor:
        full = torch.empty(self.shape(key), dtype=self.dtype(key), device="meta")
        out = full[index] if index else full
        self.bytes_read += out.numel() * out.element_size()
        return out


class EntryProducer:
    """HF -> one rank-local Megatron entry at a time, for the streaming convert (no model in memory).

    ``model`` is this rank's model on the meta device: it gives the entry names, shapes and dtypes. Each
    entry is produced by the rule's primitive from only this rank's slices of the HF tensors, cast to the
    entry's dtype. Entries are asked for in HF shard order (:meth:`order`), so shards are unmapped once
    passed, as in :func:`load_model`."""

    def __init__(self, model: torch.nn.Module, binding: Binding, reader: Any, coords: Coords | None = None,
                 *, progress: Callable[[int, int], None] | None = None) -> None:
        self.binding = binding
        self.reader = reader
        self.coords = coords or Coords.current()
        self.progress = progress
        self.entries = _local_params(model)
        self.instances = _local_instances(self.entries, model, binding)
        self.stats = Stats()
        self.produced: dict[str, int] = defaultdict(int)
        self.total_bytes = 0  # for a progress bar in bytes (0: unknown)

    def order(self, local: str) -> tuple[Any, ...]:
        inst = self.instances[local]
        rank = min((self.reader.shard_rank(k) for k in inst.hf), default=0)
        return (rank, inst.hf[0] if inst.hf else "")

    def produce(self, local: str) -> torch.Tensor:
        inst = self.instances[local]
        target = self.entries[local]
        release = getattr(self.reader, "release_below", None)
        if release is not None:
            release(self.order(local)[0])
        try:
            with torch.no_grad():
                value = ops.load(inst.rule, inst.hf, self.binding.spec, self.coords.shard(inst.rule), self.reader,
                               expert=inst.expert)
        except ops.PrimitiveError as exc:
            raise error("load.primitive", str(exc), key=local) from None
        if tuple(value.shape) != tuple(target.shape):
            raise error("load.shape", f"{local}: HF gives {tuple(value.shape)}, Megatron expects "
                        f"{tuple(target.shape)}", key=", ".join(inst.hf),
                        hint="the config and the checkpoint disagree on a dimension")
        value = value.to(target.dtype)
        self._account(local, value.numel() * value.element_size())
        return value

    def _account(self, local: str, nbytes: int) -> None:
        """One more entry of ``nbytes`` made: stats, bytes read so far, progress."""
        self.produced[local] += 1
        self.stats.tensors += 1
        self.stats.bytes += nbytes
        self.stats.bytes_read = getattr(self.reader, "bytes_read", 0)
        if self.progress:
            self.progress(self.stats.bytes, self.total_bytes)

    def spans(self, local: str) -> list[Any] | None:
        """Where ``local``'s bytes lie in the HF files, when :meth:`produce` would only copy them
        (:func:`mapgen.ops.spans`) and they are already in the entry's dtype: the file ranges
        (:class:`mapgen.runtime.hfio.FileSpan`) whose concatenation is the entry, in order. ``None``: the
        entry must be produced (a transform, a cast, a transpose, padding, or a reader that cannot locate
        bytes, e.g. a dequantizing one)."""
        locate = getattr(self.reader, "locate", None)
        if locate is None:
            return None
        inst = self.instances[local]
        target = self.entries[local]
        try:
            blocks = ops.spans(inst.rule, inst.hf, self.binding.spec, self.coords.shard(inst.rule), self.reader,
                               expert=inst.expert)
        except ops.PrimitiveError:
            return None  # produce() reports it
        if not blocks:
            return None
        found = [locate(key, index) for key, index in blocks]
        if any(f is None or f.dtype != target.dtype for f in found):
            return None
        rows = sum(f.shape[0] if f.shape else 1 for f in found)
        shape = found[0].shape
        want = (rows, *shape[1:]) if shape else ()
        if (tuple(want) != tuple(target.shape) or any(f.shape[1:] != shape[1:] for f in found)
                or (not shape and len(found) != 1)):
            return None  # produce() reports a shape mismatch
        return found

    def copied(self, local: str, nbytes: int) -> None:
        """Account for ``local`` written from :meth:`spans` without :meth:`produce` (stats, bytes read, progress)."""
        self.stats.extra["bytes_copied"] = self.stats.extra.get("bytes_copied", 0) + nbytes
        self.reader.count(nbytes)
        self._account(local, nbytes)

    def measure(self, local: str) -> int:
        """Bytes :meth:`produce` would read for ``local``, without reading: the primitive runs on meta tensors
        of the source's shapes and dtypes (:class:`MetaReader`)."""
        inst = self.instances[local]
        reader = MetaReader(self.reader)
        with torch.no_grad():
            ops.load(inst.rule, inst.hf, self.binding.spec, self.coords.shard(inst.rule), reader, expert=inst.expert)
        return reader.bytes_read

    def check_duplicates(self) -> None:
        _check_duplicates(self.binding, self.reader, self.coords)


def _check_duplicates(binding: Binding, reader: Any, coords: Coords) -> None:
    """An HF tensor stored twice must hold the same values twice (checked once, on global rank 0)."""
    if coords.rank != 0:
        return
    for dup in binding.duplicates:
        primary = binding.by_megatron.get(dup.megatron)
        if primary is None:
            raise error("load.duplicate-target", "a duplicate rule points at no parameter", key=dup.megatron)
        a = reader.read(primary.hf[0])
        b = reader.read(dup.hf[0])
        if a.shape != b.shape or not torch.equal(a, b):
            raise error("load.duplicate-differs", f"{dup.hf[0]} should be a copy of {primary.hf[0]} but differs",
                        key=dup.hf[0], hint="the checkpoint stores two different tensors where the model "
                        "shares one; mapgen will not pick one silently")


# ---------------------------------------------------------------------------------------------------------
# Megatron -> HF
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Piece:
    name: str
    index: int
    count: int
    shape: tuple[int, ...]
    dtype: str


def _pieces(model: torch.nn.Module, binding: Binding, coords: Coords) -> tuple[dict[tuple[str, int], torch.Tensor],
                                                                                list[_Piece]]:
    params = _local_params(model)
    names = _global_names(model)
    local: dict[tuple[str, int], torch.Tensor] = {}
    offered = []
    for name, tensor in params.items():
        glob = names.get(name, name)
        inst = binding.by_megatron.get(glob)
        if inst is None:
            raise error("export.unmapped", "no rule maps this Megatron parameter back to HF", key=glob,
                        hint="the bridge does not match this model; re-run `mapgen emit`")
        shard = coords.shard(inst.rule)
        local[(glob, shard.rank)] = tensor.detach()
        offered.append(_Piece(glob, shard.rank, shard.size, tuple(tensor.shape), str(tensor.dtype)))
    return local, offered


def _owners(all_offered: list[list[_Piece]]) -> dict[tuple[str, int], tuple[int, _Piece]]:
    owners: dict[tuple[str, int], tuple[int, _Piece]] = {}
    for rank, pieces in enumerate(all_offered):
        for piece in pieces:
            owners.setdefault((piece.name, piece.index), (rank, piece))
    return owners


_DTYPES = {str(t): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def iter_hf_tensors(models: list[torch.nn.Module] | torch.nn.Module, binding: Binding, *,
                    order: Callable[[Instance], Any] | None = None,
                    dtype_for: Callable[[str, torch.Tensor], torch.dtype] | None = None,
                    coords: Coords | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for the whole model in bounded memory.

    Every rank must call this and exhaust the iterator (non-zero ranks yield nothing but send their
    pieces). ``order`` sorts instances (default: rule order, then layer, then expert); ``dtype_for`` picks
    the HF dtype of each output (default: the Megatron dtype).
    """
    coords = coords or Coords.current()
    model_list = models if isinstance(models, list) else [models]
    local: dict[tuple[str, int], torch.Tensor] = {}
    offered: list[_Piece] = []
    for m in model_list:
        loc, off = _pieces(m, binding, coords)
        local.update(loc)
        offered += off
    distributed = coords.world > 1
    if distributed:
        gathered: list[Any] = [None] * coords.world
        dist.all_gather_object(gathered, offered)
        all_offered: list[list[_Piece]] = gathered
    else:
        all_offered = [offered]
    owners = _owners(all_offered)
    held = {p.name for pieces in all_offered for p in pieces}
    missing = sorted(set(binding.by_megatron) - held)
    if missing:
        raise MapgenError([Diagnostic("error", "export.missing", "no rank holds this Megatron parameter", key=n)
                           for n in missing])

    instances = list(binding.instances)
    rule_pos = {id(r): k for k, r in enumerate(binding.rules)}
    instances.sort(key=order or (lambda i: (rule_pos[id(i.rule)], i.layer or 0, i.expert or 0)))

    packed: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    expected_count = _packed_counts(binding)
    shared_seen: dict[str, torch.Tensor] = {}
    for inst in instances:
        name = inst.megatron
        count = owners[(name, 0)][1].count
        shards: list[torch.Tensor] = []
        for index in range(count):
            owner, piece = owners[(name, index)]
            if owner == coords.rank:
                tensor = local[(name, index)]
                if coords.rank == 0:
                    shards.append(tensor)
                # non-zero owners send below
            if not distributed:
                continue
            if coords.rank == 0 and owner != 0:
                buf = torch.empty(piece.shape, dtype=_DTYPES[piece.dtype])
                dist.recv(buf, src=owner)
                shards.append(buf)
            elif coords.rank == owner and owner != 0:
                dist.send(local[(name, index)].contiguous(), dst=0)
        if coords.rank != 0:
            continue
        full = ops.gather(inst.rule, binding.spec, shards) if count > 1 else shards[0]
        for frag in ops.save(inst.rule, inst.hf, binding.spec, full, expert=inst.expert):
            tensor = frag.tensor
            if frag.index is not None:
                slot = packed[frag.key]
                slot[frag.index] = tensor
                if len(slot) == expected_count[frag.key]:
                    stacked = torch.stack([slot[e] for e in range(len(slot))])
                    del packed[frag.key]
                    yield frag.key, _cast(frag.key, stacked, dtype_for)
                continue
            if inst.rule.option("shared"):
                prev = shared_seen.get(frag.key)
                if prev is not None:
                    if not torch.equal(prev, tensor):
                        raise error("export.shared-diverged",
                                    f"{frag.key} is one HF tensor for every MTP depth, but the Megatron copies "
                                    "differ between depths", key=inst.megatron,
                                    hint="the HF format cannot represent per-depth values here; tie them before "
                                    "exporting")
                    continue
                shared_seen[frag.key] = tensor
            yield frag.key, _cast(frag.key, tensor, dtype_for)
    if coords.rank == 0 and packed:
        raise MapgenError([Diagnostic("error", "export.incomplete-packed", f"only {len(v)} expert slots filled",
                                      key=k) for k, v in packed.items()])


def _packed_counts(binding: Binding) -> dict[str, int]:
    counts: dict[str, set[int]] = defaultdict(set)
    for inst in binding.instances:
        if inst.rule.experts and inst.rule.option("layout") == "packed" and inst.expert is not None:
            for key in inst.hf:
                counts[key].add(inst.expert)
    return {k: len(v) for k, v in counts.items()}


def _cast(key: str, tensor: torch.Tensor, dtype_for: Callable[[str, torch.Tensor], torch.dtype] | None) -> torch.Tensor:
    if dtype_for is None:
        return tensor
    return tensor.to(dtype_for(key, tensor))


def shard_order(weight_map: Mapping[str, str]) -> Callable[[Instance], Any]:
    """Order instances by the output shard of their first HF key, then by key."""
    shards = list(dict.fromkeys(weight_map.values()))
    pos = {s: i for i, s in enumerate(shards)}

    def key(inst: Instance) -> Any:
        first = min(inst.hf, key=lambda k: (pos.get(weight_map.get(k, ""), len(pos)), k))
        return (pos.get(weight_map.get(first, ""), len(pos)), first, inst.expert or 0)

    return key
