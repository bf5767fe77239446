"""Shims that let megatron-core 0.16.1 build, run and dist-checkpoint models on a CPU without CUDA or TE.

Every patch here is a no-op when CUDA is available. Each replaces one attribute that megatron-core reaches
for unconditionally:

- ``torch.cuda.current_device`` returns ``"meta"`` while the default device is meta (so that tensors
  megatron-core allocates "on the current GPU" during a meta build stay on meta) and ``"cpu"`` otherwise
  (RoPE's ``inv_freq``, the MoE router's ``expert_bias`` buffer, the dist-checkpoint writer's status tensor).
- ``torch.cuda.synchronize`` is a no-op (the dist-checkpoint writer calls it after staging tensors).
- ``Tensor.cuda()`` returns the tensor itself (under PP with tied embeddings or MTP, GPTModel moves the last
  stage's embedding copy to CUDA before all-reducing it from the first stage).
- ``CudaRNGStatesTracker.fork`` returns ``contextlib.nullcontext()`` (``DotProductAttention`` and
  ``GatedDeltaNet.reset_parameters`` fork the CUDA RNG tracker; without CUDA there is no state to fork).
- ``fused_softmax.get_sliding_window_causal_mask`` builds the window mask on the CPU (megatron-core's builds it
  on ``"cuda"``; the local core attention calls it for every windowed layer, whatever mask it is given). Same
  mask: query i keeps keys ``i - left .. i + right`` of ``window_size=(left, right)``.
- ``moe_utils.te_general_gemm`` is set to ``None`` when Transformer Engine is absent (the router refers
  to the name, which 0.16.1 only defines when TE imports).
- ``torch._dynamo.config.disable`` is set (only where dynamo was imported already), so that megatron-core's
  ``jit_fuser`` (``torch.compile``) runs eagerly: compiling with inductor on CPU takes tens of seconds per
  function and needs a C++ toolchain. :func:`import_megatron` avoids the question altogether: it imports
  megatron-core with ``torch.compile`` standing in as the identity, so ``jit_fuser`` never compiles and
  torch's dynamo/inductor stack (half of megatron-core's import time) is never imported.
- ``multi_latent_attention.HAVE_TE`` is cleared when its TE names are stand-ins, not classes (0.16.1 then calls
  ``isinstance(linear_proj, <stand-in>)`` while building ``MLASelfAttention``).
- the flash-linear-attention fallback of :mod:`mapgen.runtime._gdn` (GatedDeltaNet refuses to build
  without ``fla``; the fallback uses megatron-core's own torch implementation of the chunked rule).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch


class _State:
    lock = threading.RLock()
    depth = 0  # active cpu_shims() blocks, plus one once installed for good
    installed = False
    saved: list[tuple[Any, str, Any, bool]] = []  # noqa: RUF012 -- one process-wide stack


def _current_device() -> str:
    return "meta" if torch.get_default_device().type == "meta" else "cpu"


def _synchronize(device: Any = None) -> None:
    return None


def _fork(self: Any, name: str = "") -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _tensor_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _sliding_window_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """megatron-core's ``get_sliding_window_causal_mask`` on the current device (True = masked out)."""
    keep = torch.ones(sq, skv, dtype=torch.bool, device=_current_device())
    keep = torch.triu(keep, diagonal=skv - sq - window_size[0])
    keep = torch.tril(keep, diagonal=skv - sq + window_size[1])
    return ~keep


def _patches() -> list[tuple[Any, str, Any]]:
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_utils

    from mapgen.runtime import _gdn

    patches: list[tuple[Any, str, Any]] = [
        (torch.cuda, "current_device", _current_device),
        (torch.cuda, "synchronize", _synchronize),
        (torch.Tensor, "cuda", _tensor_cuda),
        (mcore_random.CudaRNGStatesTracker, "fork", _fork),
        (fused_softmax, "get_sliding_window_causal_mask", _sliding_window_mask),
    ]
    if "torch._dynamo" in sys.modules:  # imported (so maybe used by jit_fuser): run compiled functions eagerly
        patches.append((torch._dynamo.config, "disable", True))
    if getattr(moe_utils, "te_general_gemm", None) is None:
        patches.append((moe_utils, "te_general_gemm", None))
    from megatron.core.transformer import multi_latent_attention as mla

    if mla.HAVE_TE and not isinstance(mla.TELinear, type):  # a stand-in without TE; MLA calls isinstance on it
        patches.append((mla, "HAVE_TE", False))
    patches.extend(_gdn.fla_fallback_patches())
    return patches


