"""What every op shares: coordinates, readers, fragments, the HF-tensor view, option schemas and :class:`Op`.

No ``torch.distributed``, no file I/O, no megatron-core: reading goes through a :class:`Reader`
(safetensors ``get_slice`` at run time, :class:`DictReader` in tests) and gathering across ranks is the
caller's job. An op's facts about megatron-core are cited in its docstrings and checked by
``tests/ops`` against the installed megatron-core.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, Self, TypeVar

import torch

from mapgen.contract.rules import Rule, Sharding
from mapgen.contract.spec import ModelSpec

Index = tuple[slice | int, ...]
#: A block of an HF tensor: its key and a basic index (ints, then one unit-step slice) selecting leading rows.
Span = tuple[str, Index]
Option = str | int | bool


class PrimitiveError(ValueError):
    """A declared precondition of an op does not hold (shapes, divisibility, options, keys)."""


def fail(rule: Rule, message: str) -> PrimitiveError:
    """The error for ``rule``, prefixed with its Megatron parameter, op and sharding."""
    return PrimitiveError(f"{rule.megatron} ({rule.op}/{rule.sharding}): {message}")


# -- coordinates, readers, fragments ---------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """The tensor-parallel coordinate of a rule: TP for dense rules, expert-TP (ETP) for expert rules."""

    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise PrimitiveError(f"invalid shard: rank {self.rank} of size {self.size}")

    def bounds(self, n: int, what: str, rule: Rule) -> tuple[int, int]:
        """``[start, stop)`` of this rank's equal chunk of ``n`` items, which must divide evenly."""
        if n % self.size:
            raise fail(rule, f"{what} ({n}) is not divisible by the TP size {self.size}")
        step = n // self.size
        return self.rank * step, (self.rank + 1) * step


class Reader(Protocol):
    """Lazy access to HF tensors. ``read`` takes basic indices only (ints, unit-step slices)."""

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def read(self, key: str, index: Index = ()) -> torch.Tensor: ...


class DictReader:
    """In-memory :class:`Reader` that records how many elements each key had read (``elements_read``).

    It rejects what safetensors' ``get_slice`` cannot do (steps, tensors, Ellipsis), so that ops tested
    against it also run against safetensors.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)
        self.elements_read: defaultdict[str, int] = defaultdict(int)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def read(self, key: str, index: Index = ()) -> torch.Tensor:
        tensor = self.tensors[key]
        if len(index) > tensor.dim():
            raise IndexError(f"{key}: {len(index)} indices for a {tensor.dim()}-d tensor")
        for item in index:
            if isinstance(item, slice):
                if item.step not in (None, 1):
                    raise IndexError(f"{key}: strided slices are not supported by safetensors")
            elif not isinstance(item, int):
                raise IndexError(f"{key}: only ints and slices are supported, got {item!r}")
        out = tensor[index].clone()
        self.elements_read[key] += out.numel()
        return out

    @property
    def total_read(self) -> int:
        """Elements read over all keys since the last :meth:`reset`."""
        return sum(self.elements_read.values())

    @property
    def bytes_read(self) -> int:
        """Bytes read over all keys since the last :meth:`reset`."""
        return sum(n * self.tensors[k].element_size() for k, n in self.elements_read.items())

    def reset(self) -> None:
        self.elements_read.clear()


@dataclass(frozen=True)
class Fragment:
    """One HF tensor produced by ``save``. ``index`` is the expert slot of a packed 3-D HF tensor
    (the exporter stacks the fragments of one key in slot order), ``None`` for a whole tensor."""

    key: str
    tensor: torch.Tensor
    index: int | None = None


def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padded vocabulary: the next multiple of ``divisible_by * tp`` (Megatron-LM
    ``megatron/training/tokenizer/tokenizer.py::_vocab_size_with_padding``; megatron-core's
    ``VocabUtility.vocab_range_from_global_vocab_size`` then needs ``padded % tp == 0``)."""
    if vocab < 1 or tp < 1 or divisible_by < 1:
        raise PrimitiveError(f"padded_vocab needs positive sizes, got {vocab=}, {tp=}, {divisible_by=}")
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def shard_dim(rule: Rule) -> int | None:
    """The dimension TP ranks hold slices of (and the all-gather concatenates), ``None`` if replicated."""
    if rule.sharding == "replicated":
        return None
    return 1 if rule.sharding in ("row", "expert_row") else 0


