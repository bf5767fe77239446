"""Tiny gpt-oss checkpoints written by transformers itself (``GptOssForCausalLM``).

Small and all different where a swap could hide: hidden 64, 4 query heads over 2 KV groups of head dim 16, expert
ffn 32 (gate/up interleaved in ``gate_up_proj [E, H, 2I]``), 4 experts top-2, vocab 128, 2 layers (one sliding, one
full), the window shrunk to 4 so that it cuts the 11-token verify batch. Weights perturbed (seeded) so that no two
tensors are equal, the sinks, router bias and expert biases included; fp32, several shards.

The config keeps gpt-oss-20b's semantics: attention biases, sinks, YaRN (factor 32 over 4096 original positions,
beta 32/1, truncate false), rope_theta 150000, clamped SwiGLU (alpha 1.702, limit 7.0). The variants change one
thing each (``KINDS``); ``tests/test_gptoss.py`` shows each changes transformers' logits.

``python -m tests.tiny_gptoss OUT_DIR`` writes them all.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from tests.tiny import _randomise

GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096, "rope_theta": 150000.0}  # gpt-oss-20b's rope_scaling

_COMMON: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
    "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "swiglu_limit": 7.0, "attention_bias": True, "tie_word_embeddings": False,
    "rope_parameters": GPT_OSS_YARN,
}

KINDS: dict[str, dict[str, Any]] = {
    "gpt-oss": {},
    # a limit the perturbed activations reach (the 7.0 of the release is never reached by a tiny model)
    "gpt-oss-limit": {"swiglu_limit": 0.05},
    # the window on both layers / on none
    "gpt-oss-all-windows": {"layer_types": ["sliding_attention", "sliding_attention"]},
    "gpt-oss-no-window": {"layer_types": ["full_attention", "full_attention"]},
    # YaRN with its correction range rounded (truncate true), and plain RoPE
    "gpt-oss-yarn-truncate": {"rope_parameters": {**GPT_OSS_YARN, "truncate": True}},
    "gpt-oss-rope": {"rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}},
}


def config(**over: Any) -> Any:
    import transformers

    return transformers.GptOssConfig(**{**_COMMON, **over})


def write(kind: str, out: Path, seed: int = 0) -> Path:
    import transformers

    model = transformers.GptOssForCausalLM(config(**KINDS[kind]))
    _randomise(model, seed)
    model.save_pretrained(str(out), max_shard_size="60KB")
    return out


def load_state(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for name in KINDS:
        print(write(name, root / name))
