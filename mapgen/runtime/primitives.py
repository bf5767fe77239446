"""Conversion primitives: pure tensor code that turns HF tensors into one rank's Megatron tensor and back.

Each :data:`~mapgen.contract.rules.Op` is implemented here in both directions, with the sharding the rule
*declares* (never guessed from shapes). No ``torch.distributed``, no file I/O: reading goes through a
:class:`Reader` (safetensors ``get_slice`` at run time, :class:`DictReader` in tests) and gathering across
ranks is the caller's job.

Public API
----------
``load(rule, keys, spec, shard, reader, expert=None) -> Tensor``
    This rank's local Megatron tensor. Reads only what ``shard`` owns (rows for column-parallel, columns
    for row-parallel, whole query groups / key heads, ``packed[expert]`` for packed experts).
``save(rule, keys, spec, full, expert=None) -> list[Fragment]``
    The *full* Megatron tensor back to HF tensors. ``full`` is the parameter as a TP=1 model holds it
    (which is also the global tensor megatron-core's ``sharded_state_dict`` declares); :func:`gather`
    builds it from the per-rank tensors.
``shard_dim(rule) -> int | None``, ``gather(rule, spec, shards) -> Tensor``, ``split(rule, spec, full,
shard) -> Tensor``
    The dimension ranks are concatenated along (``None``: replicated), rank tensors -> full tensor, and
    its inverse. ``split(full, shard) == load(..., shard)`` and ``gather([load(r) for r]) == load(TP=1)``.
``padded_vocab(vocab, tp, divisible_by=128) -> int``
    Megatron's padded vocabulary size.

``keys`` are the concrete HF keys in the rule's declared order; ``shard`` is the TP coordinate for dense
rules and the expert-TP (ETP) coordinate for expert rules; ``expert`` is the *global* expert id, required
exactly when ``rule.experts``. Violated preconditions raise :class:`PrimitiveError` (a ``ValueError``)
naming the Megatron parameter.

Layouts (TP rank ``r`` of ``t``; ``x_r`` is the r-th of ``t`` equal chunks of ``x`` along dim 0)
------------------------------------------------------------------------------------------------
========================  ==========================================================================
``copy`` column/row       HF rows/columns chunk r (ColumnParallelLinear / RowParallelLinear
                          ``sharded_state_dict``: axis 0 / axis 1, tensor_parallel/layers.py).
``copy`` vocab            rows ``[r*P/t, (r+1)*P/t)`` of HF padded with zero rows to
                          ``P = padded_vocab(V, t)`` (VocabParallelEmbedding, VocabUtility).
``qkv``                   per query group ``[q heads; (gate heads); k; v]``, whole groups per rank
                          (transformer/attention.py ``SelfAttention.get_query_key_value_tensors``).
``gated_fc1``/``expert_fc1``  ``[gate_r; up_r]`` (transformer/mlp.py ``apply_swiglu_sharded_factory``
                          and the ``glu`` ``torch.chunk(x, 2, -1)`` in ``MLP``/moe/experts.py).
``expert_fc2``            columns chunk r of ``down`` (RowParallel, ``expert_row``).
``gdn_in_proj``           ``[q_r; k_r; v_r; z_r; b_r; a_r]`` (ssm/gated_delta_net.py ``forward`` split and
                          ``sharded_state_dict`` ``_split_tensor_factory``).
``gdn_conv1d``            ``[q_r; k_r; v_r]`` channels (same file, conv1d split in ``sharded_state_dict``).
``mtp_eh_proj``           rows chunk r of ``eh_proj [H, 2H]`` whose input is ``cat(embedding, hidden)``
                          (transformer/multi_token_prediction.py ``_concat_embeddings``).
``duplicate``             as ``copy``; the loader compares it with the primary tensor.
========================  ==========================================================================

Options (``rule.options``)
--------------------------
``copy``/``duplicate``: ``transform`` "none" | "zero_centered" (Megatron ``w = hf - 1`` for
``layernorm_zero_centered_gamma``; computed in fp32 and cast back, so in bf16/fp16 it is *not* bitwise:
HF -> Megatron -> HF is exact only while ``hf`` is within [0.5, 2] (Sterbenz), and Megatron -> HF rounds
``w + 1`` to the storage precision), ``dtype`` "native" (default: the tensor keeps the dtype it was read / handed in
with, the caller casts into the parameter or the HF dtype) | "fp32" (load and save in fp32, e.g. the
router's expert bias), ``divisible_by`` (vocab, default 128),
``layout``/``orientation`` (expert rules, below).
``qkv``: ``part`` "weight" | "bias", ``output_gate`` bool (HF q_proj rows per head ``[q_h; gate_h]``).
``gated_fc1``: ``fused`` bool (one ``gate_up`` key, gate first), ``part``, ``interleave``.
``expert_fc1``/``expert_fc2``: ``layout`` "per_expert" | "packed" (``packed[expert]``), ``orientation``
"out_in" (``[E, out, in]`` like nn.Linear) | "in_out" (``[E, in, out]``), ``fused`` (default: packed),
``interleave`` bool (gpt-oss: fused rows alternate gate, up), ``part`` "weight" | "bias".
``gdn_in_proj``: ``variant`` "qkv_z_b_a" (Qwen3.5: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a) |
"qkvz_ba" (Qwen3-Next: in_proj_qkvz, in_proj_ba grouped per key head).
``gdn_conv1d``: ``part``. ``mtp_eh_proj``: ``order`` "embedding_hidden" | "hidden_embedding" (MiMo).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from mapgen.contract.rules import Rule
from mapgen.contract.spec import ModelSpec

Index = tuple[slice | int, ...]
Option = str | int | bool


class PrimitiveError(ValueError):
    """A declared precondition of a primitive does not hold (shapes, divisibility, options, keys)."""


def _fail(rule: Rule, message: str) -> PrimitiveError:
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
            raise _fail(rule, f"{what} ({n}) is not divisible by the TP size {self.size}")
        step = n // self.size
        return self.rank * step, (self.rank + 1) * step


class Reader(Protocol):
    """Lazy access to HF tensors. ``read`` takes basic indices only (ints, unit-step slices)."""

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def read(self, key: str, index: Index = ()) -> torch.Tensor: ...


class DictReader:
    """In-memory :class:`Reader` that records how many elements each key had read (``elements_read``).

    It rejects what safetensors' ``get_slice`` cannot do (steps, tensors, Ellipsis), so that primitives
    tested against it also run against safetensors.
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
    """One HF tensor produced by :func:`save`. ``index`` is the expert slot of a packed 3-D HF tensor
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


# -- HF tensor access ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
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

    def cols(self, start: int, stop: int) -> torch.Tensor:
        if self._flip():
            return self.reader.read(self.key, (*self.lead, slice(start, stop))).T
        return self.reader.read(self.key, (*self.lead, slice(None), slice(start, stop)))


@dataclass(frozen=True)
class _Ctx:
    rule: Rule
    keys: tuple[str, ...]
    spec: ModelSpec
    expert: int | None

    def opt(self, name: str) -> Option:
        value = self.rule.option(name, _OPTIONS[self.rule.op][name][0])
        assert value is not None
        return value

    @property
    def packed(self) -> bool:
        return self.expert is not None and self.opt("layout") == "packed"

    @property
    def in_out(self) -> bool:
        return self.packed and self.opt("orientation") == "in_out"

    def source(self, reader: Reader, i: int) -> _Source:
        key = self.keys[i]
        lead: tuple[int, ...] = ()
        if self.packed:
            assert self.expert is not None
            experts = reader.shape(key)[0]
            if not 0 <= self.expert < experts:
                raise _fail(self.rule, f"expert {self.expert} is out of range for {key} with {experts} experts")
            lead = (self.expert,)
        return _Source(reader, key, lead, self.in_out)

    def emit(self, i: int, tensor: torch.Tensor) -> Fragment:
        if self.in_out and tensor.dim() == 2:
            tensor = tensor.T
        return Fragment(self.keys[i], tensor.contiguous(), self.expert if self.packed else None)

    def fail(self, message: str) -> PrimitiveError:
        return _fail(self.rule, message)

    def expect(self, src: _Source, shape: tuple[int, ...]) -> None:
        if src.shape != shape:
            orient = " (in Megatron [out, in] orientation)" if src.transposed else ""
            raise self.fail(f"{src.key} has shape {src.shape}{orient}, the spec implies {shape}")


# -- copy / duplicate ------------------------------------------------------------------------------------


def _transform_in(ctx: _Ctx, x: torch.Tensor) -> torch.Tensor:
    out_dtype = torch.float32 if ctx.opt("dtype") == "fp32" else x.dtype
    if ctx.opt("transform") == "zero_centered":
        return (x.float() - 1.0).to(out_dtype)
    return x.to(out_dtype)


def _transform_out(ctx: _Ctx, x: torch.Tensor) -> torch.Tensor:
    out_dtype = torch.float32 if ctx.opt("dtype") == "fp32" else x.dtype
    if ctx.opt("transform") == "zero_centered":
        return (x.float() + 1.0).to(out_dtype)
    return x.to(out_dtype)


def _load_copy(ctx: _Ctx, shard: Shard, reader: Reader) -> torch.Tensor:
    src = ctx.source(reader, 0)
    shape = src.shape
    sharding = ctx.rule.sharding
    if sharding == "replicated":
        x = src.whole()
    elif sharding in ("column", "expert_column"):
        x = src.rows(*shard.bounds(shape[0], f"dim 0 of {src.key}", ctx.rule))
    elif sharding in ("row", "expert_row"):
        if len(shape) != 2:
            raise ctx.fail(f"row sharding needs a matrix, {src.key} has shape {shape}")
        x = src.cols(*shard.bounds(shape[1], f"dim 1 of {src.key}", ctx.rule))
    else:  # vocab
        vocab = ctx.spec.vocab_size
        if shape[0] != vocab:
            raise ctx.fail(f"{src.key} has {shape[0]} rows, the spec's vocab_size is {vocab}")
        padded = padded_vocab(vocab, shard.size, int(ctx.opt("divisible_by")))
        start, stop = shard.bounds(padded, "padded vocab", ctx.rule)
        if start >= vocab:  # a rank holding padding only reads nothing
            x = torch.zeros((stop - start, *shape[1:]), dtype=reader.dtype(src.key))
        else:
            x = src.rows(start, min(stop, vocab))
            if x.shape[0] < stop - start:
                x = torch.cat([x, x.new_zeros((stop - start - x.shape[0], *shape[1:]))])
    return _transform_in(ctx, x)


def _save_copy(ctx: _Ctx, full: torch.Tensor) -> list[Fragment]:
    if ctx.rule.sharding == "vocab":
        full = full[: ctx.spec.vocab_size]
    return [ctx.emit(0, _transform_out(ctx, full))]


# -- qkv -------------------------------------------------------------------------------------------------


def _qkv_dims(ctx: _Ctx) -> tuple[int, int, int, int]:
    """(query groups, heads per group, head dim, q_proj rows per head: 1 or 2 with the output gate)."""
    spec = ctx.spec
    heads, groups = spec.num_attention_heads, spec.num_query_groups
    if groups < 1 or heads % groups:
        raise ctx.fail(f"num_attention_heads ({heads}) is not a multiple of num_query_groups ({groups})")
    return groups, heads // groups, spec.kv_channels, 2 if ctx.opt("output_gate") else 1


def _check_qkv_tp(ctx: _Ctx, tp: int) -> None:
    groups = _qkv_dims(ctx)[0]
    if groups % tp:
        raise ctx.fail(
            f"num_query_groups ({groups}) is not divisible by the TP size {tp}: "
            "qkv_groups sharding needs whole query groups per rank"
        )


def _load_qkv(ctx: _Ctx, shard: Shard, reader: Reader) -> torch.Tensor:
    groups, per_group, hn, qmul = _qkv_dims(ctx)
    _check_qkv_tp(ctx, shard.size)
    q_src, k_src, v_src = (ctx.source(reader, i) for i in range(3))
    rest = q_src.shape[1:]
    ctx.expect(q_src, (groups * per_group * qmul * hn, *rest))
    ctx.expect(k_src, (groups * hn, *rest))
    ctx.expect(v_src, (groups * hn, *rest))
    g0, g1 = shard.bounds(groups, "num_query_groups", ctx.rule)
    local = g1 - g0
    q = q_src.rows(g0 * per_group * qmul * hn, g1 * per_group * qmul * hn)
    # HF q_proj with the output gate: per head [q_h; gate_h] (modeling_qwen3_5.py Qwen3_5Attention:
    # torch.chunk(q_proj(x).view(..., -1, head_dim * 2), 2, dim=-1)); Megatron per group [q; gate].
    q = q.reshape(local, per_group, qmul, hn, *rest).transpose(1, 2).reshape(local, -1, *rest)
    k = k_src.rows(g0 * hn, g1 * hn).reshape(local, hn, *rest)
    v = v_src.rows(g0 * hn, g1 * hn).reshape(local, hn, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _save_qkv(ctx: _Ctx, full: torch.Tensor) -> list[Fragment]:
    groups, per_group, hn, qmul = _qkv_dims(ctx)
    rest = full.shape[1:]
    if full.shape[0] != groups * (per_group * qmul + 2) * hn:
        raise ctx.fail(f"linear_qkv has {full.shape[0]} rows, the spec implies {groups * (per_group * qmul + 2) * hn}")
    grouped = full.reshape(groups, (per_group * qmul + 2) * hn, *rest)
    q, k, v = torch.split(grouped, [per_group * qmul * hn, hn, hn], dim=1)
    q = q.reshape(groups, qmul, per_group, hn, *rest).transpose(1, 2).reshape(-1, *rest)
    return [ctx.emit(0, q), ctx.emit(1, k.reshape(-1, *rest)), ctx.emit(2, v.reshape(-1, *rest))]


# -- gated fc1 (dense and expert) ------------------------------------------------------------------------


def _fused(ctx: _Ctx) -> bool:
    fused = ctx.rule.option("fused")
    if fused is None:
        return ctx.packed
    return bool(fused)


def _load_gated(ctx: _Ctx, shard: Shard, reader: Reader) -> torch.Tensor:
    if _fused(ctx):
        src = ctx.source(reader, 0)
        if src.shape[0] % 2:
            raise ctx.fail(f"fused {src.key} has an odd number of rows ({src.shape[0]})")
        inter = src.shape[0] // 2
        start, stop = shard.bounds(inter, "the intermediate size", ctx.rule)
        if ctx.opt("interleave"):  # gpt-oss: gate_up[..., ::2], gate_up[..., 1::2] (modeling_gpt_oss.py)
            block = src.rows(2 * start, 2 * stop)
            gate, up = block[0::2], block[1::2]
        else:
            gate, up = src.rows(start, stop), src.rows(inter + start, inter + stop)
    else:
        gate_src, up_src = ctx.source(reader, 0), ctx.source(reader, 1)
        ctx.expect(up_src, gate_src.shape)
        start, stop = shard.bounds(gate_src.shape[0], "the intermediate size", ctx.rule)
        gate, up = gate_src.rows(start, stop), up_src.rows(start, stop)
    return torch.cat([gate, up])


def _save_gated(ctx: _Ctx, full: torch.Tensor) -> list[Fragment]:
    gate, up = full.chunk(2)
    if not _fused(ctx):
        return [ctx.emit(0, gate), ctx.emit(1, up)]
    if ctx.opt("interleave"):
        return [ctx.emit(0, torch.stack([gate, up], dim=1).reshape(full.shape))]
    return [ctx.emit(0, full)]


def _load_row(ctx: _Ctx, shard: Shard, reader: Reader) -> torch.Tensor:
    src = ctx.source(reader, 0)
    if len(src.shape) != 2:
        raise ctx.fail(f"row sharding needs a matrix, {src.key} has shape {src.shape}")
    return src.cols(*shard.bounds(src.shape[1], f"dim 1 of {src.key}", ctx.rule))


def _save_whole(ctx: _Ctx, full: torch.Tensor) -> list[Fragment]:
    return [ctx.emit(0, full)]


# -- gated delta net -------------------------------------------------------------------------------------


def _gdn_dims(ctx: _Ctx) -> tuple[int, int, int, int]:
    """(key heads, value heads, key head dim, value head dim)."""
    spec = ctx.spec
    dims = (
        spec.linear_num_key_heads,
        spec.linear_num_value_heads,
        spec.linear_key_head_dim,
        spec.linear_value_head_dim,
    )
    if any(d is None or d < 1 for d in dims):
        raise ctx.fail("the spec lacks linear_num_key_heads/value_heads/key_head_dim/value_head_dim")
    nk, nv, dk, dv = (int(d) for d in dims)  # type: ignore[arg-type]
    if nv % nk:
        raise ctx.fail(f"linear_num_value_heads ({nv}) is not a multiple of linear_num_key_heads ({nk})")
    return nk, nv, dk, dv


def _check_gdn_tp(ctx: _Ctx, tp: int) -> None:
    nk = _gdn_dims(ctx)[0]
    if nk % tp:
        raise ctx.fail(
            f"linear_num_key_heads ({nk}) is not divisible by the TP size {tp}: "
            "gdn_heads sharding needs whole key heads (and their value heads) per rank"
        )


def _gdn_parts(ctx: _Ctx) -> list[int]:
    """Component sizes of the full Megatron tensor along dim 0 (in_proj: q k v z b a; conv1d: q k v)."""
    nk, nv, dk, dv = _gdn_dims(ctx)
    if ctx.rule.op == "gdn_in_proj":
        return [nk * dk, nk * dk, nv * dv, nv * dv, nv, nv]
    return [nk * dk, nk * dk, nv * dv]


def _load_gdn_in_proj(ctx: _Ctx, shard: Shard, reader: Reader) -> torch.Tensor:
    nk, nv, dk, dv = _gdn_dims(ctx)
    _check_gdn_tp(ctx, shard.size)
    ratio = nv // nk
    k0, k1 = shard.bounds(nk, "linear_num_key_heads", ctx.rule)
    v0, v1 = k0 * ratio, k1 * ratio
    if ctx.opt("variant") == "qkvz_ba":
        # Qwen3-Next (modeling_qwen3_next.py fix_query_key_value_ordering): per key head g,
        # in_proj_qkvz rows [q_g (dk); k_g (dk); v_g (ratio*dv); z_g (ratio*dv)], in_proj_ba [b_g; a_g].
        qkvz, ba = ctx.source(reader, 0), ctx.source(reader, 1)
        hidden = qkvz.shape[1:]
        width = 2 * dk + 2 * ratio * dv
        ctx.expect(qkvz, (nk * width, *hidden))
        ctx.expect(ba, (2 * nv, *hidden))
        local = k1 - k0
        q, k, v, z = torch.split(
            qkvz.rows(k0 * width, k1 * width).reshape(local, width, *hidden),
            [dk, dk, ratio * dv, ratio * dv],
            dim=1,
        )
        b, a = torch.split(ba.rows(2 * v0, 2 * v1).reshape(local, 2 * ratio, *hidden), [ratio, ratio], dim=1)
        parts = [q, k, v, z, b, a]
        return torch.cat([p.reshape(-1, *hidden) for p in parts])
    # Qwen3.5 (modeling_qwen3_5.py Qwen3_5GatedDeltaNet.forward): in_proj_qkv is contiguous [q; k; v]
    # blocks (torch.split by [key_dim, key_dim, value_dim]); z, b, a are separate projections.
    qkv, z_src, b_src, a_src = (ctx.source(reader, i) for i in range(4))
    hidden = qkv.shape[1:]
    ctx.expect(qkv, (2 * nk * dk + nv * dv, *hidden))
    ctx.expect(z_src, (nv * dv, *hidden))
    ctx.expect(b_src, (nv, *hidden))
    ctx.expect(a_src, (nv, *hidden))
    return torch.cat(
        [
            qkv.rows(k0 * dk, k1 * dk),
            qkv.rows(nk * dk + k0 * dk, nk * dk + k1 * dk),
            qkv.rows(2 * nk * dk + v0 * dv, 2 * nk * dk + v1 * dv),
            z_src.rows(v0 * dv, v1 * dv),
            b_src.rows(v0, v1),
            a_src.rows(v0, v1),
        ]
    )


def _save_gdn_in_proj(ctx: _Ctx, full: torch.Tensor) -> list[Fragment]:
    nk, nv, dk, dv = _gdn_dims(ctx)
    ratio = nv // nk
    hidden = full.shape[1:]
    q, k, v, z, b, a = _split_checked(ctx, full, _gdn_parts(ctx))
    if ctx.opt("variant") == "qkvz_ba":
        qkvz = torch.cat(
            [
                q.reshape(nk, dk, *hidden),
                k.reshape(nk, dk, *hidden),
                v.reshape(nk, ratio * dv, *hidden),
                z.reshape(nk, ratio * dv, *hidden),
            ],
            dim=1,
        )
        ba = torch.cat([b.reshape(nk, ratio, *hidden), a.reshape(nk, ratio, *hidden)], dim=1)
        return [ctx.emit(0, qkvz.reshape(-1, *hidden)), ctx.emit(1, ba.reshape(-1, *hidden))]
    return [ctx.emit(0, torch.cat([q, k, v])), ctx.emit(1, z), ctx.emit(2, b), ctx.emit(3, a)]


def _load_gdn_conv1d(ctx: _Ctx, shard: Shard, reader: Reader) -> torch.Tensor:
    nk, nv, dk, dv = _gdn_dims(ctx)
    _check_gdn_tp(ctx, shard.size)
    src = ctx.source(reader, 0)
    ctx.expect(src, (2 * nk * dk + nv * dv, *src.shape[1:]))
    k0, k1 = shard.bounds(nk, "linear_num_key_heads", ctx.rule)
    v0, v1 = shard.bounds(nv, "linear_num_value_heads", ctx.rule)
    return torch.cat(
        [
            src.rows(k0 * dk, k1 * dk),
            src.rows(nk * dk + k0 * dk, nk * dk + k1 * dk),
            src.rows(2 * nk * dk + v0 * dv, 2 * nk * dk + v1 * dv),
        ]
    )


# -- MTP eh_proj -----------------------------------------------------------------------------------------


def _swap_halves(ctx: _Ctx, x: torch.Tensor) -> torch.Tensor:
    if ctx.opt("order") == "embedding_hidden":
        return x
    first, second = x.chunk(2, dim=1)
    return torch.cat([second, first], dim=1)


def _load_eh_proj(ctx: _Ctx, shard: Shard, reader: Reader) -> torch.Tensor:
    hidden = ctx.spec.hidden_size
    src = ctx.source(reader, 0)
    ctx.expect(src, (hidden, 2 * hidden))
    return _swap_halves(ctx, src.rows(*shard.bounds(hidden, "hidden_size", ctx.rule)))


def _save_eh_proj(ctx: _Ctx, full: torch.Tensor) -> list[Fragment]:
    return [ctx.emit(0, _swap_halves(ctx, full))]


# -- registry --------------------------------------------------------------------------------------------

_EXPERT_SOURCE: dict[str, tuple[Option, ...]] = {
    "layout": ("per_expert", "packed"),
    "orientation": ("out_in", "in_out"),
}
_COPY: dict[str, tuple[Option, ...]] = {
    "transform": ("none", "zero_centered"),
    "dtype": ("native", "fp32"),
    "divisible_by": (128,),  # any positive int; the first entry is the default
    # Engine-level: one HF tensor feeds this parameter at every MTP depth; the exporter emits it once and
    # checks the depths agree. The primitive itself ignores it.
    "shared": (False, True),
    **_EXPERT_SOURCE,
}
# option -> allowed values; the first is the default. ``fused`` defaults to "packed" and is checked apart.
_OPTIONS: dict[str, dict[str, tuple[Option, ...]]] = {
    "copy": _COPY,
    "duplicate": _COPY,
    "qkv": {"part": ("weight", "bias"), "output_gate": (False, True)},
    "gated_fc1": {"part": ("weight", "bias"), "fused": (False, True), "interleave": (False, True)},
    "expert_fc1": {
        "part": ("weight", "bias"),
        "fused": (False, True),
        "interleave": (False, True),
        **_EXPERT_SOURCE,
    },
    "expert_fc2": {"part": ("weight",), **_EXPERT_SOURCE},
    "gdn_in_proj": {"variant": ("qkv_z_b_a", "qkvz_ba")},
    "gdn_conv1d": {"part": ("weight", "bias")},
    "mtp_eh_proj": {"order": ("embedding_hidden", "hidden_embedding"), "shared": (False, True)},
}

_COPY_SHARDINGS = frozenset({"replicated", "column", "row", "vocab", "expert_column", "expert_row"})
_SHARDINGS: dict[str, frozenset[str]] = {
    "copy": _COPY_SHARDINGS,
    "duplicate": _COPY_SHARDINGS,
    "qkv": frozenset({"qkv_groups"}),
    "gated_fc1": frozenset({"gated_column"}),
    "expert_fc1": frozenset({"expert_gated_column"}),
    "expert_fc2": frozenset({"expert_row"}),
    "gdn_in_proj": frozenset({"gdn_heads"}),
    "gdn_conv1d": frozenset({"gdn_heads"}),
    "mtp_eh_proj": frozenset({"column"}),
}

_Load = Callable[[_Ctx, Shard, Reader], torch.Tensor]
_Save = Callable[[_Ctx, torch.Tensor], list[Fragment]]
_IMPLS: dict[str, tuple[_Load, _Save]] = {
    "copy": (_load_copy, _save_copy),
    "duplicate": (_load_copy, _save_copy),
    "qkv": (_load_qkv, _save_qkv),
    "gated_fc1": (_load_gated, _save_gated),
    "expert_fc1": (_load_gated, _save_gated),
    "expert_fc2": (_load_row, _save_whole),
    "gdn_in_proj": (_load_gdn_in_proj, _save_gdn_in_proj),
    "gdn_conv1d": (_load_gdn_conv1d, _save_whole),
    "mtp_eh_proj": (_load_eh_proj, _save_eh_proj),
}


def _key_count(ctx: _Ctx) -> int:
    op = ctx.rule.op
    if op in ("gated_fc1", "expert_fc1"):
        return 1 if _fused(ctx) else 2
    if op == "qkv":
        return 3
    if op == "gdn_in_proj":
        return 2 if ctx.opt("variant") == "qkvz_ba" else 4
    return 1


def _check_rule(rule: Rule) -> None:
    """The op exists, supports the declared sharding, and every option is known with a valid value."""
    if rule.op not in _IMPLS:
        raise _fail(rule, f"unknown op {rule.op!r}")
    if rule.sharding not in _SHARDINGS[rule.op]:
        raise _fail(rule, f"op {rule.op} supports shardings {sorted(_SHARDINGS[rule.op])}")
    allowed = _OPTIONS[rule.op]
    for name, value in rule.options:
        if name not in allowed:
            raise _fail(rule, f"unknown option {name!r} for op {rule.op} (known: {sorted(allowed)})")
        if name == "divisible_by":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _fail(rule, f"option divisible_by must be a positive int, got {value!r}")
        elif value not in allowed[name]:
            raise _fail(rule, f"option {name}={value!r} is not one of {list(allowed[name])}")


def _context(rule: Rule, keys: Sequence[str], spec: ModelSpec, expert: int | None) -> _Ctx:
    _check_rule(rule)
    if rule.experts != (expert is not None):
        raise _fail(rule, "an expert id is required exactly for expert rules (rule.experts)")
    if expert is not None and expert < 0:
        raise _fail(rule, f"negative expert id {expert}")
    ctx = _Ctx(rule, tuple(keys), spec, expert)
    if rule.option("orientation") == "in_out" and not ctx.packed:
        raise _fail(rule, "orientation='in_out' applies only to layout='packed' expert tensors")
    if rule.option("interleave") and not _fused(ctx):
        raise _fail(rule, "interleave=True needs a fused gate_up tensor")
    if len(ctx.keys) != _key_count(ctx):
        raise _fail(rule, f"expected {_key_count(ctx)} HF key(s) for these options, got {list(keys)}")
    return ctx


# -- public entry points ---------------------------------------------------------------------------------


def load(
    rule: Rule,
    keys: Sequence[str],
    spec: ModelSpec,
    shard: Shard,
    reader: Reader,
    expert: int | None = None,
) -> torch.Tensor:
    """This rank's local Megatron tensor for ``rule``, reading only the slices ``shard`` owns."""
    ctx = _context(rule, keys, spec, expert)
    return _IMPLS[rule.op][0](ctx, shard, reader).contiguous()


