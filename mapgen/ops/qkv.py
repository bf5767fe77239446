"""``qkv``: HF ``q_proj``, ``k_proj``, ``v_proj`` (weights or biases) <-> Megatron ``linear_qkv``.

Layout: per query group ``[q heads; (gate heads); k; v]``, whole groups per TP rank
(transformer/attention.py ``SelfAttention.get_query_key_value_tensors``), so the rank tensors are a plain
concatenation of the full tensor.

Options
-------
``part`` "weight" | "bias"; ``output_gate`` bool (Qwen3.5 attention output gate: HF ``q_proj`` rows per
head ``[q_h; gate_h]``, Megatron per group ``[q; gate]``); ``layout`` — how HF stores q/k/v, declared by the
attention family per spelling, never guessed from shapes:

* ``separate`` (default): three keys ``q_proj``, ``k_proj``, ``v_proj``;
* ``blocks``: one key, rows ``[q (all heads); k (all groups); v (all groups)]`` (Phi-3 ``qkv_proj``,
  Baichuan ``W_pack``; transformers' ``Phi3Attention`` splits ``qkv[..., :q_pos]``, ``[q_pos:q_pos+kv]``, ...);
* ``per_group``: one key, rows per KV group ``[q_g (heads/groups heads); k_g; v_g]`` — Megatron's own order
  (InternLM2 ``wqkv``; GPT-NeoX ``query_key_value`` per head ``[q_h; k_h; v_h]``, i.e. groups of one head).

``orientation`` "out_in" | "in_out" (:class:`~mapgen.ops._base.Stored`): GPT-2's ``Conv1D`` ``c_attn`` stores
the fused weight ``[hidden, 3 * hidden]``; the layout is read on the transposed view.

Adapters: B's rows are interleaved per query group exactly as W's (q_proj/k_proj/v_proj's B matrices
become one ``linear_out``; the output gate's rows included); A is shared by the three on export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mapgen.ops._base import Ctx, Fragment, HFTensor, Op, Reader, Shard, Span, Stored


@dataclass(frozen=True)
class QkvOptions(Stored):
    part: Literal["weight", "bias"] = "weight"
    output_gate: bool = False
    layout: Literal["separate", "blocks", "per_group"] = "separate"


def _dims(ctx: Ctx[QkvOptions]) -> tuple[int, int, int, int]:
    """(query groups, heads per group, head dim, q_proj rows per head: 1 or 2 with the output gate)."""
    spec = ctx.spec
    heads, groups = spec.num_attention_heads, spec.num_query_groups
    if groups < 1 or heads % groups:
        raise ctx.fail(f"num_attention_heads ({heads}) is not a multiple of num_query_groups ({groups})")
    return groups, heads // groups, spec.kv_channels, 2 if ctx.options.output_gate else 1


def _check_tp(ctx: Ctx[QkvOptions], tp: int) -> None:
    groups = _dims(ctx)[0]
    if groups % tp:
        raise ctx.fail(
            f"num_query_groups ({groups}) is not divisible by the TP size {tp}: "
            "qkv_groups sharding needs whole query groups per rank"
        )


class Qkv(Op[QkvOptions]):
    name = "qkv"
    options_type = QkvOptions
    shardings = frozenset({"qkv_groups"})

    def key_count(self, ctx: Ctx[QkvOptions]) -> int:
        return 3 if ctx.options.layout == "separate" else 1

    def check(self, ctx: Ctx[QkvOptions]) -> None:
        if ctx.options.layout != "separate" and ctx.options.output_gate:
            raise ctx.fail("the output gate is only known stored in a separate q_proj")

    def load(self, ctx: Ctx[QkvOptions], shard: Shard, reader: Reader) -> torch.Tensor:
        groups, per_group, hn, qmul = _dims(ctx)
        _check_tp(ctx, shard.size)
        if ctx.options.layout != "separate":
            return self._load_fused(ctx, shard, reader)
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

    def spans(self, ctx: Ctx[QkvOptions], shard: Shard, reader: Reader) -> list[Span] | None:
        """:meth:`load` is a regrouping of rows: per local group its q rows (per head ``[q_h]`` then
        ``[gate_h]`` with the output gate), then its k rows and its v rows, each a row block of the source."""
        groups, per_group, hn, qmul = _dims(ctx)
        _check_tp(ctx, shard.size)
        g0, g1 = shard.bounds(groups, "num_query_groups", ctx.rule)
        blocks: list[tuple[HFTensor, int, int]] = []
        if ctx.options.layout == "separate":
            q_src, k_src, v_src = (ctx.source(reader, i) for i in range(3))
            rest = q_src.shape[1:]
            ctx.expect(q_src, (groups * per_group * qmul * hn, *rest))
            ctx.expect(k_src, (groups * hn, *rest))
            ctx.expect(v_src, (groups * hn, *rest))
            for g in range(g0, g1):
                if qmul == 1:
                    blocks.append((q_src, g * per_group * hn, (g + 1) * per_group * hn))
                else:
                    heads = [((g * per_group + h) * qmul + j) * hn for j in range(qmul) for h in range(per_group)]
                    blocks += [(q_src, at, at + hn) for at in heads]
                blocks += [(k_src, g * hn, (g + 1) * hn), (v_src, g * hn, (g + 1) * hn)]
        else:
            src = ctx.source(reader, 0)
            ctx.expect(src, (groups * (per_group + 2) * hn, *src.shape[1:]))
            if ctx.options.layout == "per_group":
                width = (per_group + 2) * hn
                blocks.append((src, g0 * width, g1 * width))
            else:
                q_rows, kv_rows = groups * per_group * hn, groups * hn
                for g in range(g0, g1):
                    blocks += [(src, g * per_group * hn, (g + 1) * per_group * hn),
                               (src, q_rows + g * hn, q_rows + (g + 1) * hn),
                               (src, q_rows + kv_rows + g * hn, q_rows + kv_rows + (g + 1) * hn)]
        spans = [src.rows_span(a, b) for src, a, b in blocks]
        return [s for s in spans if s is not None] if all(s is not None for s in spans) else None

    def _load_fused(self, ctx: Ctx[QkvOptions], shard: Shard, reader: Reader) -> torch.Tensor:
        groups, per_group, hn, _ = _dims(ctx)
        src = ctx.source(reader, 0)
        rest = src.shape[1:]
        ctx.expect(src, (groups * (per_group + 2) * hn, *rest))
        g0, g1 = shard.bounds(groups, "num_query_groups", ctx.rule)
        if ctx.options.layout == "per_group":  # already Megatron's order: this rank's groups are one row range
            width = (per_group + 2) * hn
            return src.rows(g0 * width, g1 * width)
        q_rows, kv_rows = groups * per_group * hn, groups * hn
        local = g1 - g0
        q = src.rows(g0 * per_group * hn, g1 * per_group * hn).reshape(local, per_group * hn, *rest)
        k = src.rows(q_rows + g0 * hn, q_rows + g1 * hn).reshape(local, hn, *rest)
        v = src.rows(q_rows + kv_rows + g0 * hn, q_rows + kv_rows + g1 * hn).reshape(local, hn, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def save(self, ctx: Ctx[QkvOptions], full: torch.Tensor) -> list[Fragment]:
        groups, per_group, hn, qmul = _dims(ctx)
        rest = full.shape[1:]
        rows = groups * (per_group * qmul + 2) * hn
        if full.shape[0] != rows:
            raise ctx.fail(f"linear_qkv has {full.shape[0]} rows, the spec implies {rows}")
        if ctx.options.layout == "per_group":
            return [ctx.emit(0, full)]
        grouped = full.reshape(groups, (per_group * qmul + 2) * hn, *rest)
        q, k, v = torch.split(grouped, [per_group * qmul * hn, hn, hn], dim=1)
        q = q.reshape(groups, qmul, per_group, hn, *rest).transpose(1, 2).reshape(-1, *rest)
        k, v = k.reshape(-1, *rest), v.reshape(-1, *rest)
        if ctx.options.layout == "blocks":
            return [ctx.emit(0, torch.cat([q, k, v]))]
        return [ctx.emit(0, q), ctx.emit(1, k), ctx.emit(2, v)]

    def canonical_names(self, ctx: Ctx[QkvOptions]) -> tuple[str, ...] | None:
        # canonical LoRA interleaves plain q heads per group (LoRALinearSplitQKV._interleave_qkv): no output gate
        if ctx.options.layout != "separate" or ctx.options.output_gate:
            return None
        return ("adapter_q", "adapter_k", "adapter_v")

    def components(self, ctx: Ctx[QkvOptions], length: int, tp: int) -> list[int]:
        _check_tp(ctx, tp)  # whole groups per rank: one component
        return [length]
