"""``gdn_in_proj`` and ``gdn_conv1d``: a gated delta net's fused input projection and its causal conv1d.

Both are sharded by whole key heads (and their value heads) per TP rank (``gdn_heads``).

Layouts (TP rank ``r``)
-----------------------
``gdn_in_proj``  ``[q_r; k_r; v_r; z_r; b_r; a_r]`` (ssm/gated_delta_net.py ``forward`` split and
                 ``sharded_state_dict`` ``_split_tensor_factory``).
``gdn_conv1d``   ``[q_r; k_r; v_r]`` channels (same file, conv1d split in ``sharded_state_dict``).

Options
-------
``gdn_in_proj``: ``variant`` "qkv_z_b_a" (Qwen3.5: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a) |
"qkvz_ba" (Qwen3-Next: in_proj_qkvz, in_proj_ba grouped per key head) | "blocks" (Lara-mini: one in_proj whose
rows are the six whole blocks ``[q|k|v|z|b|a]``, the four Qwen3.5 projections concatenated; transformers'
``conversion_mapping.py`` splits it with ``Split(dim=0)``). ``gdn_conv1d``: ``part``.

Adapters: ``gdn_in_proj``'s B rows move by the same head order as W (the generic derivation; the four HF
projections' B matrices become one ``linear_out``, split per TP rank by heads); ``gdn_conv1d`` is not a
linear layer and takes no adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from mapgen.ops._base import Ctx, Fragment, Op, Options, Reader, Shard


def _dims(ctx: Ctx[Any]) -> tuple[int, int, int, int]:
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


def _check_tp(ctx: Ctx[Any], tp: int) -> None:
    nk = _dims(ctx)[0]
    if nk % tp:
        raise ctx.fail(
            f"linear_num_key_heads ({nk}) is not divisible by the TP size {tp}: "
            "gdn_heads sharding needs whole key heads (and their value heads) per rank"
        )


# -- in_proj ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GdnInProjOptions(Options):
    variant: Literal["qkv_z_b_a", "qkvz_ba", "blocks"] = "qkv_z_b_a"


def _in_proj_parts(ctx: Ctx[GdnInProjOptions]) -> list[int]:
    """Component sizes of the full in_proj along dim 0: q k v z b a."""
    nk, nv, dk, dv = _dims(ctx)
    return [nk * dk, nk * dk, nv * dv, nv * dv, nv, nv]


class GdnInProj(Op[GdnInProjOptions]):
    name = "gdn_in_proj"
    options_type = GdnInProjOptions
    shardings = frozenset({"gdn_heads"})

    def key_count(self, ctx: Ctx[GdnInProjOptions]) -> int:
        return {"qkvz_ba": 2, "blocks": 1}.get(ctx.options.variant, 4)

    def load(self, ctx: Ctx[GdnInProjOptions], shard: Shard, reader: Reader) -> torch.Tensor:
        nk, nv, dk, dv = _dims(ctx)
        _check_tp(ctx, shard.size)
        ratio = nv // nk
        k0, k1 = shard.bounds(nk, "linear_num_key_heads", ctx.rule)
        v0, v1 = k0 * ratio, k1 * ratio
        if ctx.options.variant == "qkvz_ba":
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
        if ctx.options.variant == "blocks":
            src = ctx.source(reader, 0)
            hidden = src.shape[1:]
            ctx.expect(src, (sum(_in_proj_parts(ctx)), *hidden))
            starts = [0]
            for size in _in_proj_parts(ctx)[:-1]:
                starts.append(starts[-1] + size)
            q0, k0_, v0_, z0, b0, a0 = starts
            return torch.cat([src.rows(q0 + k0 * dk, q0 + k1 * dk), src.rows(k0_ + k0 * dk, k0_ + k1 * dk),
                              src.rows(v0_ + v0 * dv, v0_ + v1 * dv), src.rows(z0 + v0 * dv, z0 + v1 * dv),
                              src.rows(b0 + v0, b0 + v1), src.rows(a0 + v0, a0 + v1)])
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

    def save(self, ctx: Ctx[GdnInProjOptions], full: torch.Tensor) -> list[Fragment]:
        nk, nv, dk, dv = _dims(ctx)
        ratio = nv // nk
        hidden = full.shape[1:]
        q, k, v, z, b, a = ctx.split(full, _in_proj_parts(ctx))
        if ctx.options.variant == "qkvz_ba":
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
        if ctx.options.variant == "blocks":
            return [ctx.emit(0, full)]
        return [ctx.emit(0, torch.cat([q, k, v])), ctx.emit(1, z), ctx.emit(2, b), ctx.emit(3, a)]

    def components(self, ctx: Ctx[GdnInProjOptions], length: int, tp: int) -> list[int]:
        _check_tp(ctx, tp)
        return _in_proj_parts(ctx)


# -- conv1d ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GdnConv1dOptions(Options):
    part: Literal["weight", "bias"] = "weight"


class GdnConv1d(Op[GdnConv1dOptions]):
    name = "gdn_conv1d"
    options_type = GdnConv1dOptions
    adapters = False
    shardings = frozenset({"gdn_heads"})

    def load(self, ctx: Ctx[GdnConv1dOptions], shard: Shard, reader: Reader) -> torch.Tensor:
        nk, nv, dk, dv = _dims(ctx)
        _check_tp(ctx, shard.size)
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

    def save(self, ctx: Ctx[GdnConv1dOptions], full: torch.Tensor) -> list[Fragment]:
        return [ctx.emit(0, full)]

    def components(self, ctx: Ctx[GdnConv1dOptions], length: int, tp: int) -> list[int]:
        """Channels q k v."""
        _check_tp(ctx, tp)
        nk, nv, dk, dv = _dims(ctx)
        return [nk * dk, nk * dk, nv * dv]
