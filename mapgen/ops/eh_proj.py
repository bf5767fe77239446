"""``mtp_eh_proj``: a multi-token-prediction block's ``eh_proj`` with its declared input order.

Layout: rows chunk r of ``eh_proj [H, 2H]``, whose input is ``cat(embedding, hidden)``
(transformer/multi_token_prediction.py ``_concat_embeddings``).

Options
-------
``order`` "embedding_hidden" (DeepSeek-V3) | "hidden_embedding" (MiMo's ``input_proj`` takes
``cat(hidden, embedding)``: the two column halves are swapped); ``shared`` (engine-level, as for ``copy``).

Adapters: B's rows stay (a column-parallel row chunk); A's columns swap halves exactly as W's do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from mapgen.ops._base import Ctx, Fragment, Op, Options, Reader, Shard


@dataclass(frozen=True)
class EhProjOptions(Options):
    order: Literal["embedding_hidden", "hidden_embedding"] = "embedding_hidden"
    shared: bool = False  # engine-level: one HF tensor for every MTP depth


def _swap_halves(ctx: Ctx[EhProjOptions], x: torch.Tensor) -> torch.Tensor:
    if ctx.options.order == "embedding_hidden":
        return x
    first, second = x.chunk(2, dim=1)
    return torch.cat([second, first], dim=1)


class MtpEhProj(Op[EhProjOptions]):
    name = "mtp_eh_proj"
    options_type = EhProjOptions
    shardings = frozenset({"column"})

    def load(self, ctx: Ctx[EhProjOptions], shard: Shard, reader: Reader) -> torch.Tensor:
        hidden = ctx.spec.hidden_size
        src = ctx.source(reader, 0)
        ctx.expect(src, (hidden, 2 * hidden))
        return _swap_halves(ctx, src.rows(*shard.bounds(hidden, "hidden_size", ctx.rule)))

    def save(self, ctx: Ctx[EhProjOptions], full: torch.Tensor) -> list[Fragment]:
        return [ctx.emit(0, _swap_halves(ctx, full))]

    def adapter_rows(self, ctx: Ctx[EhProjOptions], hf: Sequence[torch.Tensor]) -> torch.Tensor:
        return hf[0]

    def adapter_rows_back(self, ctx: Ctx[EhProjOptions], full: torch.Tensor) -> list[torch.Tensor]:
        return [full]

    def adapter_cols(self, ctx: Ctx[EhProjOptions], a: torch.Tensor) -> torch.Tensor:
        return _swap_halves(ctx, a)

    def adapter_cols_back(self, ctx: Ctx[EhProjOptions], a: torch.Tensor) -> torch.Tensor:
        return _swap_halves(ctx, a)
