"""The one-process gloo group the megatron-core parity tests build their modules in."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def model_parallel() -> Iterator[None]:
    """A one-process gloo group and megatron's model-parallel state at TP=PP=1 (torn down after the module)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    initialised = not parallel_state.model_parallel_is_initialized()
    if initialised:
        parallel_state.initialize_model_parallel(1, 1)
    yield
    if initialised:
        parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
