"""``copy``: one HF tensor is one Megatron parameter; ``duplicate``: an HF tensor stored twice.

Layouts (TP rank ``r`` of ``t``)
--------------------------------
``column``/``row``   HF rows/columns chunk r (ColumnParallelLinear / RowParallelLinear
                     ``sharded_state_dict``: axis 0 / axis 1, tensor_parallel/layers.py).
``vocab``            rows ``[r*P/t, (r+1)*P/t)`` of HF padded with zero rows to ``P = padded_vocab(V, t)``
                     (VocabParallelEmbedding, VocabUtility); a rank holding padding only reads nothing.
``replicated``       the whole tensor on every rank.
``expert_column``/``expert_row``  as column/row, per expert over expert-TP.

``duplicate`` has the layouts of ``copy``; the loader compares it with the primary tensor on import and
the exporter re-emits it.

``leading_unit`` (replicated only): the HF tensor has one more leading axis of size 1 than the parameter
(ERNIE-4.5-MoE's ``moe_statics.e_score_correction_bias [1, E]``, one expert group, is megatron-core's
``router.expert_bias [E]``): load drops it, save puts it back. A reshape: export is bitwise.

``roll`` (replicated only) rotates the rows: Megatron row ``i`` is HF row ``(i + roll) mod n`` (OPT's learned
positions look up row ``position + 2``: the table's first rows precede position 0). A permutation: nothing is
dropped, export rotates back bitwise.

Options
-------
``transform`` "none" | "zero_centered" (Megatron ``w = hf - 1`` for ``layernorm_zero_centered_gamma``;
computed in fp32 and cast back, so in bf16/fp16 it is *not* bitwise: HF -> Megatron -> HF is exact only
while ``hf`` is within [0.5, 2] (Sterbenz), and Megatron -> HF rounds ``w + 1`` to the storage precision),
``dtype`` "native" (default: the tensor keeps the dtype it was read / handed in with, the caller casts into
the parameter or the HF dtype) | "fp32" (load and save in fp32, e.g. the router's expert bias),
``divisible_by`` (vocab, default 128), ``shared`` (engine-level, below), ``layout``/``orientation``
(expert rules, :class:`~mapgen.ops._base.ExpertSource`: e.g. gpt-oss ``down_proj_bias [E, H]``).

Adapters (the generic derivation in :class:`~mapgen.ops._base.Op`): B and A are copied; a column-parallel
base splits B's rows and A's rank, a row-parallel base A's columns and B's rows (Megatron-Bridge's
``ParallelLinearAdapter``); ``vocab`` (padded embeddings / output layer) and ``duplicate`` take none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mapgen.ops._base import Ctx, ExpertSource, Fragment, Op, Reader, Shard, Span, padded_vocab


@dataclass(frozen=True)
class CopyOptions(ExpertSource):
    transform: Literal["none", "zero_centered"] = "none"
    dtype: Literal["native", "fp32"] = "native"
    divisible_by: int = 128
    # Engine-level: one HF tensor feeds this parameter at every MTP depth; the exporter emits it once and
    # checks the depths agree. The op itself ignores it.
    shared: bool = False
    # Rows rotated (replicated only; None: not rotated): Megatron row i is HF row (i + roll) mod n.
    roll: int | None = None
    # HF [1, *shape] <-> Megatron [*shape] (replicated only)
    leading_unit: bool = False


def _transform_in(options: CopyOptions, x: torch.Tensor) -> torch.Tensor:
    out_dtype = torch.float32 if options.dtype == "fp32" else x.dtype
    if options.transform == "zero_centered":
        return (x.float() - 1.0).to(out_dtype)
    return x.to(out_dtype)


def _transform_out(options: CopyOptions, x: torch.Tensor) -> torch.Tensor:
    out_dtype = torch.float32 if options.dtype == "fp32" else x.dtype
    if options.transform == "zero_centered":
        return (x.float() + 1.0).to(out_dtype)
    return x.to(out_dtype)


def _replicated(ctx: Ctx[CopyOptions], key: str, x: torch.Tensor) -> torch.Tensor:
    """The whole tensor, its rows rotated (``roll``) or its leading unit axis dropped (``leading_unit``)."""
    if ctx.options.roll:
        x = torch.roll(x, -ctx.options.roll, 0)
    if ctx.options.leading_unit:
        if not x.dim() or x.shape[0] != 1:
            raise ctx.fail(f"leading_unit needs a leading axis of 1, {key} has shape {tuple(x.shape)}")
        x = x.reshape(x.shape[1:])
    return x


class Copy(Op[CopyOptions]):
    name = "copy"
    options_type = CopyOptions
    shardings = frozenset({"replicated", "column", "row", "vocab", "expert_column", "expert_row"})

    def load(self, ctx: Ctx[CopyOptions], shard: Shard, reader: Reader) -> torch.Tensor:
        src = ctx.source(reader, 0)
        shape = src.shape
        sharding = ctx.rule.sharding
        if (ctx.options.roll or ctx.options.leading_unit) and sharding != "replicated":
            raise ctx.fail(f"roll/leading_unit need a replicated tensor, the rule is {sharding}")
        if sharding == "replicated":
            x = _replicated(ctx, src.key, src.whole())
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
            padded = padded_vocab(vocab, shard.size, ctx.options.divisible_by)
            start, stop = shard.bounds(padded, "padded vocab", ctx.rule)
            if start >= vocab:  # a rank holding padding only reads nothing
                x = torch.zeros((stop - start, *shape[1:]), dtype=reader.dtype(src.key))
            else:
                x = src.rows(start, min(stop, vocab))
                if x.shape[0] < stop - start:
                    x = torch.cat([x, x.new_zeros((stop - start - x.shape[0], *shape[1:]))])
        return _transform_in(ctx.options, x)

    def spans(self, ctx: Ctx[CopyOptions], shard: Shard, reader: Reader) -> list[Span] | None:
        """A plain copy: the whole tensor, or this rank's rows (column, vocab without padding); a row-parallel
        matrix only at size 1 (its column chunk is no block of the storage)."""
        options = ctx.options
        if (options.transform != "none" or options.leading_unit
                or (options.dtype == "fp32" and reader.dtype(ctx.keys[0]) != torch.float32)):
            return None
        src = ctx.source(reader, 0)
        sharding = ctx.rule.sharding
        if options.roll:  # rows [roll, n) then [0, roll): the rotated table, still two blocks of the storage
            first, second = src.rows_span(options.roll, src.shape[0]), src.rows_span(0, options.roll)
            return None if first is None or second is None else [first, second]
        if sharding == "replicated" or (sharding in ("row", "expert_row") and shard.size == 1):
            span = src.whole_span()
        elif sharding in ("column", "expert_column"):
            span = src.rows_span(*shard.bounds(src.shape[0], f"dim 0 of {src.key}", ctx.rule))
        elif sharding == "vocab" and src.shape[0] == ctx.spec.vocab_size:
            start, stop = shard.bounds(padded_vocab(src.shape[0], shard.size, ctx.options.divisible_by), "padded vocab",
                                       ctx.rule)
            span = src.rows_span(start, stop) if stop <= src.shape[0] else None
        else:
            span = None
        return None if span is None else [span]

    def save(self, ctx: Ctx[CopyOptions], full: torch.Tensor) -> list[Fragment]:
        if ctx.rule.sharding == "vocab":
            full = full[: ctx.spec.vocab_size]
        if ctx.options.roll:
            full = torch.roll(full, ctx.options.roll, 0)
        if ctx.options.leading_unit:
            full = full.unsqueeze(0)
        return [ctx.emit(0, _transform_out(ctx.options, full))]


class Duplicate(Copy):
    """An HF tensor stored twice (e.g. GLM/DeepSeek MTP embedding and head copies): consumed on import,
    where the loader checks it equals the primary tensor, and re-emitted on export."""

    name = "duplicate"
    adapters = False
