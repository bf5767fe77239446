"""Issue 11 triage: the dense decoders the semantics matrix left ``unclassified`` each get a named verdict.

* verified (transformers-written tiny twin, fp32, several shards, perturbed; ``verify --tp 2``, ``--ep 2`` for MoE,
  logits <= 1e-4): Arcee (plain up/down MLP, relu2), EXAONE-3 (``transformer.h.N.attn.attention.*``,
  ``c_fc_0/c_fc_1/c_proj`` as ``nn.Linear``), Jais2 (LayerNorm + plain MLP with biases), Nemotron (LayerNorm1P =
  zero-centred LayerNorm, partial RoPE, relu2), GraniteMoE / GraniteMoeShared (packed ``input_linear`` /
  ``output_linear`` experts, softmax over the top-k logits), Sarvam-MoE (GLM-4-MoE maths, ``[q; k; v]``
  ``query_key_value`` declared per model type), HyperCLOVA X without post norms, Ministral (the matrix builder now
  states ``head_dim``, as hub configs do). Nemotron runs in CI; the others are opt-in
  (``MAPGEN_MATRIX=full``, about 20 s each); their rules are checked here without a run;
* refused by name with every key classified: the config catalog (``semantics.unsupported``) or the planner
  (``plan.megatron-lacks``: what megatron-core cannot build), and ``mapgen emit`` writes nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from semantics_matrix import ATOL, build, run_case

from mapgen.catalog import check_config
from mapgen.errors import MapgenError
from mapgen.infer import scan
from mapgen.plan.planner import plan

FULL = os.environ.get("MAPGEN_MATRIX") == "full"


def _built(tmp_path: Path, model_type: str, **overrides: object) -> Path:
    ckpt = tmp_path / model_type
    build(model_type, ckpt, overrides=dict(overrides))
    return ckpt


def _rules(ckpt: Path) -> dict[str, tuple[tuple[str, ...], str, dict[str, object]]]:
    layout = scan(str(ckpt))
    assert not layout.unclassified
    return {r.megatron.removeprefix("decoder.layers.{layer}."): (r.hf, r.op, dict(r.options))
            for r in plan(layout).rules}


# -- verified ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("model_type", [
    "nemotron",
    *(pytest.param(m, marks=pytest.mark.skipif(not FULL, reason="opt-in: MAPGEN_MATRIX=full (about 20 s each)"))
      for m in ("arcee", "exaone", "jais2", "granitemoe", "granitemoeshared", "hyperclovax", "sarvam_moe",
                "ministral", "exaone_moe")),
])
def test_verifies_at_tp2(tmp_path: Path, model_type: str) -> None:
    # HyperCLOVA X without its post_norm1/post_norm2 (use_post_norm false; with them: refused below)
    case = run_case(model_type, tmp_path, overrides={"use_post_norm": False} if model_type == "hyperclovax" else None)
    assert case.outcome == "verified", case.row()
    assert case.max_diff is not None
    assert case.max_diff <= ATOL


def test_plain_up_down_rules(tmp_path: Path) -> None:
    """Arcee/Jais2/Nemotron: up_proj -> act -> down_proj is megatron-core's non-gated MLP; Jais2's biases and
    LayerNorms, Nemotron's zero-centred LayerNorm (LayerNorm1P: weight + 1) are facts of the bridge."""
    for model_type, layernorm, zero_centered, biases in (("arcee", False, False, False), ("jais2", True, False, True),
                                                          ("nemotron", True, True, False)):
        ckpt = _built(tmp_path, model_type)
        layout = scan(str(ckpt))
        bridge = plan(layout)
        assert bridge.facts.non_gated_mlp, model_type
        assert (bridge.facts.layernorm, bridge.facts.zero_centered) == (layernorm, zero_centered), model_type
        rules = {r.megatron.removeprefix("decoder.layers.{layer}."): r for r in bridge.rules}
        fc1 = rules["mlp.linear_fc1.weight"]
        assert (fc1.hf, fc1.op, fc1.sharding) == (("model.layers.{layer}.mlp.up_proj.weight",), "copy", "column")
        assert rules["mlp.linear_fc2.weight"].hf == ("model.layers.{layer}.mlp.down_proj.weight",)
        assert ("mlp.linear_fc1.bias" in rules) == biases, model_type


