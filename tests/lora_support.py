"""Tiny transformers base models and random PEFT LoRA adapters made by peft itself, for the adapter tests.

Bases are fp32, sharded in small files, with random non-square dimensions (tests/tiny.py's configs). Adapters
target every linear module (peft's ``all-linear``) with random non-zero A and B; ``shared_layer`` gives the
fused modules of that layer (q/k/v, gate/up) one shared A, so both exact Megatron forms (shared and block)
occur in one adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def write_base(kind: str, out: Path, seed: int = 0) -> Path:
    import transformers

    from tests.tiny import _randomise, qwen3_config, qwen3_moe_config

    if kind == "qwen3":
        model: Any = transformers.Qwen3ForCausalLM(qwen3_config())
    elif kind == "qwen3-moe":
        model = transformers.Qwen3MoeForCausalLM(qwen3_moe_config())
    elif kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=160, hidden_size=48, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6, sliding_window=None))
    else:
        raise ValueError(kind)
    _randomise(model, seed)
    model.config.torch_dtype = "float32"
    model.save_pretrained(str(out), max_shard_size="60KB")
    return out


def write_adapter(base: Path, out: Path, *, r: int = 4, alpha: int = 8, seed: int = 1,
                  shared_layer: int | None = 0, **lora: Any) -> Path:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0, **lora)
    pm = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    shared: dict[tuple[str, str], torch.Tensor] = {}
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" not in name:
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            if shared_layer is not None and f"layers.{shared_layer}." in name and "lora_A" in name:
                group = "attn" if any(f".{x}." in name for x in ("q_proj", "k_proj", "v_proj")) else (
                    "mlp" if any(f".{x}." in name for x in ("gate_proj", "up_proj")) else None)
                if group is not None:
                    p.copy_(shared.setdefault((group, str(tuple(p.shape))), p.detach().clone()))
    pm.save_pretrained(str(out))
    return out
