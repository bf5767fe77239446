"""``gated_fc1``: HF ``gate_proj`` + ``up_proj`` (or one fused ``gate_up``) <-> Megatron ``linear_fc1``.

Layout: TP rank ``r`` holds ``[gate_r; up_r]`` (transformer/mlp.py ``apply_swiglu_sharded_factory`` and the
``glu`` ``torch.chunk(x, 2, -1)`` in ``MLP``/moe/experts.py), so the full tensor is ``[gate; up]`` and each
half is split across TP. ``expert_fc1`` (:mod:`mapgen.ops.experts`) is this op per expert.

Options
-------
``part`` "weight" | "bias"; ``fused`` bool (one ``gate_up`` key, gate first; default: fused exactly for
packed expert tensors); ``interleave`` bool (gpt-oss: fused rows alternate gate, up; needs ``fused``).

Adapters: gate's and up's B matrices stack as ``[gate; up]`` (split per TP rank into ``[gate_r; up_r]``,
Megatron-Bridge's ``apply_swiglu_sharded_factory`` on ``linear_out``); A is shared by the two on export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

from mapgen.ops._base import Ctx, Fragment, HFTensor, Op, Options, Reader, Shard, Span


@dataclass(frozen=True)
class GatedFc1Options(Options):
    part: Literal["weight", "bias"] = "weight"
    fused: bool | None = None  # None: fused exactly for packed expert tensors
    interleave: bool = False


G = TypeVar("G", bound=GatedFc1Options)


def fused(ctx: Ctx[G]) -> bool:
    """One fused ``gate_up`` HF tensor (else separate gate and up)."""
    if ctx.options.fused is None:
        return ctx.packed
    return ctx.options.fused


class Gated(Op[G]):
    """``[gate; up]`` halves, each split across TP: the dense op below and ``expert_fc1``."""

    def key_count(self, ctx: Ctx[G]) -> int:
        return 1 if fused(ctx) else 2

    def check(self, ctx: Ctx[G]) -> None:
        super().check(ctx)
        if ctx.options.interleave and not fused(ctx):
            raise ctx.fail("interleave=True needs a fused gate_up tensor")

    def _halves(self, ctx: Ctx[G], shard: Shard, reader: Reader) -> tuple[tuple[HFTensor, int, int], ...] | None:
        """This rank's gate and up rows (source, start, stop), or ``None`` for gpt-oss's interleaved rows."""
        if fused(ctx):
            src = ctx.source(reader, 0)
            if src.shape[0] % 2:
                raise ctx.fail(f"fused {src.key} has an odd number of rows ({src.shape[0]})")
            inter = src.shape[0] // 2
            start, stop = shard.bounds(inter, "the intermediate size", ctx.rule)
            if ctx.options.interleave:
                return None
            return ((src, start, stop), (src, inter + start, inter + stop))
        gate_src, up_src = ctx.source(reader, 0), ctx.source(reader, 1)
        ctx.expect(up_src, gate_src.shape)
        start, stop = shard.bounds(gate_src.shape[0], "the intermediate size", ctx.rule)
        return ((gate_src, start, stop), (up_src, start, stop))

    def spans(self, ctx: Ctx[G], shard: Shard, reader: Reader) -> list[Span] | None:
        """``[gate_r; up_r]``: two row blocks (of one fused tensor or of gate and up), not when interleaved."""
        halves = self._halves(ctx, shard, reader)
        if halves is None:
            return None
        spans = [half.rows_span(a, b) for half, a, b in halves]
        return [s for s in spans if s is not None] if all(s is not None for s in spans) else None

    def load(self, ctx: Ctx[G], shard: Shard, reader: Reader) -> torch.Tensor:
        halves = self._halves(ctx, shard, reader)
        if halves is None:  # gpt-oss: gate_up[..., ::2], gate_up[..., 1::2] (modeling_gpt_oss.py)
            src = ctx.source(reader, 0)
            start, stop = shard.bounds(src.shape[0] // 2, "the intermediate size", ctx.rule)
            block = src.rows(2 * start, 2 * stop)
            gate, up = block[0::2], block[1::2]
            return torch.cat([gate, up])
        start, stop = halves[0][1], halves[0][2]
        if not hasattr(reader, "read_into") or reader.dtype(halves[0][0].key) != reader.dtype(halves[1][0].key):
            return torch.cat([half.rows(a, b) for half, a, b in halves])
        # [gate_r; up_r]: each half is read straight into its rows of the result (no concatenation pass)
        rows = stop - start
        out = torch.empty((2 * rows, *halves[0][0].shape[1:]), dtype=reader.dtype(halves[0][0].key))
        for i, (half, a, b) in enumerate(halves):
            half.rows_into(a, b, out[i * rows:(i + 1) * rows])
        return out

    def save(self, ctx: Ctx[G], full: torch.Tensor) -> list[Fragment]:
        gate, up = full.chunk(2)
        if not fused(ctx):
            return [ctx.emit(0, gate), ctx.emit(1, up)]
        if ctx.options.interleave:
            return [ctx.emit(0, torch.stack([gate, up], dim=1).reshape(full.shape))]
        return [ctx.emit(0, full)]

    def canonical_names(self, ctx: Ctx[G]) -> tuple[str, ...] | None:
        # LoRALinearSplitFC1UpGate: cat([gate_out, up_out]) per rank
        return None if fused(ctx) else ("adapter_gate", "adapter_up")

    def components(self, ctx: Ctx[G], length: int, tp: int) -> list[int]:
        if length % 2:
            raise ctx.fail(f"a gated linear_fc1 needs an even number of rows, got {length}")
        return [length // 2, length // 2]


class GatedFc1(Gated[GatedFc1Options]):
    name = "gated_fc1"
    options_type = GatedFc1Options
    shardings = frozenset({"gated_column"})