def test_a_missing_gate_is_not_a_plain_mlp(tmp_path: Path) -> None:
    """A Llama whose gate_proj is missing is refused by name, never converted as down(act(up(x)))."""
    ckpt = _built(tmp_path, "llama")
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "gate_proj" not in k}
    index_path.write_text(json.dumps(index))
    layout = scan(str(ckpt), headers=False)
    assert not layout.unclassified
    with pytest.raises(MapgenError) as err:
        plan(layout)
    (diag,) = err.value.diagnostics
    assert diag.code == "plan.unsupported"
    assert "Facts.plain_up_down" in diag.message
    assert diag.key == "model.layers.{layer}.mlp.up_proj.weight"


def test_exaone_rules(tmp_path: Path) -> None:
    """EXAONE-3: Llama's maths under transformer.h.N (ln_1/ln_2, attn.attention.out_proj, c_fc_0 = gate,
    c_fc_1 = up, c_proj = down), all nn.Linear [out, in] (not GPT-2's Conv1D)."""
    rules = _rules(_built(tmp_path, "exaone"))
    hf, op, _ = rules["mlp.linear_fc1.weight"]
    assert (hf, op) == (("transformer.h.{layer}.mlp.c_fc_0.weight", "transformer.h.{layer}.mlp.c_fc_1.weight"),
                        "gated_fc1")
    hf, op, options = rules["mlp.linear_fc2.weight"]
    assert (hf, op, options) == (("transformer.h.{layer}.mlp.c_proj.weight",), "copy", {})
    assert rules["self_attention.linear_proj.weight"][0] == ("transformer.h.{layer}.attn.attention.out_proj.weight",)
    assert rules["embedding.word_embeddings.weight"][0] == ("transformer.wte.weight",)


def test_granitemoe_rules(tmp_path: Path) -> None:
    """GraniteMoE: packed experts [E, 2I, H] (gate then up) right under block_sparse_moe, router.layer."""
    rules = _rules(_built(tmp_path, "granitemoe"))
    hf, op, options = rules["mlp.experts.local_experts.{expert}.linear_fc1.weight"]
    assert (hf, op) == (("model.layers.{layer}.block_sparse_moe.input_linear.weight",), "expert_fc1")
    assert options == {"layout": "packed", "orientation": "out_in", "interleave": False}
    assert rules["mlp.router.weight"][0] == ("model.layers.{layer}.block_sparse_moe.router.layer.weight",)


def test_sarvam_moe_rules(tmp_path: Path) -> None:
    """Sarvam-MoE: attention.query_key_value is [q; k; v] blocks by its model type (GPT-NeoX's same root and spelling
    is per head), query/key_layernorm before RoPE, gate.expert_bias as the score-correction bias."""
    rules = _rules(_built(tmp_path, "sarvam_moe"))
    hf, op, options = rules["self_attention.linear_qkv.weight"]
    assert (hf, op, options["layout"]) == (("model.layers.{layer}.attention.query_key_value.weight",), "qkv", "blocks")
    assert rules["self_attention.q_layernorm.weight"][0] == ("model.layers.{layer}.attention.query_layernorm.weight",)
    assert rules["mlp.router.expert_bias"][0] == ("model.layers.{layer}.mlp.gate.expert_bias",)


def test_granitemoeshared_shared_mlp_rules(tmp_path: Path) -> None:
    """GraniteMoeShared's shared_mlp sits beside block_sparse_moe, at the layer's root: input_linear is a fused
    [gate; up] (chunk(2)), output_linear the down projection; its size is shared_intermediate_size."""
    rules = _rules(_built(tmp_path, "granitemoeshared", shared_intermediate_size=32))
    hf, op, options = rules["mlp.shared_experts.linear_fc1.weight"]
    assert (hf, op, options) == (("model.layers.{layer}.shared_mlp.input_linear.weight",), "gated_fc1", {"fused": True})
    assert rules["mlp.shared_experts.linear_fc2.weight"][0] == ("model.layers.{layer}.shared_mlp.output_linear.weight",)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not FULL, reason="opt-in: MAPGEN_MATRIX=full (about 20 s)")
def test_granitemoeshared_with_shared_mlp_verifies(tmp_path: Path) -> None:
    case = run_case("granitemoeshared", tmp_path, overrides={"shared_intermediate_size": 32})
    assert case.outcome == "verified", case.row()


