"""Tiny DeepSeek-V2/V3 and Kimi-K2 checkpoints written by transformers itself (MLA attention).

Dimensions are small and all different (hidden 64, 4 heads; q latent 24, kv latent 32, 16 no-RoPE + 8 RoPE q/k
dims, 12 value dims; dense ffn 96, expert ffn 32, 4 experts, vocab 128) so that a swapped split or a missed
de-interleave cannot hide. Weights are perturbed (seeded) so that no two tensors are equal, the router's
score-correction bias included; fp32, several shards.

Routing as the releases configure it: DeepSeek-V3's sigmoid scores with the score-correction bias, expert groups
and ``routed_scaling_factor`` (Kimi-K2's 2.827 with one group), DeepSeek-V2's softmax without renormalisation,
group-limited greedy (V2) or greedy (V2-Lite).

``python -m tests.tiny_mla OUT_DIR`` writes them all.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from tests.tiny import _randomise

DEEPSEEK_V3_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # DeepSeek-V3's published rope_scaling
KIMI_K2_YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1,
                "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # Kimi-K2-Instruct's rope_scaling

_COMMON: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    _randomise(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)


def v3_config(**over: Any) -> Any:
    import transformers

    kw = {**_COMMON, "q_lora_rank": 24, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
          "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True,
          "first_k_dense_replace": 1, "max_position_embeddings": 163840, "num_nextn_predict_layers": 0,
          "rope_scaling": DEEPSEEK_V3_YARN, **over}
    return transformers.DeepseekV3Config(**kw)


def kimi_k2_config() -> Any:
    """Kimi-K2's shape of config on the DeepSeek-V3 class (transformers has no kimi_k2 model type): its YaRN
    (beta_fast 1), rope_theta 50000, 1 dense layer first, one shared expert, one expert group and its
    routed_scaling_factor 2.827."""
    return v3_config(rope_theta=50000.0, max_position_embeddings=131072, rope_scaling=KIMI_K2_YARN,
                     routed_scaling_factor=2.827)


def v3_routing_config() -> Any:
    """DeepSeek-V3's routing at small scale: 16 experts in 4 groups, the top 2 groups (by the sum of their top-2
    biased sigmoid scores), top-4 experts among their 8, renormalised, scaled by 2.5 (top-k / groups = 2 as in
    DeepSeek-V3's 8 / 4, which megatron-core's group score needs)."""
    return v3_config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)


def v2_config(**over: Any) -> Any:
    """DeepSeek-V2: softmax routing without renormalisation, greedy (V2-Lite) or group-limited greedy (V2)."""
    import transformers

    kw = {**_COMMON, "q_lora_rank": 24, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
          "first_k_dense_replace": 1, "max_position_embeddings": 163840, "norm_topk_prob": False,
          "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 16.0,
          "rope_scaling": {**DEEPSEEK_V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}, **over}
    return transformers.DeepseekV2Config(**kw)


def v2_lite_config() -> Any:
    """DeepSeek-V2-Lite: a full-rank q_proj, greedy top-k over softmax scores, scaling 1."""
    return v2_config(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0)


def _save(model: torch.nn.Module, out: Path, seed: int) -> Path:
    _perturb(model, seed)
    model.save_pretrained(str(out), max_shard_size="60KB")
    return out


def write(kind: str, out: Path, seed: int = 0) -> Path:
    import transformers

    if kind == "deepseek-v3":
        return _save(transformers.DeepseekV3ForCausalLM(v3_config()), out, seed)
    if kind == "deepseek-v3-q-full-rank":
        return _save(transformers.DeepseekV3ForCausalLM(v3_config(q_lora_rank=None, rope_scaling=None)), out, seed)
    if kind == "kimi-k2":
        return _save(transformers.DeepseekV3ForCausalLM(kimi_k2_config()), out, seed)
    if kind == "deepseek-v3-groups":
        return _save(transformers.DeepseekV3ForCausalLM(v3_routing_config()), out, seed)
    if kind == "deepseek-v2":
        return _save(transformers.DeepseekV2ForCausalLM(v2_config()), out, seed)
    if kind == "deepseek-v2-lite":
        return _save(transformers.DeepseekV2ForCausalLM(v2_lite_config()), out, seed)
    if kind == "deepseek-v3-mtp":
        return write_v3_mtp(out, seed)
    raise ValueError(kind)


def write_v3_mtp(out: Path, seed: int = 0) -> Path:
    """DeepSeek-V3 with one MTP layer stored the way the release stores it: decoder layer ``num_hidden_layers``
    (a full MoE layer) plus ``enorm``/``hnorm``/``eh_proj``/``shared_head.norm`` and copies of the embedding and
    the head. transformers has no MTP module: it writes a 3-layer model, and the third layer's keys become the MTP
    layer (the config then says 2 layers + 1 MTP layer, which transformers loads ignoring ``model.layers.2.*``)."""
    import transformers
    from safetensors.torch import save_file

    model = transformers.DeepseekV3ForCausalLM(v3_config(num_hidden_layers=3))
    _save(model, out, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    h = model.config.hidden_size
    extra = {
        "model.layers.2.enorm.weight": torch.rand(h, generator=gen) + 0.5,
        "model.layers.2.hnorm.weight": torch.rand(h, generator=gen) + 0.5,
        "model.layers.2.eh_proj.weight": torch.randn(h, 2 * h, generator=gen) * 0.05,
        "model.layers.2.shared_head.norm.weight": torch.rand(h, generator=gen) + 0.5,
        "model.layers.2.embed_tokens.weight": model.model.embed_tokens.weight.detach().clone(),
        "model.layers.2.shared_head.head.weight": model.lm_head.weight.detach().clone(),
    }
    name = "model-mtp.safetensors"
    save_file(extra, str(out / name), metadata={"format": "pt"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(extra, name))
    index.setdefault("metadata", {})["total_size"] = int(index["metadata"].get("total_size", 0)) + sum(
        t.numel() * t.element_size() for t in extra.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((out / "config.json").read_text())
    config.update(num_hidden_layers=2, num_nextn_predict_layers=1)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


KINDS = ("deepseek-v3", "deepseek-v3-q-full-rank", "kimi-k2", "deepseek-v3-mtp", "deepseek-v3-groups", "deepseek-v2",
         "deepseek-v2-lite")

if __name__ == "__main__":
    root = Path(sys.argv[1])
    for k in KINDS:
        print(write(k, root / k))
