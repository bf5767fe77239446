"""Expected tensor shapes from a layout + config (mapgen.plan.shapes)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from scan_support import CORPUS

from mapgen.infer import scan
from mapgen.plan.expand import language_model_keys
from mapgen.plan.shapes import expected_shapes, shape_problems
from mapgen.source import read_source

# Text-only bf16 checkpoints: the index's metadata.total_size is exactly 2 bytes per expected element.
TEXT_ONLY = [
    "llama-3.2-3b-instruct",
    "mimo-7b",
    "mixtral-8x7b-instruct-v0.1",
    "qwen3-1.7b-mlx-bf16",
    "qwen3.5-25b-reap-a3b-coding",
    "sakura-14b-qwen2.5",
]


@pytest.mark.parametrize("case", TEXT_ONLY)
def test_total_size_of_real_checkpoints(case: str) -> None:
    layout = scan(str(CORPUS / case))
    shapes = expected_shapes(layout, layout.config)
    assert set(shapes) == language_model_keys(layout)
    index = json.loads((CORPUS / case / "model.safetensors.index.json").read_text())
    assert 2 * sum(math.prod(s) for s in shapes.values()) == index["metadata"]["total_size"]


def test_known_parameter_counts() -> None:
    qwen3 = scan(str(CORPUS / "qwen3-1.7b-mlx-bf16"))
    shapes = expected_shapes(qwen3, qwen3.config)
    total = sum(math.prod(s) for s in shapes.values())
    embedding = math.prod(shapes["model.embed_tokens.weight"])
    assert round(total / 1e9, 2) == 1.72  # Qwen3-1.7B: tied, so the embedding is counted once
    assert round((total - embedding) / 1e9, 2) == 1.41  # "1.4B non-embedding parameters"
    mixtral = scan(str(CORPUS / "mixtral-8x7b-instruct-v0.1"))
    assert round(sum(math.prod(s) for s in expected_shapes(mixtral, mixtral.config).values()) / 1e9, 1) == 46.7


def test_packed_in_out_experts_and_text_config_nesting() -> None:
    layout = scan(str(CORPUS / "qwen3-vl-30b-a3b"))  # sizes live under text_config
    shapes = expected_shapes(layout, layout.config)
    root = "model.language_model.layers.0."
    assert shapes[root + "mlp.experts.gate_up_proj"] == (128, 2048, 2 * 768)
    assert shapes[root + "mlp.experts.down_proj"] == (128, 768, 2048)
    assert shapes[root + "mlp.gate.weight"] == (128, 2048)
    assert shapes[root + "self_attn.q_proj.weight"] == (32 * 128, 2048)
    assert shapes[root + "self_attn.q_norm.weight"] == (128,)
    assert set(shapes) == language_model_keys(layout)  # the vision tower is not described


def test_gated_delta_net_output_gate_and_shared_expert() -> None:
    layout = scan(str(CORPUS / "qwen3.5-25b-reap-a3b-coding"))
    shapes = expected_shapes(layout, layout.config)
    lin, full = "model.language_model.layers.0.", "model.language_model.layers.3."
    assert shapes[lin + "linear_attn.in_proj_qkv.weight"] == (2 * 16 * 128 + 32 * 128, 2048)
    assert shapes[lin + "linear_attn.conv1d.weight"] == (2 * 16 * 128 + 32 * 128, 1, 4)
    assert shapes[lin + "linear_attn.A_log"] == (32,)
    assert shapes[lin + "linear_attn.norm.weight"] == (128,)
    assert shapes[full + "self_attn.q_proj.weight"] == (2 * 16 * 256, 2048)  # output gate doubles q
    assert shapes[full + "self_attn.o_proj.weight"] == (2048, 16 * 256)
    assert shapes[full + "mlp.shared_expert_gate.weight"] == (1, 2048)
    assert shapes[full + "mlp.shared_expert.up_proj.weight"] == (512, 2048)
    assert shapes[full + "mlp.experts.179.down_proj.weight"] == (2048, 512)


def test_mxfp4_experts_are_described_dequantized() -> None:
    layout = scan(str(CORPUS / "gpt-oss-20b"))
    shapes = expected_shapes(layout, layout.config)
    assert not any("_blocks" in k or "_scales" in k for k in shapes)  # the scan reads each pair as its tensor
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == (32, 2880, 2 * 2880)
    assert shapes["model.layers.0.mlp.experts.down_proj"] == (32, 2880, 2880)
    assert shapes["model.layers.0.self_attn.sinks"] == (64,)
    assert shapes["model.layers.0.mlp.router.bias"] == (32,)
    assert shapes["model.layers.0.mlp.experts.gate_up_proj_bias"] == (32, 2 * 2880)


# ---------------------------------------------------------------------------------------------------------
# Against checkpoints written by transformers itself
# ---------------------------------------------------------------------------------------------------------
_SMALL: dict[str, Any] = {
    "hidden_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 160,
    "num_hidden_layers": 2,
}


def _tiny(kind: str) -> tuple[Any, Any]:
    import transformers as t

    if kind == "qwen3":
        return t.Qwen3Config(**_SMALL, intermediate_size=40, tie_word_embeddings=True), t.Qwen3ForCausalLM
    if kind == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(
            **_SMALL, intermediate_size=40, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
            mlp_only_layers=[0],
        )  # fmt: skip
        return cfg, t.Qwen3MoeForCausalLM
    if kind == "mixtral":
        cfg = t.MixtralConfig(**_SMALL, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2)
        return cfg, t.MixtralForCausalLM
    small = {**_SMALL, "num_hidden_layers": 4}
    cfg = t.Qwen3_5MoeTextConfig(
        **small, moe_intermediate_size=24, shared_expert_intermediate_size=20, num_experts=4, num_experts_per_tok=2,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=6,
        linear_conv_kernel_dim=4,
    )  # fmt: skip
    return cfg, t.Qwen3_5MoeForCausalLM


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "mixtral", "qwen3_5_moe"])
def test_every_key_of_a_transformers_checkpoint(tmp_path: Path, kind: str) -> None:
    import torch

    config, cls = _tiny(kind)
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path)
    source = read_source(str(tmp_path))
    layout = scan(str(tmp_path))
    actual = {k: info.shape for k, info in source.tensors.items()}
    assert None not in actual.values()
    expected = expected_shapes(layout, layout.config)
    assert expected == actual
    assert shape_problems(layout, layout.config, actual) == []
    if kind == "qwen3_moe":  # the dense layer of mlp_only_layers is sized by intermediate_size
        assert expected["model.layers.0.mlp.up_proj.weight"] == (40, 48)
        assert expected["model.layers.1.mlp.experts.3.up_proj.weight"] == (24, 48)


def test_shape_problems_are_grouped_by_pattern() -> None:
    layout = scan(str(CORPUS / "mixtral-8x7b-instruct-v0.1"))
    config = layout.config
    actual: dict[str, tuple[int, ...] | None] = dict(expected_shapes(layout, config))
    for layer in (0, 1, 2, 5):
        for e in range(8):
            actual[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight"] = (7168, 4096)
    actual["model.norm.weight"] = (4097,)
    actual["lm_head.weight"] = None  # unknown shapes are not reported
    problems = shape_problems(layout, config, actual)
    assert [p.code for p in problems] == ["shape.mismatch", "shape.mismatch"]
    experts, norm = sorted(problems, key=lambda p: p.key)[0], problems[-1]
    assert "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight" in experts.message
    assert "[7168, 4096]" in experts.message
    assert experts.expected == "[14336, 4096]"
    assert "32 tensors, layers {0..2,5}, experts {0..7}" in experts.message
    assert norm.key == "model.norm.weight"
    assert norm.expected == "[4096]"