# -- refused by name ----------------------------------------------------------------------------------------------
# model_type -> (catalog error keys, planner plan.megatron-lacks keys; None: the plan succeeds)
REFUSED: dict[str, tuple[set[str], set[str] | None]] = {
    "glm4": ({"model_type.interleaved-rope", "model_type.post-norm-block"},
             {"model.layers.{layer}.post_self_attn_layernorm.weight"}),
    "hyperclovax": (set(), {"model.layers.{layer}.post_norm1.weight"}),
    "bitnet": (set(), {"model.layers.{layer}.self_attn.attn_sub_norm.weight",
                       "model.layers.{layer}.mlp.ffn_sub_norm.weight"}),
    "diffllama": (set(), {"model.layers.{layer}.self_attn.lambda_q1"}),
    "minimax": ({"block_size"}, {"model.layers.{layer}.self_attn.output_gate.weight"}),
    "jetmoe": ({"kv_channels"}, {"model.layers.{layer}.mlp.bias",
                                 "model.layers.{layer}.self_attention.experts.router.layer.weight"}),
    "phimoe": ({"model_type.sparsemixer-router"}, None),
    "olmo": ({"model_type.non-parametric-layernorm"}, {"(no final norm tensor)", "model.layers.{layer}."}),
    "exaone4": (set(), {"model.layers.{layer}.post_attention_layernorm.weight"}),  # post-norm (OLMo-2 style)
    "gemma3_text": ({"model_type.embedding-scale", "model_type.post-norm-block", "model_type.zero-centred-norms",
                     "rope_parameters.full_attention", "rope_parameters.sliding_attention"},
                    {"model.layers.{layer}.input_layernorm.weight"}),
    "apertus": ({"hidden_act"}, {"model.layers.{layer}.mlp.act_fn.alpha_p"}),  # xIELU with learned parameters
    "nanochat": ({"final_logit_softcapping"}, {"(no final norm tensor)", "model.layers.{layer}."}),
    "hunyuan_v1_dense": (set(), {"model.layers.{layer}.self_attn.query_layernorm.weight"}),  # QK norm after RoPE
    "hunyuan_v1_moe": (set(), {"model.layers.{layer}.self_attn.query_layernorm.weight"}),
    "gpt_neo": ({"attention_layers", "attention_types", "num_heads", "num_layers", "window_size",
                 "model_type.unscaled-attention"}, None),
    "openai-gpt": ({"afn", "model_type.post-layernorm-block"},
                   {"(no final norm tensor)", "transformer.h.{layer}.ln_1.weight"}),  # GPT-1: post-LN, no final norm
    "kolibri1": ({"norm_topk_prob"}, {"model.layers.{layer}.post_attn_norm.weight"}),  # GLM-4-style output norms
    "flint": ({"model_type.nope-full-attention-layers"}, None),  # sinks (softmax_offset) classified; NoPE refused
    "cohere": ({"logit_scale", "model_type.interleaved-rope", "model_type.layernorm", "model_type.parallel-block"},
               {"model.layers.{layer}.input_layernorm.weight"}),
    "vaultgemma": ({"attn_logit_softcapping", "final_logit_softcapping", "model_type.embedding-scale",
                    "model_type.zero-centred-norms"}, None),
    # MiniMax-M2: RMSNorm(num_heads * head_dim) QK norms; e_score_correction_bias beside gate.weight is classified
    "minimax_m2": ({"model_type.qk-norm-over-all-heads"}, {"model.layers.{layer}.self_attn.q_norm.weight"}),
}


def test_exaone_moe_rules_and_nope_layers(tmp_path: Path) -> None:
    """EXAONE-MoE: DeepSeek-V3's router with mlp.e_score_correction_bias beside gate.weight; RoPE only on the
    sliding-window layers once a window is set (its full-attention layers are NoPE: megatron-core no_rope_freq)."""
    from mapgen.contract.hf_config import HFConfig, no_rope_layers

    ckpt = _built(tmp_path, "exaone_moe", layer_types=["sliding_attention", "full_attention"])
    config = json.loads((ckpt / "config.json").read_text())
    assert check_config(config, file="config.json").ok
    assert no_rope_layers(HFConfig(config)) == (False, True)
    assert no_rope_layers(HFConfig(config | {"sliding_window": None})) == ()  # no window: RoPE everywhere
    rules = _rules(ckpt)
    assert rules["mlp.router.expert_bias"][0] == ("model.layers.{layer}.mlp.e_score_correction_bias",)
    with pytest.raises(MapgenError) as err:
        no_rope_layers(HFConfig(config | {"layer_types": ["sliding_attention"]}))
    assert err.value.diagnostics[0].code == "config.layer-type-mismatch"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not FULL, reason="opt-in: MAPGEN_MATRIX=full (about 30 s)")