def _apply() -> None:
    for obj, attr, value in _patches():
        _State.saved.append((obj, attr, getattr(obj, attr, None), hasattr(obj, attr)))
        setattr(obj, attr, value)


def _restore() -> None:
    while _State.saved:
        obj, attr, old, existed = _State.saved.pop()
        if existed:
            setattr(obj, attr, old)
        else:
            delattr(obj, attr)


# Warnings megatron-core 0.16.1 and torch.distributed print on every CPU run, about optional accelerators,
# their own defaults and deprecations inside their code; shown with `--verbose` (MAPGEN_VERBOSE=1).
QUIET_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*full scope is deprecated.*",
    r".*Please use DTensor instead and we are deprecating ShardedTensor.*",
    r".*torch.distributed is disabled, unavailable or uninitialized.*",
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",  # megatron's async all-reduce advice, a CUDA setting
    r".*without fp32 routing\. Consider enabling moe_router_dtype.*",  # training advice on a conversion run
    r"`torch\.distributed\.\w+` is deprecated\. Please use .*",  # megatron-core calls the old collectives
    r"`load_state_dict` is deprecated and will be removed.*",  # megatron-core's torch_dist load calls it
    r".*sequence parallelism must be used.*",  # training advice for EP x TP; a conversion runs no training step
)


def verbose() -> bool:
    return os.environ.get("MAPGEN_VERBOSE") == "1"


def quiet_third_party() -> None:
    """Silence :data:`QUIET_WARNINGS` for the process unless ``--verbose`` (``MAPGEN_VERBOSE=1``)."""
    if verbose():
        return
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def quiet_transformers() -> None:
    """transformers' info/warning logs ("falling back to the reference implementation"), its load reports and
    progress bars, unless ``--verbose``: mapgen uses transformers as a reference, and says what matters itself."""
    if verbose():
        return
    import transformers

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    quiet_third_party()


def _eager_compile(model: Any = None, **kwargs: Any) -> Any:
    return model if model is not None else (lambda fn: fn)


def import_megatron() -> None:
    """Import megatron-core for mapgen (once; cheap afterwards). On CPU its ``jit_fuser`` is bound to the
    identity instead of ``torch.compile`` (megatron-core reads ``torch.compile`` once, at import): the fused
    kernels are never compiled -- conversion does not run them, a CPU forward runs them eagerly -- and
    torch's dynamo/inductor stack is not imported (about 2 s of CPU per process). With CUDA nothing changes."""
    quiet_third_party()
    if "megatron.core" in sys.modules:
        return
    if not shims_needed():
        import megatron.core
        return
    original = torch.compile
    torch.compile = _eager_compile
    try:
        import megatron.core
        import megatron.core.jit  # noqa: F401
    finally:
        torch.compile = original


def shims_needed() -> bool:
    """True when no CUDA device is usable, i.e. when the shims do anything."""
    return not torch.cuda.is_available()


def install_cpu_shims() -> None:
    """Apply the shims for the rest of the process (idempotent; a no-op when CUDA is available)."""
    with _State.lock:
        if _State.installed or not shims_needed():
            return
        if _State.depth == 0:
            _apply()
        _State.depth += 1
        _State.installed = True


@contextlib.contextmanager
def cpu_shims() -> Iterator[None]:
    """Apply the shims inside the block and restore the originals after (nests; no-op with CUDA)."""
    if not shims_needed():
        yield
        return
    with _State.lock:
        if _State.depth == 0:
            _apply()
        _State.depth += 1
    try:
        yield
    finally:
        with _State.lock:
            _State.depth -= 1
            if _State.depth == 0:
                _restore()


def shimmed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``fn`` under :func:`cpu_shims`."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cpu_shims():
            return fn(*args, **kwargs)

    return wrapper
