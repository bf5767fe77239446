"""The parallel layout: one frozen type for the sizes a run asks for and the sizes megatron-core runs with.

:class:`Parallel` is what a user asks for (``etp`` may be left ``None``: TP when EP is 1, else 1) and, from
:meth:`Parallel.current`, megatron-core's resolved model-parallel state (``etp`` always set). It is defined
here, apart from :mod:`mapgen.runtime.api` (which re-exports it) and :mod:`mapgen.runtime.megatron`, so that
both can import it. This module imports neither torch nor megatron-core at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Parallel"]


@dataclass(frozen=True)
class Parallel:
    """Tensor, expert, expert-tensor and pipeline parallel sizes."""

    tp: int = 1
    ep: int = 1
    etp: int | None = None
    pp: int = 1

    @property
    def etp_size(self) -> int:
        """The expert-tensor-parallel size: ``etp`` when given, else TP when EP is 1, else 1."""
        return self.etp if self.etp is not None else (self.tp if self.ep == 1 else 1)

    @property
    def minimal_world(self) -> int:
        """The smallest world this layout fits: ``lcm(TP*PP, EP*ETP*PP)`` ranks (a larger world adds data
        parallelism)."""
        return math.lcm(self.tp * self.pp, self.ep * self.etp_size * self.pp)

    def describe(self) -> str:
        return f"TP={self.tp} EP={self.ep} ETP={self.etp_size} PP={self.pp}"

    @classmethod
    def current(cls) -> Parallel:
        """megatron-core's current model-parallel sizes (``etp`` resolved); all 1 when none is initialised.
        The world size itself is ``torch.distributed.get_world_size()``."""
        from mapgen.runtime._cpu import import_megatron

        import_megatron()
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return cls(etp=1)
        return cls(
            tp=ps.get_tensor_model_parallel_world_size(),
            ep=ps.get_expert_model_parallel_world_size(),
            etp=ps.get_expert_tensor_parallel_world_size(),
            pp=ps.get_pipeline_model_parallel_world_size(),
        )