def test_exaone_moe_with_a_nope_layer_verifies(tmp_path: Path) -> None:
    case = run_case("exaone_moe", tmp_path, overrides={"layer_types": ["sliding_attention", "full_attention"]})
    assert case.outcome == "verified", case.row()
    assert case.max_diff is not None
    assert case.max_diff <= ATOL


def test_biogpt_rules_and_refusals(tmp_path: Path) -> None:
    """BioGPT: OPT's pre-LN block under biogpt. (final norm layer_norm, positions at + 2, tied head); refused by name
    for its embedding scale and for a layer_norm_eps its modelling code never reads (nn.LayerNorm's 1e-5)."""
    ckpt = _built(tmp_path, "biogpt")
    report = check_config(json.loads((ckpt / "config.json").read_text()), file="config.json")
    assert {(d.code, d.key) for d in report.errors} == {("semantics.unsupported", "scale_embedding"),
                                                        ("semantics.unsupported", "layer_norm_eps")}
    layout = scan(str(ckpt))
    bridge = plan(layout)
    assert bridge.facts.layernorm
    rules = {r.megatron: r for r in bridge.rules}
    pos = rules["embedding.position_embeddings.weight"]
    assert (pos.hf, dict(pos.options)) == (("biogpt.embed_positions.weight",), {"roll": 2})
    assert rules["decoder.final_layernorm.bias"].hf == ("biogpt.layer_norm.bias",)
    ok = json.loads((ckpt / "config.json").read_text()) | {"scale_embedding": False, "layer_norm_eps": 1e-5}
    assert check_config(ok, file="config.json").ok


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not FULL, reason="opt-in: MAPGEN_MATRIX=full (about 20 s)")
def test_biogpt_without_embedding_scale_verifies(tmp_path: Path) -> None:
    case = run_case("biogpt", tmp_path, overrides={"scale_embedding": False, "layer_norm_eps": 1e-5})
    assert case.outcome == "verified", case.row()
    assert case.max_diff is not None
    assert case.max_diff <= ATOL


# model_type -> catalog keys naming what megatron-core lacks; scan does not reach these yet (XGLM/MPT sizes under
# d_model/n_heads, CTRL's transformer.w / multi_head_attention.Wq names); ERNIE-4.5-MoE's keys are all classified
# (test_ernie_moe_statics_bias_is_classified_and_refused)
CATALOG_ONLY: dict[str, set[str]] = {
    "mpt": {"model_type.alibi", "attn_config"},
    "ctrl": {"model_type.sinusoidal-positions", "model_type.embedding-scale", "dff"},
    "xglm": {"model_type.sinusoidal-positions", "scale_embedding", "attention_heads"},
}


@pytest.mark.parametrize("model_type", sorted(CATALOG_ONLY))
def test_classic_decoders_refusals_name_the_blocker(tmp_path: Path, model_type: str) -> None:
    ckpt = _built(tmp_path, model_type)
    report = check_config(json.loads((ckpt / "config.json").read_text()), file="config.json")
    assert {d.code for d in report.errors} == {"semantics.unsupported"}, [d.key for d in report.errors]
    assert CATALOG_ONLY[model_type] <= {d.key for d in report.errors}


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_by_name(tmp_path: Path, model_type: str) -> None:
    catalog_keys, lacks = REFUSED[model_type]
    ckpt = _built(tmp_path, model_type)
    report = check_config(json.loads((ckpt / "config.json").read_text()), file="config.json")
    assert {d.key for d in report.errors} == catalog_keys
    # each names its key: a semantic gap, or a key the catalog does not know (HY-V3's MoE switches)
    assert all(d.code in ("semantics.unsupported", "config.unknown-field") for d in report.errors)
    layout = scan(str(ckpt))
    assert not layout.unclassified  # every key has a family, even the ones megatron-core cannot build
    if lacks is None:
        plan(layout)
        return
    with pytest.raises(MapgenError) as err:
        plan(layout)
    assert {d.key for d in err.value.diagnostics if d.code == "plan.megatron-lacks"} == lacks
    assert all("megatron-core" in d.message for d in err.value.diagnostics)


def test_gpt_neox_japanese_last_layer_bias_is_refused(tmp_path: Path) -> None:
    """GPT-NeoX-Japanese adds attention.dense_bias in its last layer only: megatron-core's add_bias_linear is one
    switch for every layer, so the layout is refused by name (and intermediate_multiple_size by the catalog)."""
    ckpt = _built(tmp_path, "gpt_neox_japanese")
    report = check_config(json.loads((ckpt / "config.json").read_text()), file="config.json")
    assert {d.key for d in report.errors} == {"intermediate_multiple_size"}
    layout = scan(str(ckpt))
    assert not layout.unclassified
    with pytest.raises(MapgenError) as err:
        plan(layout)
    (diag,) = err.value.diagnostics
    assert "add_bias_linear" in diag.message