# -- options ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """The base of an op's options: a frozen dataclass whose fields are the option names a rule may set.

    A field's annotation is its schema: a ``Literal`` lists the allowed values, ``bool`` (or
    ``bool | None``, where ``None`` means "decided by the op") allows ``False``/``True``, ``int`` allows
    any positive int. The field's default is the option's default.
    """

    @classmethod
    def schema(cls) -> Mapping[str, tuple[Option, ...] | None]:
        """Option name -> allowed values (``None``: any positive int)."""
        return _schema(cls)

    @classmethod
    def parse(cls, rule: Rule) -> Self:
        """The options ``rule`` sets, validated, with the defaults for the rest."""
        allowed = cls.schema()
        values: dict[str, Option] = {}
        for name, value in rule.options:
            if name not in allowed:
                raise fail(rule, f"unknown option {name!r} for op {rule.op} (known: {sorted(allowed)})")
            choices = allowed[name]
            if choices is None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise fail(rule, f"option {name} must be a positive int, got {value!r}")
                canonical: Option = value
            elif value not in choices:
                raise fail(rule, f"option {name}={value!r} is not one of {list(choices)}")
            else:  # compared with == (``fused=1`` passes as True); kept as the declared value
                canonical = choices[choices.index(value)]
            values.setdefault(name, canonical)  # Rule.option reads the first occurrence
        return cls(**values)


_SCHEMAS: dict[type[Options], Mapping[str, tuple[Option, ...] | None]] = {}


def _schema(cls: type[Options]) -> Mapping[str, tuple[Option, ...] | None]:
    if cls not in _SCHEMAS:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        _SCHEMAS[cls] = types.MappingProxyType({f.name: _choices(cls, f.name, hints[f.name]) for f in fields})
    return _SCHEMAS[cls]


def _choices(cls: type, name: str, hint: object) -> tuple[Option, ...] | None:
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if hint is bool:
        return (False, True)
    if hint is int:
        return None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return _choices(cls, name, rest[0])
    raise TypeError(f"{cls.__module__}.{cls.__qualname__}.{name}: an option is a Literal, bool or int, got {hint}")


Layout = Literal["per_expert", "packed"]
Orientation = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class Stored(Options):
    """How an HF matrix is stored: ``[out, in]`` like ``nn.Linear`` (``orientation="out_in"``) or ``[in, out]``
    (``"in_out"``: GPT-2's ``Conv1D``, gpt-oss packed experts). Ops see Megatron's ``[out, in]`` either way
    (:class:`HFTensor` flips on read, :meth:`Ctx.emit` on write); vectors are unaffected."""

    orientation: Orientation = "out_in"


@dataclass(frozen=True)
class ExpertSource(Stored):
    """Where an expert rule's HF tensor lives: per-expert keys, or slot ``packed[expert]`` of a 3-D tensor
    (``layout="packed"``) stored ``[E, out, in]`` (``orientation="out_in"``) or ``[E, in, out]`` (``"in_out"``,
    gpt-oss). ``layout`` is ignored by dense rules."""

    layout: Layout = "per_expert"


OptionsT = TypeVar("OptionsT", bound=Options)


# -- HF tensor access ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFTensor:
    """One HF tensor seen as a Megatron-oriented ``[out, in]`` matrix (or a vector): ``lead`` selects
    ``packed[expert]``; ``transposed`` flips an ``[in, out]`` (in_out) matrix on the fly."""

    reader: Reader
    key: str
    lead: tuple[int, ...]
    transposed: bool

    def _flip(self) -> bool:
        return self.transposed and len(self.reader.shape(self.key)) - len(self.lead) == 2

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.reader.shape(self.key))[len(self.lead) :]
        return shape[::-1] if self._flip() else shape

    def whole(self) -> torch.Tensor:
        out = self.reader.read(self.key, self.lead)
        return out.T if self._flip() else out

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self._flip():
            return self.reader.read(self.key, (*self.lead, slice(None), slice(start, stop))).T
        return self.reader.read(self.key, (*self.lead, slice(start, stop)))

    def rows_into(self, start: int, stop: int, out: torch.Tensor) -> None:
        """``out.copy_(rows(start, stop))``; a reader with ``read_into(key, index, out)`` (the safetensors
        reader) fills ``out`` in place, so the rows cross memory once."""
        read_into = getattr(self.reader, "read_into", None)
        if read_into is None or self._flip() or not out.is_contiguous():
            out.copy_(self.rows(start, stop))
        else:
            read_into(self.key, (*self.lead, slice(start, stop)), out)

    def rows_span(self, start: int, stop: int) -> Span | None:
        """Rows ``[start, stop)`` as one row block of the stored tensor (key, basic index), as :meth:`rows`
        reads them; ``None`` for a flipped (``in_out``) matrix, whose rows are not a block of its storage."""
        return None if self._flip() else (self.key, (*self.lead, slice(start, stop)))

    def whole_span(self) -> Span | None:
        """The whole tensor as one block (as :meth:`whole` reads it); ``None`` for a flipped matrix."""
        return None if self._flip() else (self.key, self.lead)

    def cols(self, start: int, stop: int) -> torch.Tensor:
        if self._flip():
            return self.reader.read(self.key, (*self.lead, slice(start, stop))).T
        return self.reader.read(self.key, (*self.lead, slice(None), slice(start, stop)))


@dataclass(frozen=True)
class Ctx(Generic[OptionsT]):
    """One application of an op: the rule, its concrete HF keys (declared order), the spec, the global
    expert id (expert rules) and the parsed options."""

    rule: Rule
    keys: tuple[str, ...]
    spec: ModelSpec
    expert: int | None
    options: OptionsT

    @property
    def packed(self) -> bool:
        """The HF tensor is ``packed[expert]`` of a 3-D tensor."""
        options = self.options
        return self.expert is not None and isinstance(options, ExpertSource) and options.layout == "packed"

    @property
    def in_out(self) -> bool:
        """The HF matrix is stored ``[in, out]`` (a packed expert slot, or a dense GPT-2 ``Conv1D`` weight)."""
        options = self.options
        return isinstance(options, Stored) and options.orientation == "in_out" and (self.packed or self.expert is None)

    def source(self, reader: Reader, i: int) -> HFTensor:
        """The view of HF key ``i`` (``packed[expert]`` for packed experts)."""
        key = self.keys[i]
        lead: tuple[int, ...] = ()
        if self.packed:
            assert self.expert is not None
            experts = reader.shape(key)[0]
            if not 0 <= self.expert < experts:
                raise self.fail(f"expert {self.expert} is out of range for {key} with {experts} experts")
            lead = (self.expert,)
        return HFTensor(reader, key, lead, self.in_out)

    def emit(self, i: int, tensor: torch.Tensor) -> Fragment:
        """The fragment of HF key ``i`` from a Megatron-oriented tensor (the inverse of :meth:`source`)."""
        if self.in_out and tensor.dim() == 2:
            tensor = tensor.T
        return Fragment(self.keys[i], tensor.contiguous(), self.expert if self.packed else None)

    def fail(self, message: str) -> PrimitiveError:
        return fail(self.rule, message)

    def expect(self, src: HFTensor, shape: tuple[int, ...]) -> None:
        if src.shape != shape:
            orient = " (in Megatron [out, in] orientation)" if src.transposed else ""
            raise self.fail(f"{src.key} has shape {src.shape}{orient}, the spec implies {shape}")

    def split(self, full: torch.Tensor, parts: list[int], dim: int = 0) -> tuple[torch.Tensor, ...]:
        """``full`` split into ``parts`` along ``dim``, whose sizes must add up."""
        if full.shape[dim] != sum(parts):
            raise self.fail(f"tensor has {full.shape[dim]} entries on dim {dim}, the spec implies {sum(parts)}")
        return tuple(torch.split(full, parts, dim=dim))


# -- the op ----------------------------------------------------------------------------------------------


class Op(ABC, Generic[OptionsT]):
    """One conversion op: everything about it in one class.

    ``name`` is ``Rule.op``; ``options_type`` the frozen dataclass of its options (schema and defaults);
    ``shardings`` the ``Rule.sharding`` values it implements. :meth:`key_count` says how many HF keys a
    rule passes, :meth:`load` reads this rank's Megatron tensor and :meth:`save` is its inverse on the
    full tensor; :meth:`components` gives the component sizes along :func:`shard_dim`, from which the
    generic :meth:`split` and :meth:`gather` follow (each component is split evenly across TP and a rank
    holds ``cat(component_r for each component)``).
    """

    name: str
    options_type: type[OptionsT]
    shardings: frozenset[Sharding]
    #: Whether a LoRA adapter on this op's parameter is meaningful (a linear layer's weight).
    adapters: bool = True

    # -- declaration ------------------------------------------------------------------------------------

    def key_count(self, ctx: Ctx[OptionsT]) -> int:
        """How many HF keys a rule with these options maps (in its declared order)."""
        return 1

    def check(self, ctx: Ctx[OptionsT]) -> None:
        """Preconditions across options (after each option was validated on its own)."""
        options = ctx.options
        if isinstance(options, ExpertSource) and options.orientation == "in_out" and ctx.expert is not None \
                and not ctx.packed:
            raise ctx.fail("orientation='in_out' applies only to layout='packed' expert tensors (and dense Conv1D "
                           "weights)")

    @abstractmethod
    def load(self, ctx: Ctx[OptionsT], shard: Shard, reader: Reader) -> torch.Tensor:
        """This rank's local Megatron tensor, reading only the slices ``shard`` owns."""

    @abstractmethod
    def save(self, ctx: Ctx[OptionsT], full: torch.Tensor) -> list[Fragment]:
        """The HF tensors (``ctx.keys`` order) of the full, TP=1-layout Megatron tensor."""

    def spans(self, ctx: Ctx[OptionsT], shard: Shard, reader: Reader) -> list[Span] | None:
        """This rank's tensor as the dim-0 concatenation of blocks of HF tensors, when :meth:`load` copies
        them and does nothing else (no arithmetic, no cast, no transpose, no padding): a caller may then move
        the stored bytes without reading them (the streaming convert copies them file to file in the
        kernel). ``None`` (the default): :meth:`load` must run. The caller checks that the blocks' dtype and
        total shape are the parameter's."""
        return None

    def components(self, ctx: Ctx[OptionsT], length: int, tp: int) -> list[int]:
        """Sizes of the components of the full tensor (``length`` along :func:`shard_dim`) at TP ``tp``."""
        return [length]

    # -- binding a rule ---------------------------------------------------------------------------------

    def bind(self, rule: Rule, spec: ModelSpec, keys: Sequence[str] = (), expert: int | None = None) -> Ctx[OptionsT]:
        """The context of ``rule``: its sharding is one of :attr:`shardings` and its options parse."""
        if rule.sharding not in self.shardings:
            raise fail(rule, f"op {rule.op} supports shardings {sorted(self.shardings)}")
        return Ctx(rule, tuple(keys), spec, expert, self.options_type.parse(rule))

    def context(self, rule: Rule, keys: Sequence[str], spec: ModelSpec, expert: int | None) -> Ctx[OptionsT]:
        """:meth:`bind`, then the expert id, the cross-option preconditions and the number of keys."""
        ctx = self.bind(rule, spec, keys, expert)
        if rule.experts != (expert is not None):
            raise fail(rule, "an expert id is required exactly for expert rules (rule.experts)")
        if expert is not None and expert < 0:
            raise fail(rule, f"negative expert id {expert}")
        self.check(ctx)
        count = self.key_count(ctx)
        if len(ctx.keys) != count:
            raise fail(rule, f"expected {count} HF key(s) for these options, got {list(keys)}")
        return ctx

    # -- LoRA adapters: derived from load/save ----------------------------------------------------------
    #
    # A LoRA pair on a base weight ``W [out, in]`` is ``A [r, in]`` and ``B [out, r]`` with ``dW = s * B @ A``.
    # Every op moves W's rows and columns by a fixed permutation/split that does not depend on the values, so
    # ``op(W + s * B @ A) == op(W) + s * rows(B) @ cols(A)``: B's rows move exactly as W's rows (``load`` and
    # ``save`` applied to B, whose trailing dimension is the rank instead of ``in``) and A's columns exactly as
    # W's columns (the identity unless the op reorders inputs: ``mtp_eh_proj``). ``tests/ops/test_adapters.py``
    # proves both identities for every op, and the TP split of the adapter below.

    def adapter_rows(self, ctx: Ctx[OptionsT], hf: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full (TP=1 layout) Megatron ``linear_out`` from the HF ``lora_B`` matrices in ``ctx.keys``
        order: ``load`` at TP=1 applied to B, which the op reads like W (rows move, the rank dim rides along)."""
        return self.load(ctx, Shard(0, 1), DictReader(dict(zip(ctx.keys, hf, strict=True))))

    def adapter_rows_back(self, ctx: Ctx[OptionsT], full: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of :meth:`adapter_rows`: one HF ``lora_B`` per key (``save`` applied to B)."""
        return [f.tensor for f in self.save(ctx, full)]

    def adapter_cols(self, ctx: Ctx[OptionsT], a: torch.Tensor) -> torch.Tensor:
        """The Megatron ``linear_in`` from an HF ``lora_A``: A's columns move as W's columns (identity here)."""
        return a

    def adapter_cols_back(self, ctx: Ctx[OptionsT], a: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`adapter_cols`."""
        return a

    def canonical_names(self, ctx: Ctx[OptionsT]) -> tuple[str, ...] | None:
        """Megatron-Bridge's canonical LoRA names of this rule's HF components (``peft/canonical_lora.py``:
        separate ``adapter_q/k/v`` on ``linear_qkv``, ``adapter_gate/up`` on ``linear_fc1``), in key order; ``None``
        where canonical LoRA has no per-component form."""
        return None

    def adapter_split(self, ctx: Ctx[OptionsT], linear_in: torch.Tensor, linear_out: torch.Tensor,
                      shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(linear_in, linear_out)`` in Megatron-Bridge's ``ParallelLinearAdapter`` layout.

        Column-parallel bases (input not parallel): ``linear_in`` is a ``ColumnParallelLinear(in, dim,
        gather_output=True)`` -- its rows (the rank dim) chunked across TP -- and ``linear_out`` a
        ``ColumnParallelLinear(dim, out)`` whose local rows are the base's local rows (``split`` of the base
        rule: whole query groups, ``[gate_r; up_r]``, GDN heads). Row-parallel bases: ``linear_in`` is a
        ``RowParallelLinear(in, dim)`` -- columns split like W's columns -- and ``linear_out`` a
        ``ColumnParallelLinear(dim, out, gather_output=True)``: plain row chunks. Replicated: both whole.
        """
        dim = shard_dim(ctx.rule)
        if dim is None:
            return linear_in, linear_out
        if dim == 0:
            return _chunk(ctx, linear_in, shard, 0, "the adapter rank"), self.split(ctx, linear_out, shard)
        return self.split(ctx, linear_in, shard), _chunk(ctx, linear_out, shard, 0, "linear_out rows")

    def adapter_gather(self, ctx: Ctx[OptionsT], ins: Sequence[torch.Tensor],
                       outs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The full ``(linear_in, linear_out)`` from the per-rank pieces (rank order): :meth:`adapter_split`'s
        inverse."""
        dim = shard_dim(ctx.rule)
        if dim is None:
            return ins[0], outs[0]
        if dim == 0:
            return torch.cat(list(ins), dim=0), self.gather(ctx, outs)
        return self.gather(ctx, ins), torch.cat(list(outs), dim=0)

    # -- TP split / gather ------------------------------------------------------------------------------

    def _full_parts(self, ctx: Ctx[OptionsT], length: int, tp: int) -> list[int]:
        parts = self.components(ctx, length, tp)
        if sum(parts) != length or any(p % tp for p in parts):
            raise ctx.fail(f"a full length of {length} does not split into components {parts} over TP={tp}")
        return parts

    def gather(self, ctx: Ctx[OptionsT], shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full Megatron tensor from the per-rank tensors (rank order)."""
        dim = shard_dim(ctx.rule)
        if dim is None:
            return shards[0]
        tp = len(shards)
        parts = [p // tp for p in self._full_parts(ctx, shards[0].shape[dim] * tp, tp)]
        pieces = [ctx.split(s, parts, dim) for s in shards]
        return torch.cat([piece[i] for i in range(len(parts)) for piece in pieces], dim=dim)

    def split(self, ctx: Ctx[OptionsT], full: torch.Tensor, shard: Shard) -> torch.Tensor:
        """This rank's slice of the full Megatron tensor (the inverse of :meth:`gather`)."""
        dim = shard_dim(ctx.rule)
        if dim is None:
            return full
        parts = ctx.split(full, self._full_parts(ctx, full.shape[dim], shard.size), dim)
        return torch.cat([p.chunk(shard.size, dim=dim)[shard.rank] for p in parts], dim=dim).contiguous()


def _chunk(ctx: Ctx[Any], x: torch.Tensor, shard: Shard, dim: int, what: str) -> torch.Tensor:
    start, stop = shard.bounds(x.shape[dim], what, ctx.rule)
    return x.narrow(dim, start, stop - start).contiguous()
