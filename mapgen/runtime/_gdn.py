"""Local (non-TE) stand-ins needed to build Qwen3-Next/Qwen3.5-style models with megatron-core 0.16.1.

- :class:`LayerNormColumnParallelLinear` stands in for TE's fused norm+linear (``TELayerNormColumnParallelLinear``):
  a ``ColumnParallelLinear`` that also owns ``layer_norm_weight`` (and ``layer_norm_bias`` for LayerNorm)
  and normalises its input first, so that a GDN layer's parameter names match a TE build.
- :class:`LocalNorm` is an RMSNorm/LayerNorm honouring ``config.layernorm_zero_centered_gamma`` (the torch
  norm megatron-core falls back to without apex asserts that flag off; TE and apex apply
  ``y = norm(x) * (1 + weight)``).
- :func:`fla_fallback_patches` lets ``GatedDeltaNet`` build and run without flash-linear-attention: it
  refuses to construct when ``fla`` is missing, and its forward needs ``l2norm`` and
  ``chunk_gated_delta_rule``; megatron-core ships a torch implementation of the chunked rule
  (``torch_chunk_gated_delta_rule``, used for ``deterministic_mode``) that we route to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from torch import Tensor


def _param_device() -> torch.device | None:
    return torch.device("meta") if torch.get_default_device().type == "meta" else None


def _norm(x: Tensor, weight: Tensor, bias: Tensor | None, *, rms: bool, eps: float, zero_centered: bool) -> Tensor:
    w = weight + 1 if zero_centered else weight
    if rms:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (y.to(x.dtype) * w).to(x.dtype)
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, bias, eps)


class LocalNorm(torch.nn.Module):
    """RMSNorm or LayerNorm (per ``config.normalization``), zero-centred gamma when the config says so.

    Parameters are ``weight`` (and ``bias`` for LayerNorm), like ``torch.nn.RMSNorm``/``LayerNorm`` and TE.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.zero_centered = bool(config.layernorm_zero_centered_gamma)
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype, device=_param_device()))
        self.bias = (
            None
            if self.rms
            else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype, device=_param_device()))
        )
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]

    def forward(self, x: Tensor) -> Tensor:
        return _norm(x, self.weight, self.bias, rms=self.rms, eps=self.eps, zero_centered=self.zero_centered)


class LayerNormColumnParallelLinear(ColumnParallelLinear):  # type: ignore[misc]
    """``ColumnParallelLinear`` with a fused input norm, named like TE's ``LayerNormColumnParallelLinear``.

    The norm weight is replicated over TP (the dist-checkpoint entry is a replicated tensor, as in TE).
    """

    def __init__(self, input_size: int, output_size: int, *, config: Any, **kwargs: Any) -> None:
        kwargs.pop("tp_comm_buffer_name", None)
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.norm_rms = config.normalization == "RMSNorm"
        self.norm_eps = config.layernorm_epsilon
        self.norm_zero_centered = bool(config.layernorm_zero_centered_gamma)
        init = torch.zeros if self.norm_zero_centered else torch.ones
        dev = _param_device()
        self.layer_norm_weight = torch.nn.Parameter(init(input_size, dtype=config.params_dtype, device=dev))
        self.layer_norm_bias = (
            None
            if self.norm_rms
            else torch.nn.Parameter(torch.zeros(input_size, dtype=config.params_dtype, device=dev))
        )

    def forward(self, input_: Tensor, *args: Any, **kwargs: Any) -> Any:
        x = _norm(
            input_,
            self.layer_norm_weight,
            self.layer_norm_bias,
            rms=self.norm_rms,
            eps=self.norm_eps,
            zero_centered=self.norm_zero_centered,
        )
        return super().forward(x, *args, **kwargs)


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-6) -> Tensor:
    """``fla.modules.l2norm.l2norm``: ``x / sqrt(sum(x^2) + eps)`` along ``dim``, computed in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(dim=dim, keepdim=True) + eps)).to(x.dtype)


def _chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Any:
    from megatron.core.ssm import gated_delta_net

    return gated_delta_net.torch_chunk_gated_delta_rule(q, k, v, **kwargs)


def fla_fallback_patches() -> list[tuple[Any, str, Any]]:
    """(module, attribute, value) patches for ``megatron.core.ssm.gated_delta_net`` when fla is absent."""
    from megatron.core.ssm import gated_delta_net

    if getattr(gated_delta_net, "_mapgen_real_fla", gated_delta_net.HAVE_FLA):
        return []
    gated_delta_net._mapgen_real_fla = False  # remember across patch/restore cycles
    return [
        (gated_delta_net, "HAVE_FLA", True),
        (gated_delta_net, "l2norm", l2norm),
        (gated_delta_net, "chunk_gated_delta_rule", _chunk_gated_delta_rule),
    ]


@contextlib.contextmanager
def fla_fallback() -> Iterator[None]:
    """Apply :func:`fla_fallback_patches` inside the block (works with or without CUDA)."""
    saved = []
    for obj, attr, value in fla_fallback_patches():
        saved.append((obj, attr, getattr(obj, attr, None)))
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)