@pytest.mark.parametrize("model_type", ["bamba", "jamba", "granitemoehybrid"])
def test_mamba_layers_are_classified_and_refused(tmp_path: Path, model_type: str) -> None:
    """Hybrid Mamba stacks (Mamba-2 style Bamba, Mamba-1 Jamba with x_proj/dt_proj and dt/B/C norms): every key of
    the tiny twin has a family, the planner refuses the Mamba layers by name."""
    layout = scan(str(_built(tmp_path, model_type)))
    assert not layout.unclassified
    assert {g.mixer.family for g in layout.language_model.groups} == {"mamba"}
    with pytest.raises(MapgenError) as err:
        plan(layout)
    assert {d.key for d in err.value.diagnostics} == {"model.layers.{layer}.mamba.in_proj.weight"}
    assert all("MambaModel" in d.message for d in err.value.diagnostics)


# model_type -> catalog keys that name the blocker (every other key of the tiny twin is mapped, inert or refused)
BLOCKERS: dict[str, set[str]] = {
    "bamba": {"mamba_d_conv", "mamba_d_state", "mamba_n_heads"},  # Mamba-2 layers (attn_layer_indices: null)
    "jamba": {"mamba_d_conv", "mamba_dt_rank", "attn_layer_period"},  # expert_layer_period/offset: keys decide
    "granitemoehybrid": {"mamba_d_conv", "position_embedding_type"},  # null: NoPE attention
    "laguna": {"gating", "rope_parameters.full_attention"},  # softplus g_proj gate, per-layer-type RoPE
    "falcon_h1": {"mamba_d_ssm", "mamba_d_state"},  # Mamba-2 beside attention; its muP multipliers are 1.0 here
    "olmo_hybrid": {"linear_allow_neg_eigval"},  # beta = 2 * sigmoid(b); the init ranges are inert
}


@pytest.mark.parametrize("model_type", sorted(BLOCKERS))
def test_refusal_names_the_blocker_not_an_unknown_key(tmp_path: Path, model_type: str) -> None:
    """The hybrid/MoE families the triage classified: every config key is in the catalog, so the refusal names
    what megatron-core lacks (semantics.unsupported), never config.unknown-field."""
    ckpt = _built(tmp_path, model_type)
    report = check_config(json.loads((ckpt / "config.json").read_text()), file="config.json")
    assert {d.code for d in report.errors} == {"semantics.unsupported"}, [d.key for d in report.errors]
    assert BLOCKERS[model_type] <= {d.key for d in report.errors}


def test_afmoe_catalog_passes_and_planner_refuses(tmp_path: Path) -> None:
    """AFMoE's config is all known (global_attn_every_n_layers only derives layer_types; mup_enabled false): the
    planner names the blockers (sandwich norms, the separate attention gate)."""
    ckpt = _built(tmp_path, "afmoe")
    assert check_config(json.loads((ckpt / "config.json").read_text()), file="config.json").ok
    scale = check_config(json.loads((ckpt / "config.json").read_text()) | {"mup_enabled": True}, file="config.json")
    assert {d.key for d in scale.errors} == {"mup_enabled"}


def test_afmoe_is_classified_and_refused(tmp_path: Path) -> None:
    """AFMoE: a sandwich block (post_attention_layernorm on the attention output, pre_mlp/post_mlp_layernorm around
    the MLP) and a separate sigmoid output gate on attention: every key classified, both refused by name."""
    layout = scan(str(_built(tmp_path, "afmoe")))
    assert not layout.unclassified
    with pytest.raises(MapgenError) as err:
        plan(layout)
    codes = {(d.code, d.key) for d in err.value.diagnostics}
    assert ("plan.unsupported", "model.layers.{layer}.self_attn.gate_proj.weight") in codes
    assert any(code == "plan.megatron-lacks" and "pre_mlp_layernorm" in d.message
               for d in err.value.diagnostics for code in (d.code,))


def test_laguna_gate_is_classified_and_refused(tmp_path: Path) -> None:
    """Laguna: a softplus output gate g_proj beside attention and the score-correction bias under experts.:
    classified, the gate refused by name (megatron-core's output gate is a sigmoid read from linear_qkv)."""
    layout = scan(str(_built(tmp_path, "laguna")))
    assert not layout.unclassified
    with pytest.raises(MapgenError) as err:
        plan(layout)
    assert {(d.code, d.key) for d in err.value.diagnostics} == {
        ("plan.unsupported", "model.layers.{layer}.self_attn.g_proj.weight")}


