"""Tiny random checkpoints written by transformers itself (its own key names, shapes and shard files).

Dimensions are non-square on purpose (hidden 48, 4 heads of 12 in 2 KV groups: q rows 48, k/v rows 24,
ffn 40, expert ffn 24, vocab 160) so that a missing transpose or a swapped split cannot hide. Values are
random (seeded); norm weights lie in [0.5, 1.5]. Stored in bf16 like real checkpoints, sharded in small
files so shard assignment is exercised.

``python -m tests.tiny OUT_DIR`` writes both and is how their layouts were emitted into ``generated/``
(``mapgen emit OUT_DIR/qwen3 OUT_DIR/qwen3-moe --name ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def _randomise(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def qwen3_config() -> object:
    import transformers

    return transformers.Qwen3Config(
        vocab_size=160, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=64, tie_word_embeddings=False,
        rms_norm_eps=1e-6, torch_dtype="bfloat16",
    )


def qwen3_moe_config() -> object:
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=160, hidden_size=48, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64,
        tie_word_embeddings=False, rms_norm_eps=1e-6, torch_dtype="bfloat16",
    )


def write(kind: str, out: Path, seed: int = 0) -> Path:
    import transformers

    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(qwen3_config())
    elif kind == "qwen3-moe":
        model = transformers.Qwen3MoeForCausalLM(qwen3_moe_config())
    else:
        raise ValueError(kind)
    _randomise(model, seed)
    model.to(torch.bfloat16).save_pretrained(str(out), max_shard_size="40KB")
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for k in ("qwen3", "qwen3-moe"):
        print(write(k, root / k))
