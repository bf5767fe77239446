"""The config table (mapgen/contract/config.py) against the hand-written recipe it replaced.

``_recipe`` is the planner's former ``_config`` + ``plan.recipe`` evaluator, frozen here as the reference:
for every stored input (and every emit/scan golden layout the planner supports) the table must give the
identical ModelSpec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mapgen.contract import HFConfig, ModelSpec
from mapgen.contract.config import CONFIG, ConfigRow, check_table, model_spec
from mapgen.contract.hf_config import head_dim, mrope_section, rope_scaling, rope_scaling_factor
from mapgen.errors import MapgenError
from mapgen.ir import LayerGroup, Layout, layout_from_json
from mapgen.plan.planner import plan

# The former planner's list of model types with zero-centred norms (now mapgen.families.model_types).
ZERO_CENTERED_MODEL_TYPES = frozenset({"qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"})

REPO = Path(__file__).resolve().parents[1]
INPUTS = sorted(
    [*REPO.glob("generated/inputs/*.json"), *REPO.glob("tests/cases/emit/*/inputs/*.json"),
     *REPO.glob("tests/cases/scan/*/expected_layout.json")]
)


def _kind(group: LayerGroup) -> str:
    return "gated_delta_net" if group.mixer.family == "gated_delta_net" else "attention"


def _mlp(group: LayerGroup) -> str:
    return "moe" if group.mlp.family == "moe" else "dense"


def _recipe(layout: Layout) -> ModelSpec:
    """The former hand list, evaluated the former way."""
    hf = HFConfig(layout.config)
    lm = layout.language_model
    zero = layout.model_type in ZERO_CENTERED_MODEL_TYPES or layout.text_model_type in ZERO_CENTERED_MODEL_TYPES
    groups = list(lm.groups) + (list(lm.mtp.inner) if lm.mtp else [])
    attns = [g.mixer for g in groups if g.mixer.family == "attention"]
    moes = [g.mlp for g in groups if g.mlp.family == "moe"]
    a0 = attns[0] if attns else None
    kinds: list[Any] = [None] * lm.num_layers
    mlps: list[Any] = [None] * lm.num_layers
    for g in lm.groups:
        for i in g.layers:
            kinds[i], mlps[i] = _kind(g), _mlp(g)
    f: dict[str, Any] = {
        "num_layers": hf.get("num_hidden_layers", "n_layer"),
        "hidden_size": hf.get("hidden_size", "n_embd"),
        "num_attention_heads": hf.get("num_attention_heads", "n_head"),
        "num_query_groups": hf.get("num_key_value_heads", "num_attention_heads", "n_head"),
        "kv_channels": head_dim(hf),
        "ffn_hidden_size": hf.get("intermediate_size", "moe_intermediate_size", "n_inner"),
        "vocab_size": hf.get("vocab_size"),
        "max_position_embeddings": hf.get("max_position_embeddings", "n_positions", default=4096),
        "position_embedding_type": "learned_absolute" if lm.top.key("position_embedding") else (
            "mrope" if mrope_section(hf) else "rope"),
        "mrope_section": mrope_section(hf),
        "layer_kinds": tuple(kinds),
        "mlp_kinds": tuple(mlps),
        "add_qkv_bias": bool(a0 and a0.key("q_bias")),
        "add_bias_linear": bool(a0 and a0.key("o_bias")),
        "qk_layernorm": bool(a0 and a0.key("q_norm")),
        "attention_output_gate": bool(a0 and a0.flag("output_gate")),
        "rotary_base": hf.get("rope_theta", "rope_parameters.rope_theta", default=10000.0),
        "rotary_percent": hf.get("partial_rotary_factor", "rope_parameters.partial_rotary_factor", "rotary_pct",
                                 "rope_pct", default=1.0),
        "rope_scaling": rope_scaling(hf),
        "rope_scaling_factor": rope_scaling_factor(hf),
        "norm_epsilon": hf.get("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon",
                               default=1e-6),
        # a norm bias in the keys (the planner refuses one on a model type not declared LayerNorm)
        "normalization": "LayerNorm" if lm.top.key("final_norm_bias") else "RMSNorm",
        "layernorm_zero_centered_gamma": zero,
        "untie_embeddings_and_output_weights": not lm.tied_embeddings,
    }
    if moes:
        m0 = moes[0]
        f |= {
            "num_moe_experts": hf.get("num_experts", "num_local_experts", "n_routed_experts"),
            "moe_router_topk": hf.get("num_experts_per_tok", "moe_topk"),
            "moe_ffn_hidden_size": hf.get("moe_intermediate_size", "intermediate_size"),
            "moe_router_enable_expert_bias": bool(m0.key("expert_bias")),
            # the former runtime default, now explicit; every stored config routes renormalised, unscaled,
            # ungrouped (the routing variants are tested in tests/test_routing.py)
            "moe_router_score_function": "sigmoid" if m0.key("expert_bias") else "softmax",
            "moe_router_dtype": "fp32" if m0.key("expert_bias") else None,  # DeepSeek-style: the gate in fp32
            "moe_shared_expert_gate": bool((sh := m0.child("shared")) and sh.key("gate")),
        }
        if m0.child("shared") is not None:
            f["moe_shared_expert_intermediate_size"] = hf.get("shared_expert_intermediate_size",
                                                              "moe_intermediate_size")
    if any(g.mixer.family == "gated_delta_net" for g in groups):
        f |= {n: hf.get(n) for n in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                      "linear_value_head_dim", "linear_conv_kernel_dim")}
    if lm.mtp is not None:
        inner = lm.mtp.inner[0] if lm.mtp.inner else None
        f |= {
            "mtp_num_layers": lm.mtp.depth if lm.mtp.depth > 0 else None,
            "mtp_layer_kind": _kind(inner) if inner else "attention",
            "mtp_mlp_kind": _mlp(inner) if inner else "dense",
        }
    return ModelSpec(**f)


def test_the_table_is_well_formed() -> None:
    assert check_table() == []
    assert check_table((ConfigRow("nope", hf=("x",)), ConfigRow("nope", fact="tied", when="missing"))) == [
        "ConfigRow('nope'): ModelSpec has no field 'nope'",
        "ConfigRow('nope'): ModelSpec has no field 'nope'",
        "ConfigRow('nope'): the field is set twice",
        "ConfigRow('nope'): Facts has no field 'missing'",
    ]


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_table_equals_the_former_recipe(path: Path) -> None:
    layout = layout_from_json(path.read_text(encoding="utf-8"))
    try:
        p = plan(layout)
    except MapgenError:
        pytest.skip("the planner does not support this layout")
    if path.parent.parent.name == "injection":
        pytest.skip("hostile config")
    if any(g.mixer.family == "mla" for g in layout.language_model.groups):
        pytest.skip("multi-latent attention postdates the former recipe (its rows: tests/test_mla.py)")
    if layout.model_type == "gpt_oss":
        pytest.skip("gpt-oss (sinks, clamped SwiGLU, YaRN) postdates the former recipe (tests/test_gptoss.py)")
    got = model_spec(HFConfig(layout.config), layout, p.facts)
    assert got == _recipe(layout)


def test_rows_are_frozen_data() -> None:
    assert all(type(row) is ConfigRow for row in CONFIG)
    with pytest.raises(AttributeError):
        CONFIG[0].hf = ("x",)  # type: ignore[misc]