def test_axk1_post_mlp_norm_is_classified_and_refused(tmp_path: Path) -> None:
    """A.X-K1 stores post_mlp_layernorm beside its MoE layers: the block is classified and refused by name."""
    layout = scan(str(_built(tmp_path, "axk1")))
    assert not layout.unclassified
    assert {g.block.variant for g in layout.language_model.groups} == {"pre_norm", "pre_norm_mlp_output"}
    with pytest.raises(MapgenError) as err:
        plan(layout)
    assert any("post_mlp_layernorm" in d.message for d in err.value.diagnostics if d.code == "plan.megatron-lacks")


def test_refused_emit_writes_nothing(tmp_path: Path) -> None:
    from mapgen.cli import main as mapgen_main

    ckpt = _built(tmp_path, "bitnet")
    out = tmp_path / "out" / "generated"
    assert mapgen_main(["emit", str(ckpt), "--out", str(out)]) != 0
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no temp dir left beside it


# -- breadth-d: composite configs, ERNIE-4.5-MoE's [1, E] bias, HY-V3's router scale ---------------------------
def test_matrix_builder_shrinks_nested_configs(tmp_path: Path) -> None:
    """Qwen3.5 (vision + text): the sizes live in text_config and vision_config; the builder shrinks both and saves
    the composite as releases store it (Qwen3_5ForConditionalGeneration: model.language_model. + model.visual.; the
    causal-LM class would save the text model alone), and scan carries the vision tower through."""
    ckpt = _built(tmp_path, "qwen3_5")
    config = json.loads((ckpt / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]) == (64, 2, 128)
    assert text["layer_types"] == ["linear_attention", "full_attention"]
    assert (vision["depth"], vision["out_hidden_size"]) == (2, 64)
    layout = scan(str(ckpt))
    assert not layout.unclassified
    assert layout.language_model.prefix == "model.language_model."
    assert [(t.prefix, t.num_keys) for t in layout.towers] == [("model.visual.", 33)]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not FULL, reason="opt-in: MAPGEN_MATRIX=full (about 30 s each)")
@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe"])
def test_composite_qwen3_5_verifies(tmp_path: Path, model_type: str) -> None:
    case = run_case(model_type, tmp_path)
    assert case.outcome == "verified", case.row()
    assert case.max_diff is not None
    assert case.max_diff <= ATOL


def test_ernie_moe_statics_bias_is_classified_and_refused(tmp_path: Path) -> None:
    """ERNIE-4.5-MoE: moe_statics.e_score_correction_bias [1, E] is the router's score-correction bias (copy with
    leading_unit: [1, E] <-> [E], bitwise both ways: tests/ops/test_inverse.py); ERNIE adds it to *softmax*
    probabilities for the selection, which megatron-core's router does not do (expert_bias with sigmoid scores
    only): the planner refuses it by name and emit writes nothing. The catalog accepts the rest of its config:
    ``moe_k`` / ``moe_num_experts`` are read spellings, its interleaved RoPE is megatron-core's rotary_interleaved."""
    from mapgen.cli import main as mapgen_main

    ckpt = _built(tmp_path, "ernie4_5_moe")
    report = check_config(json.loads((ckpt / "config.json").read_text()), file="config.json")
    assert report.ok, [d.key for d in report.errors]
    layout = scan(str(ckpt))
    assert not layout.unclassified
    with pytest.raises(MapgenError) as err:
        plan(layout)
    (diag,) = err.value.diagnostics
    assert diag.code == "plan.megatron-lacks"
    assert diag.key == "model.layers.{layer}.mlp.moe_statics.e_score_correction_bias"
    assert "softmax" in diag.message
    assert "sigmoid scores only" in diag.message
    out = tmp_path / "out" / "generated"
    assert mapgen_main(["emit", str(ckpt), "--out", str(out)]) != 0
    assert not out.exists()


def _bias_expert_selection(ckpt: Path) -> None:
    """Give the score-correction biases (buffers: perturb leaves them zero) values that change which experts are
    selected (on the tiny HY-V3 twin they move transformers' logits by about 0.55)."""
    import torch
    from safetensors.torch import load_file, save_file

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    gen = torch.Generator().manual_seed(7)
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(ckpt / shard))
        hits = [k for k in tensors if k.endswith(("e_score_correction_bias", "expert_bias"))]
        for k in hits:
            tensors[k] = (torch.randn(tensors[k].shape, generator=gen) * 0.5).to(tensors[k].dtype)
        if hits:
            save_file(tensors, str(ckpt / shard), metadata={"format": "pt"})


