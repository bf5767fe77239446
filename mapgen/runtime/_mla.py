"""A CPU core attention for megatron-core's multi-latent attention (``MLASelfAttention``), without TE.

``MLASelfAttention`` builds its core attention with ``k_channels`` (``qk_head_dim + qk_pos_emb_head_dim``),
``v_channels`` (``v_head_dim``) and its own ``softmax_scale`` (YaRN's ``mscale_all_dim`` folded in); the local
``DotProductAttention`` of megatron-core 0.16.1 rejects those arguments (only TE's accepts them). This module holds
no parameters, so the names and shapes the proof enumerates are those of a TE build's MLA layer.

The computation is the textbook one, in the order transformers' eager attention uses: ``q @ k^T * scale``, masked,
softmax in fp32, cast back, ``@ v``. Query/key ``[s, b, n, dk]``, value ``[s, b, n, dv]`` -> ``[s, b, n * dv]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class MLACoreAttention(torch.nn.Module):
    """Scaled dot-product attention with separate query/key and value head dims (no parameters)."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, cp_comm_type: str | None = None,
                 pg_collection: Any = None, **_: Any) -> None:
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        dk = int(k_channels if k_channels is not None else config.kv_channels)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dk)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: Any = None, attention_bias: Tensor | None = None, packed_seq_params: Any = None,
                **_: Any) -> Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("mapgen's CPU MLA core attention does not take packed sequences")
        sq, b, n = query.shape[0], query.shape[1], query.shape[2]
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)  # [b, n, sq, dk]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)  # [b, n, sk, dv]
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
        mask = attention_mask
        if mask is None:  # causal by construction of the layer spec
            mask = torch.triu(torch.ones(sq, sk, dtype=torch.bool, device=scores.device), diagonal=sk - sq + 1)
        scores = scores.masked_fill(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)  # [b, n, sq, dv]
        return out.permute(2, 0, 1, 3).reshape(sq, b, n * v.shape[-1])
