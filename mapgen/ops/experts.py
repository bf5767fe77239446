"""``expert_fc1`` and ``expert_fc2``: one routed expert's MLP, from per-expert keys or packed 3-D tensors.

``expert`` is the *global* expert id; ``shard`` the expert-TP (ETP) coordinate. Packed tensors are read
as ``packed[expert]`` only (:class:`~mapgen.ops._base.ExpertSource`), and ``save`` returns fragments
whose ``index`` is the expert slot.

Layouts (ETP rank ``r``)
------------------------
``expert_fc1``  ``[gate_r; up_r]`` as :mod:`mapgen.ops.gated_fc1` (moe/experts.py applies the same
                ``glu`` chunk and ``apply_swiglu_sharded_factory``).
``expert_fc2``  columns chunk r of ``down`` (RowParallel, ``expert_row``).

Options
-------
``layout`` "per_expert" | "packed" (``packed[expert]``), ``orientation`` "out_in" (``[E, out, in]`` like
nn.Linear) | "in_out" (``[E, in, out]``), and for ``expert_fc1`` ``fused`` (default: packed),
``interleave`` bool (gpt-oss: fused rows alternate gate, up), ``part`` "weight" | "bias";
``expert_fc2`` takes ``part`` "weight" only.

Adapters: per expert, as the dense ops (fc1's B as ``[gate; up]``, fc2 row-parallel over ETP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mapgen.ops._base import Ctx, ExpertSource, Fragment, Op, Reader, Shard, Span
from mapgen.ops.gated_fc1 import Gated, GatedFc1Options


@dataclass(frozen=True)
class ExpertFc1Options(GatedFc1Options, ExpertSource):
    pass


class ExpertFc1(Gated[ExpertFc1Options]):
    name = "expert_fc1"
    options_type = ExpertFc1Options
    shardings = frozenset({"expert_gated_column"})


@dataclass(frozen=True)
class ExpertFc2Options(ExpertSource):
    part: Literal["weight"] = "weight"


class ExpertFc2(Op[ExpertFc2Options]):
    name = "expert_fc2"
    options_type = ExpertFc2Options
    shardings = frozenset({"expert_row"})

    def load(self, ctx: Ctx[ExpertFc2Options], shard: Shard, reader: Reader) -> torch.Tensor:
        src = ctx.source(reader, 0)
        if len(src.shape) != 2:
            raise ctx.fail(f"row sharding needs a matrix, {src.key} has shape {src.shape}")
        return src.cols(*shard.bounds(src.shape[1], f"dim 1 of {src.key}", ctx.rule))

    def spans(self, ctx: Ctx[ExpertFc2Options], shard: Shard, reader: Reader) -> list[Span] | None:
        """The whole expert matrix at ETP=1 (a column chunk is no block of the storage)."""
        span = ctx.source(reader, 0).whole_span() if shard.size == 1 else None
        return None if span is None else [span]

    def save(self, ctx: Ctx[ExpertFc2Options], full: torch.Tensor) -> list[Fragment]:
        return [ctx.emit(0, full)]