def test_hy_v3_router_scale_is_megatron_topk_scaling(tmp_path: Path) -> None:
    """HY-V3's router (sigmoid, score-correction bias for the selection, always renormalised, times
    router_scaling_factor) is megatron-core's sigmoid router with moe_router_topk_scaling_factor; transformers'
    default scale (2.826) travels with the bridge when config.json leaves it out; top-1 is refused by name
    (megatron-core does not renormalise a single score); a router that never reads the key leaves it inert, and one
    mapgen does not know keeps the refusal."""
    from mapgen.contract.config import model_spec
    from mapgen.contract.hf_config import HFConfig

    ckpt = _built(tmp_path, "hy_v3")
    config = json.loads((ckpt / "config.json").read_text())
    assert config["router_scaling_factor"] == 2.826
    assert check_config(config, file="config.json").ok
    layout = scan(str(ckpt))
    bridge = plan(layout)
    assert (bridge.facts.router, bridge.facts.default_router_scaling_factor) == ("sigmoid_renorm", 2.826)
    for cfg, scale in ((config, 2.826), ({k: v for k, v in config.items() if k != "router_scaling_factor"}, 2.826),
                       (config | {"router_scaling_factor": 1.0}, None)):
        spec = model_spec(HFConfig(cfg), layout, bridge.facts)
        assert (spec.moe_router_score_function, spec.moe_router_topk_scaling_factor) == ("sigmoid", scale)
        assert spec.moe_router_enable_expert_bias
    top1 = check_config(config | {"num_experts_per_tok": 1}, file="config.json")
    assert {d.key for d in top1.errors} == {"num_experts_per_tok"}
    unknown = check_config(json.loads((_built(tmp_path, "qwen2_moe")).joinpath("config.json").read_text())
                           | {"router_scaling_factor": 2.0}, file="config.json")
    assert "router_scaling_factor" not in {d.key for d in unknown.errors}  # Qwen2-MoE's router never reads it
    from mapgen.contract.routing import routing

    _, gaps = routing("", {"router_scaling_factor": 2.0}.get, topk=2)
    assert [g.key for g in gaps] == ["router_scaling_factor"]


@pytest.mark.slow
@pytest.mark.distributed
def test_hy_v3_verifies_with_biased_selection(tmp_path: Path) -> None:
    """HY-V3 at TP=2 x EP=2 with score-correction biases that change the selection and its default scale 2.826."""
    case = run_case("hy_v3", tmp_path, post_build=_bias_expert_selection)
    assert case.outcome == "verified", case.row()
    assert case.max_diff is not None
    assert case.max_diff <= ATOL


# -- breadth-d: the hybrid rows classify every key and name their blocker ----------------------------------------
# model_type -> (mixer family, variant) of its first layer group, and the (code, key) the planner refuses
HYBRIDS: dict[str, tuple[tuple[str, str], set[tuple[str, str]]]] = {
    # Falcon-H1: Mamba-2 and attention side by side in every layer (the attention is the Mamba component's child)
    "falcon_h1": (("mamba", "mamba2"), {("plan.unsupported", "model.layers.{layer}.mamba.in_proj.weight")}),
    # OLMo-Hybrid: flash-linear-attention's gated delta-net names; its attention layers are OLMo-3 post-norm blocks
    # with QK norms over the whole projection (attention_layer_norm / feedforward_layer_norm: its own norm names)
    "olmo_hybrid": (("gated_delta_net", "separate"), {
        ("plan.unsupported", "model.layers.{layer}.linear_attn.q_proj.weight"),
        ("plan.megatron-lacks", "model.layers.{layer}.self_attn.q_norm.weight"),
        ("plan.megatron-lacks", "model.layers.{layer}.feedforward_layer_norm.weight")}),
    # DeepSeek-V3.2: MLA with the sparse-attention indexer (layer_types indexed_attention); the catalog refuses it too
    "deepseek_v32": (("mla", "q_low_rank"),
                     {("plan.unsupported", "model.layers.{layer}.self_attn.indexer.wq_b.weight")}),
}