def save(
    rule: Rule,
    keys: Sequence[str],
    spec: ModelSpec,
    full: torch.Tensor,
    expert: int | None = None,
) -> list[Fragment]:
    """The HF tensors of the full (gathered, TP=1-layout) Megatron tensor ``full``, in ``keys`` order."""
    ctx = _context(rule, keys, spec, expert)
    return _IMPLS[rule.op][1](ctx, full)


def shard_dim(rule: Rule) -> int | None:
    """The dimension TP ranks hold slices of (and the all-gather concatenates), ``None`` if replicated."""
    if rule.sharding == "replicated":
        return None
    return 1 if rule.sharding in ("row", "expert_row") else 0


def _full_parts(ctx: _Ctx, length: int, tp: int) -> list[int]:
    """Sizes of the components of the full tensor along :func:`shard_dim`; each is split evenly across TP
    and a rank holds ``cat(component_r for each component)``."""
    op = ctx.rule.op
    if op == "qkv":
        _check_qkv_tp(ctx, tp)
    if op in ("gated_fc1", "expert_fc1"):
        if length % 2:
            raise ctx.fail(f"a gated linear_fc1 needs an even number of rows, got {length}")
        parts = [length // 2, length // 2]
    elif op in ("gdn_in_proj", "gdn_conv1d"):
        _check_gdn_tp(ctx, tp)
        parts = _gdn_parts(ctx)
    else:
        parts = [length]
    if sum(parts) != length or any(p % tp for p in parts):
        raise ctx.fail(f"a full length of {length} does not split into components {parts} over TP={tp}")
    return parts


def _split_checked(ctx: _Ctx, full: torch.Tensor, parts: list[int], dim: int = 0) -> tuple[torch.Tensor, ...]:
    if full.shape[dim] != sum(parts):
        raise ctx.fail(f"tensor has {full.shape[dim]} entries on dim {dim}, the spec implies {sum(parts)}")
    return tuple(torch.split(full, parts, dim=dim))


def gather(rule: Rule, spec: ModelSpec, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reassemble the full Megatron tensor from the per-rank tensors (rank order) of ``rule``."""
    if not shards:
        raise _fail(rule, "gather needs at least one shard")
    _check_rule(rule)
    ctx = _Ctx(rule, (), spec, None)
    dim = shard_dim(rule)
    if dim is None:
        return shards[0]
    tp = len(shards)
    parts = [p // tp for p in _full_parts(ctx, shards[0].shape[dim] * tp, tp)]
    pieces = [_split_checked(ctx, s, parts, dim) for s in shards]
    return torch.cat([piece[i] for i in range(len(parts)) for piece in pieces], dim=dim)


def split(rule: Rule, spec: ModelSpec, full: torch.Tensor, shard: Shard) -> torch.Tensor:
    """This rank's slice of the full Megatron tensor (the inverse of :func:`gather`)."""
    _check_rule(rule)
    ctx = _Ctx(rule, (), spec, None)
    dim = shard_dim(rule)
    if dim is None:
        return full
    parts = _split_checked(ctx, full, _full_parts(ctx, full.shape[dim], shard.size), dim)
    return torch.cat([p.chunk(shard.size, dim=dim)[shard.rank] for p in parts], dim=dim).contiguous()