@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_hybrid_layers_are_classified_and_refused(tmp_path: Path, model_type: str) -> None:
    (family, variant), refusals = HYBRIDS[model_type]
    layout = scan(str(_built(tmp_path, model_type)))
    assert not layout.unclassified
    first = layout.language_model.groups[0].mixer
    assert (first.family, first.variant) == (family, variant)
    with pytest.raises(MapgenError) as err:
        plan(layout)
    assert {(d.code, d.key) for d in err.value.diagnostics} == refusals


def test_falcon_h1_attention_is_the_mamba_layers_child(tmp_path: Path) -> None:
    """Falcon-H1: self_attn.* beside mamba.* in one layer is classified as one mixer (Mamba + parallel attention),
    never left over; emit refuses it and writes nothing."""
    from mapgen.cli import main as mapgen_main

    ckpt = _built(tmp_path, "falcon_h1")
    layout = scan(str(ckpt))
    (group,) = layout.language_model.groups
    attention = group.mixer.child("attention")
    assert attention is not None
    assert attention.family == "attention"
    assert attention.key("q") == "self_attn.q_proj.weight"
    out = tmp_path / "out" / "generated"
    assert mapgen_main(["emit", str(ckpt), "--out", str(out)]) != 0
    assert not out.exists()


def test_axk2_keys_are_classified_and_refused(tmp_path: Path) -> None:
    """A.X-K2: gated RMSNorms (norm + low-rank W_down/W_up gate), MLA with the sparse-attention indexer and a gated q
    projection (q_b_proj [heads * (qk_head_dim + v_head_dim), 2 * q_lora_rank], declared by the model type), a
    DeepSeek-V3 MoE: every key classified and sized; each refused by name, the catalog names gated_norm_rank."""
    ckpt = _built(tmp_path, "axk2")
    report = check_config(json.loads((ckpt / "config.json").read_text()), file="config.json")
    assert {"gated_norm_rank", "index_n_heads"} <= {d.key for d in report.errors}
    assert {d.code for d in report.errors} == {"semantics.unsupported"}
    layout = scan(str(ckpt))
    assert not layout.unclassified
    assert {g.block.variant for g in layout.language_model.groups} == {"gated_pre_norm"}
    with pytest.raises(MapgenError) as err:
        plan(layout)
    assert {(d.code, d.key) for d in err.value.diagnostics} == {
        ("plan.megatron-lacks", "model.layers.{layer}.input_layernorm.norm.weight"),
        ("plan.megatron-lacks", "model.layers.{layer}.self_attn.q_b_proj.weight"),
        ("plan.unsupported", "model.layers.{layer}.self_attn.indexer.wq_b.weight")}


def test_lara_mini_rules_and_nope_layers(tmp_path: Path) -> None:
    """Lara-mini: its checkpoints' one in_proj holds [q|k|v|z|b|a] as whole blocks (gdn_in_proj variant blocks) with
    out_norm; RoPE on the sliding_attention layers only (full_attention layers are NoPE, whatever the window)."""
    from mapgen.contract.hf_config import HFConfig, no_rope_layers

    ckpt = _built(tmp_path, "lara_mini", layer_types=["linear_attention", "full_attention"])
    rules = _rules(ckpt)
    hf, op, options = rules["self_attention.in_proj.weight"]
    assert (hf, op, options) == (("model.layers.{layer}.linear_attn.in_proj.weight",), "gdn_in_proj",
                                 {"variant": "blocks"})
    assert rules["self_attention.out_norm.weight"][0] == ("model.layers.{layer}.linear_attn.out_norm.weight",)
    config = json.loads((ckpt / "config.json").read_text())
    assert no_rope_layers(HFConfig(config)) == (True, True)  # a gated delta-net layer reads no RoPE either
    mixed = config | {"layer_types": ["sliding_attention", "full_attention"]}
    assert no_rope_layers(HFConfig(mixed)) == (False, True)
    assert no_rope_layers(HFConfig(mixed | {"sliding_window": None})) == (False, True)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not FULL, reason="opt-in: MAPGEN_MATRIX=full (about 20 s each)")
@pytest.mark.parametrize("layer_types", [["linear_attention", "sliding_attention"],
                                         ["full_attention", "sliding_attention"]])
def test_lara_mini_verifies(tmp_path: Path, layer_types: list[str]) -> None:
    """At TP=2 x EP=2; without the NoPE rule the second case's emit proof diverges (emit.numerics-diverged)."""
    case = run_case("lara_mini", tmp_path, overrides={"layer_types": layer_types})
    assert case.outcome == "verified", case.row()
    assert case.max_diff is not None
    assert case.max_diff <= ATOL
