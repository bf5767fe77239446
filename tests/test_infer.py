"""mapgen.infer: the facts of every corpus case, shape/config tie-breaking, MTP schemes, cross-checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from scan_support import (
    ALL_CASES,
    case_dir,
    tiny_config,
    tiny_dense,
    write_checkpoint,
    write_metadata,
)

from mapgen.errors import MapgenError
from mapgen.infer import compress_keys, infer, layer_pattern, scan
from mapgen.infer.patterns import describe_positions
from mapgen.ir import Component, layout_from_json, layout_to_json
from mapgen.source import read_source

# case -> (layers, layer pattern, moe layers, experts, expert layout, shared, mtp depth, mtp scheme,
#          mtp expert layout, tied, towers)
FACTS: dict[str, tuple[Any, ...]] = {
    "gpt-oss-20b": (24, "24 layers = 12 sliding-window attention + 12 attention (every 2nd)", 24, 32, "packed",
                    False, 0, "none", "none", False, ()),
    "llama-3.2-3b-instruct": (28, "28 layers, all attention", 0, 0, "none", False, 0, "none", "none", True, ()),
    "llava-v1.5-7b": (32, "32 layers, all attention", 0, 0, "none", False, 0, "none", "none", False,
                      ("projector", "derived_rope_buffers")),
    "mimo-7b": (36, "36 layers, all attention", 0, 0, "none", False, 1, "mtp_layers", "none", False, ()),
    "internlm2-chat-7b-intermind": (32, "32 layers, all attention", 0, 0, "none", False, 0, "none", "none", False,
                                    ()),
    "phi-4": (40, "40 layers, all attention", 0, 0, "none", False, 0, "none", "none", False, ()),
    "stable-code-3b-stablelm": (32, "32 layers, all attention", 0, 0, "none", False, 0, "none", "none", False, ()),
    "mixtral-8x7b-instruct-v0.1": (32, "32 layers, all attention", 32, 8, "per_expert", False, 0, "none", "none",
                                   False, ()),
    "qwen3-1.7b-mlx-bf16": (28, "28 layers, all attention", 0, 0, "none", False, 0, "none", "none", True, ()),
    "qwen2.5-vl-7b-instruct": (28, "28 layers, all attention", 0, 0, "none", False, 0, "none", "none", False,
                               ("vision",)),
    "qwen3-vl-30b-a3b": (48, "48 layers, all attention", 48, 128, "packed", False, 0, "none", "none", False,
                         ("vision",)),
    "qwen3.5-25b-reap-a3b-coding": (40, "40 layers = 30 gated-delta-net + 10 attention (every 4th)", 40, 180,
                                    "per_expert", True, 0, "none", "none", False, ()),
    "sakura-14b-qwen2.5": (48, "48 layers, all attention", 0, 0, "none", False, 0, "none", "none", False, ()),
    "hub-qwen3.5-35b-a3b": (40, "40 layers = 30 gated-delta-net + 10 attention (every 4th)", 40, 256,
                            "per_expert", True, 1, "mtp_block", "per_expert", False, ("vision",)),
    "hub-qwen3.6-35b-a3b": (40, "40 layers = 30 gated-delta-net + 10 attention (every 4th)", 40, 256,
                            "per_expert", True, 1, "mtp_block", "packed", False, ("vision",)),
}  # fmt: skip


@pytest.fixture(scope="module")
def layouts() -> dict[str, Any]:
    return {case: scan(str(case_dir(case))) for case in ALL_CASES}


def test_facts_cover_every_case() -> None:
    assert sorted(FACTS) == sorted(ALL_CASES)


@pytest.mark.parametrize("case", sorted(FACTS))
def test_case_facts(case: str, layouts: dict[str, Any]) -> None:
    s = layouts[case].summary
    got = (s.num_layers, s.layer_pattern, s.moe_layers, s.num_experts, s.expert_layout, s.shared_experts,
           s.mtp_depth, s.mtp_scheme, s.mtp_expert_layout, s.tied_embeddings, s.towers)  # fmt: skip
    assert got == FACTS[case]
    assert s.unclassified_keys == 0
    assert layouts[case].unclassified == ()
    assert layout_from_json(layout_to_json(layouts[case])) == layouts[case]


def _experts(mlp: Component) -> Component:
    experts = mlp.child("experts")
    assert experts is not None
    return experts


def test_reap_details(layouts: dict[str, Any]) -> None:
    lay = layouts["qwen3.5-25b-reap-a3b-coding"]
    lm = lay.language_model
    assert lm.prefix == "model.language_model."
    assert lm.lm_head == "lm_head.weight"
    assert [g.name for g in lm.groups] == ["linear_attention", "attention"]
    lin, att = lm.groups
    assert lin.mixer.family == "gated_delta_net"
    assert lin.mixer.key("in_proj_qkv") == "linear_attn.in_proj_qkv.weight"
    assert att.mixer.family == "attention"
    assert att.mixer.flag("output_gate")
    assert att.mixer.key("q_norm")
    assert str(att.layers) == "3,7,11,15,19,23,27,31,35,39"
    assert att.root == "model.language_model.layers.{layer}."
    assert att.mlp.family == "moe"
    assert _experts(att.mlp).key("gate") == "mlp.experts.{expert}.gate_proj.weight"
    shared = att.mlp.child("shared")
    assert shared is not None
    assert shared.key("gate") == "mlp.shared_expert_gate.weight"
    assert lm.mtp is None
    assert lay.summary.mtp_declared == 1
    assert [d.code for d in lay.diagnostics] == ["mtp.declared-absent"]


def test_gpt_oss_details(layouts: dict[str, Any]) -> None:
    lay = layouts["gpt-oss-20b"]
    g = lay.language_model.groups[0]
    assert g.mixer.family == "attention"
    assert g.mixer.key("sinks") == "self_attn.sinks"
    assert g.mixer.key("o_bias")
    assert g.mlp.family == "moe"
    assert g.mlp.key("router") == "mlp.router.weight"
    assert g.mlp.key("router_bias") == "mlp.router.bias"
    e = _experts(g.mlp)
    # MXFP4: the scan pairs gate_up_proj_blocks with gate_up_proj_scales and the model sees gate_up_proj, read
    # dequantized (tests/test_mxfp4.py)
    assert (e.flag("quant"), e.key("gate_up"), e.key("down"), e.key("gate_up_bias"), e.key("gate_up_blocks")) == (
        "none",
        "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj",
        "mlp.experts.gate_up_proj_bias",
        None,
    )
    assert (e.flag("orientation"), e.count("orientation_source"), e.flag("gate_up_interleave")) == (
        "in_out", "model_type_default", True)
    assert lay.quantization == "mxfp4"
    assert dict(lay.summary.attention) == {"attention": 12, "sliding_attention": 12}


def test_mixtral_names(layouts: dict[str, Any]) -> None:
    g = layouts["mixtral-8x7b-instruct-v0.1"].language_model.groups[0]
    assert g.mlp.family == "moe"
    assert g.mlp.key("router") == "block_sparse_moe.gate.weight"
    e = _experts(g.mlp)
    assert (e.key("gate"), e.key("up"), e.key("down")) == (
        "block_sparse_moe.experts.{expert}.w1.weight",
        "block_sparse_moe.experts.{expert}.w3.weight",
        "block_sparse_moe.experts.{expert}.w2.weight",
    )


def test_mimo_mtp(layouts: dict[str, Any]) -> None:
    mtp = layouts["mimo-7b"].language_model.mtp
    assert mtp is not None
    parts = mtp.parts
    assert (mtp.root, parts.key("enorm"), parts.key("hnorm"), parts.key("eh_proj"), parts.key("final_norm"),
            parts.flag("eh_proj_order"), mtp.shared) == (
        "model.mtp_layers.{layer}.", "token_layernorm.weight", "hidden_layernorm.weight", "input_proj.weight",
        "final_layernorm.weight", "hidden_embedding", False,
    )  # fmt: skip
    (inner,) = mtp.inner
    assert inner.mixer.family == "attention"
    assert inner.mixer.key("q_bias")
    assert inner.mlp.family == "dense_mlp"


def test_qwen3_vl_packed_and_tower(layouts: dict[str, Any]) -> None:
    lay = layouts["qwen3-vl-30b-a3b"]
    g = lay.language_model.groups[0]
    e = _experts(g.mlp)
    assert (e.key("gate_up"), e.flag("orientation")) == ("mlp.experts.gate_up_proj", "in_out")
    (tower,) = lay.towers
    assert (tower.name, tower.prefix, tower.num_keys) == ("vision", "model.visual.", 351)
    assert "model.visual.blocks.{0..26}.attn.qkv.weight" in tower.patterns


def test_qwen35_and_qwen36_differ_only_in_mtp_experts(layouts: dict[str, Any]) -> None:
    a, b = layouts["hub-qwen3.5-35b-a3b"], layouts["hub-qwen3.6-35b-a3b"]
    assert a.language_model.groups == b.language_model.groups
    assert a.towers == b.towers
    ma, mb = a.language_model.mtp, b.language_model.mtp
    assert ma is not None
    assert mb is not None
    assert (*(ma.parts.key(s) for s in ("enorm", "hnorm", "eh_proj", "final_norm")), ma.shared) == (
        "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.fc.weight", "mtp.norm.weight", True
    )  # fmt: skip
    (ia,), (ib,) = ma.inner, mb.inner
    assert ia.mixer == ib.mixer
    ea, eb = _experts(ia.mlp), _experts(ib.mlp)
    assert ia.mlp.child("shared") == ib.mlp.child("shared")
    assert ia.mlp.key("router") == ib.mlp.key("router")
    assert ea.flag("layout") == "per_expert"
    assert ea.key("gate") == "mlp.experts.{expert}.gate_proj.weight"
    assert eb.flag("layout") == "packed"
    assert eb.key("gate_up") == "mlp.experts.gate_up_proj"
    assert (eb.flag("orientation"), eb.count("orientation_source")) == ("out_in", "model_type_default")


# -- patterns --------------------------------------------------------------------------------------------------
def test_compress_keys() -> None:
    keys = [f"model.layers.{i}.foo.weight" for i in range(48)] + ["x.weight"]
    keys += [f"model.layers.{i}.mlp.experts.{e}.w1.weight" for i in (0, 1) for e in range(4)]
    assert compress_keys(keys) == [
        ("model.layers.{0..1}.mlp.experts.{0..3}.w1.weight", 8),
        ("model.layers.{0..47}.foo.weight", 48),
        ("x.weight", 1),
    ]
    assert compress_keys(["a.3.b", "a.5.b", "a.007.b"]) == [("a.007.b", 1), ("a.{3,5}.b", 2)]


def test_layer_pattern_text() -> None:
    assert describe_positions([3, 7, 11], 12) == "every 4th"
    assert describe_positions([0, 1, 2], 10) == "first 3"
    assert describe_positions([1, 4], 6) == "layers {1,4}"
    kinds = ["mla"] * 3 + ["attention"] * 5
    assert layer_pattern(kinds) == "8 layers = 5 attention + 3 mla (first 3)"


# -- synthetic checkpoints: the keys decide, shapes and config break ties ----------------------------------------
def _scan(tmp_path: Path, config: dict[str, Any], tensors: dict[str, tuple[int, ...]], **kw: Any) -> Any:
    write_checkpoint(tmp_path / "ck", config, {"model.safetensors": tensors}, **kw)
    return infer(read_source(str(tmp_path / "ck")))


def test_output_gate_from_shapes_beats_config(tmp_path: Path) -> None:
    gated = _scan(tmp_path / "a", tiny_config(), tiny_dense(gate=True))
    assert gated.language_model.groups[0].mixer.flag("output_gate")
    plain = _scan(tmp_path / "b", tiny_config(attn_output_gate=True), tiny_dense())
    assert not plain.language_model.groups[0].mixer.flag("output_gate")


def test_output_gate_from_config_without_shapes(tmp_path: Path) -> None:
    keys = list(tiny_dense())
    write_metadata(tmp_path / "a", tiny_config(model_type="qwen3_5_moe_text"), keys)
    assert scan(str(tmp_path / "a")).language_model.groups[0].mixer.flag("output_gate")
    write_metadata(tmp_path / "b", tiny_config(), keys)
    assert not scan(str(tmp_path / "b")).language_model.groups[0].mixer.flag("output_gate")


def _packed(in_out: bool, n_layers: int = 2, e: int = 4) -> dict[str, tuple[int, ...]]:
    t = tiny_dense(n_layers)
    for i in range(n_layers):
        p = f"model.layers.{i}.mlp."
        for k in ("gate_proj", "up_proj", "down_proj"):
            del t[f"{p}{k}.weight"]
        t[p + "gate.weight"] = (e, 8)
        t[p + "experts.gate_up_proj"] = (e, 8, 12) if in_out else (e, 12, 8)
        t[p + "experts.down_proj"] = (e, 6, 8) if in_out else (e, 8, 6)
    return t


@pytest.mark.parametrize("in_out", [True, False])
def test_packed_orientation_from_shapes(tmp_path: Path, in_out: bool) -> None:
    lay = _scan(tmp_path, tiny_config(model_type="mystery_moe", moe_intermediate_size=6), _packed(in_out))
    e = _experts(lay.language_model.groups[0].mlp)
    assert (e.flag("orientation"), e.count("orientation_source"), e.count("num_experts")) == (
        "in_out" if in_out else "out_in", "shapes", 4)


def test_packed_unknown_model_type_without_shapes_is_an_error(tmp_path: Path) -> None:
    write_metadata(tmp_path, tiny_config(model_type="mystery_moe", num_experts=4), list(_packed(True)))
    with pytest.raises(MapgenError) as exc:
        scan(str(tmp_path))
    assert {d.code for d in exc.value.diagnostics} == {"experts.orientation-unknown"}


def _per_expert(n_layers: int = 2, e: int = 4) -> dict[str, tuple[int, ...]]:
    t = tiny_dense(n_layers)
    for i in range(n_layers):
        p = f"model.layers.{i}.mlp."
        for k in ("gate_proj", "up_proj", "down_proj"):
            del t[f"{p}{k}.weight"]
        t[p + "gate.weight"] = (e, 8)
        for x in range(e):
            t[f"{p}experts.{x}.gate_proj.weight"] = (6, 8)
            t[f"{p}experts.{x}.up_proj.weight"] = (6, 8)
            t[f"{p}experts.{x}.down_proj.weight"] = (8, 6)
    return t


def test_expert_missing_in_one_layer_is_an_error(tmp_path: Path) -> None:
    keys = [k for k in _per_expert() if k != "model.layers.1.mlp.experts.2.up_proj.weight"]
    write_metadata(tmp_path, tiny_config(num_experts=4), keys)
    with pytest.raises(MapgenError) as exc:
        scan(str(tmp_path))
    (d,) = exc.value.diagnostics
    assert (d.code, d.key) == ("experts.missing", "model.layers.1.mlp.experts.2.up_proj.weight")


def test_expert_count_disagrees_with_config(tmp_path: Path) -> None:
    write_metadata(tmp_path, tiny_config(num_local_experts=8), list(_per_expert(e=4)))
    with pytest.raises(MapgenError) as exc:
        scan(str(tmp_path))
    assert {d.code for d in exc.value.diagnostics} == {"experts.missing"}


@pytest.mark.parametrize(
    ("override", "code"),
    [
        ({"num_hidden_layers": 3}, "config.layers-mismatch"),
        ({"layer_types": ["full_attention", "linear_attention"]}, "config.layer-type-mismatch"),
        ({"tie_word_embeddings": False}, "config.tie-mismatch"),
        ({"num_experts": 16}, "config.experts-declared-absent"),
    ],
)
def test_config_disagreements(tmp_path: Path, override: dict[str, Any], code: str) -> None:
    write_metadata(tmp_path, tiny_config(**override), list(tiny_dense(tied=True)))
    with pytest.raises(MapgenError) as exc:
        scan(str(tmp_path))
    assert code in {d.code for d in exc.value.diagnostics}


@pytest.mark.parametrize(
    ("extra_key", "config", "code"),
    [
        ("model.layers.0.self_attn.q_proj.scales", {}, "quant.mlx-unsupported"),
        ("model.layers.0.self_attn.q_proj.weight_scale_inv", {}, "quant.fp8-unsupported"),
        (None, {"quantization_config": {"quant_method": "fp8"}}, "quant.fp8-unsupported"),  # per-tensor FP8
        (None, {"quantization_config": {"quant_method": "gptq"}}, "quant.unsupported"),
        (None, {"quantization": {"group_size": 64, "bits": 4}}, "quant.mlx-unsupported"),
    ],
)
def test_quantized_checkpoints_are_refused(
    tmp_path: Path, extra_key: str | None, config: dict[str, Any], code: str
) -> None:
    keys = list(tiny_dense()) + ([extra_key] if extra_key else [])
    write_metadata(tmp_path, tiny_config(**config), keys)
    with pytest.raises(MapgenError) as exc:
        scan(str(tmp_path))
    assert [d.code for d in exc.value.diagnostics] == [code]
    assert "not supported" in exc.value.diagnostics[0].message


def test_unclassified_keys_are_listed_not_skipped(tmp_path: Path) -> None:
    keys = list(tiny_dense()) + [f"model.layers.{i}.foo.weight" for i in range(2)] + ["model.mystery"]
    write_metadata(tmp_path, tiny_config(), keys)
    lay = scan(str(tmp_path))
    assert [(u.pattern, u.count) for u in lay.unclassified] == [
        ("model.layers.{0..1}.foo.weight", 2),
        ("model.mystery", 1),
    ]
    assert lay.summary.unclassified_keys == 3


def test_incomplete_layer_is_unclassified(tmp_path: Path) -> None:
    """A layer missing o_proj is not a layer: every key of it is listed (never silently half-mapped)."""
    keys = [k for k in tiny_dense() if k != "model.layers.1.self_attn.o_proj.weight"]
    write_metadata(tmp_path, tiny_config(num_hidden_layers=2), keys)
    lay = scan(str(tmp_path))
    assert [str(g.layers) for g in lay.language_model.groups] == ["0"]
    assert sum(u.count for u in lay.unclassified) == 8
    assert all(u.pattern.startswith("model.layers.1.") for u in lay.unclassified)


def test_mtp_depth_disagrees_with_config(tmp_path: Path) -> None:
    mimo = case_dir("mimo-7b")
    cfg = json.loads((mimo / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 2
    keys = list(json.loads((mimo / "model.safetensors.index.json").read_text())["weight_map"])
    write_metadata(tmp_path, cfg, keys)
    with pytest.raises(MapgenError) as exc:
        scan(str(tmp_path))
    assert [d.code for d in exc.value.diagnostics] == ["config.mtp-depth-mismatch"]


def _deepseek_keys(n: int = 3, k_dense: int = 1, e: int = 4) -> list[str]:
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]

    def layer(i: int, moe: bool) -> list[str]:
        p = f"model.layers.{i}."
        out = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        out += [p + f"self_attn.{x}.weight" for x in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa",
                                                     "kv_a_layernorm", "kv_b_proj", "o_proj")]  # fmt: skip
        if moe:
            out += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
            out += [p + f"mlp.experts.{x}.{w}.weight" for x in range(e) for w in ("gate_proj", "up_proj", "down_proj")]
            out += [p + f"mlp.shared_experts.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
        else:
            out += [p + f"mlp.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
        return out

    for i in range(n):
        keys += layer(i, i >= k_dense)
    p = f"model.layers.{n}."
    keys += layer(n, True) + [p + x for x in ("enorm.weight", "hnorm.weight", "eh_proj.weight",
                                              "shared_head.norm.weight", "shared_head.head.weight",
                                              "embed_tokens.weight")]  # fmt: skip
    return keys


def test_deepseek_mla_dense_moe_and_extra_layer_mtp(tmp_path: Path) -> None:
    cfg = tiny_config(model_type="deepseek_v3", num_hidden_layers=3, n_routed_experts=4, first_k_dense_replace=1,
                      num_nextn_predict_layers=1)  # fmt: skip
    write_metadata(tmp_path, cfg, _deepseek_keys())
    lay = scan(str(tmp_path))
    groups = lay.language_model.groups
    assert [(g.name, str(g.layers)) for g in groups] == [("mla_dense", "0"), ("mla_moe", "1-2")]
    assert groups[0].mixer.family == "mla"
    assert groups[0].mixer.key("q_a_proj") == "self_attn.q_a_proj.weight"
    moe = groups[1].mlp
    assert moe.family == "moe"
    assert moe.key("expert_bias") == "mlp.gate.e_score_correction_bias"
    shared = moe.child("shared")
    assert shared is not None
    shared_mlp = shared.child("mlp")
    assert shared_mlp is not None
    assert shared_mlp.key("gate") == "mlp.shared_experts.gate_proj.weight"
    mtp = lay.language_model.mtp
    assert mtp is not None
    assert (mtp.scheme, mtp.depth, mtp.index_offset, mtp.root) == ("extra_layers", 1, 3, "model.layers.{layer}.")
    assert tuple(mtp.parts.key(s) for s in ("enorm", "final_norm", "embed_copy", "head_copy")) == (
        "enorm.weight", "shared_head.norm.weight", "embed_tokens.weight", "shared_head.head.weight"
    )  # fmt: skip
    assert lay.summary.mtp_expert_layout == "per_expert"
    assert lay.summary.num_layers == 3
    assert lay.summary.unclassified_keys == 0

    cfg["first_k_dense_replace"] = 2
    write_metadata(tmp_path, cfg, _deepseek_keys())
    with pytest.raises(MapgenError) as exc:
        scan(str(tmp_path))
    assert [d.code for d in exc.value.diagnostics] == ["config.dense-moe-mismatch"]


def test_qwen3_next_fused_gdn_and_audio_tower(tmp_path: Path) -> None:
    keys = list(tiny_dense(tied=True))
    gdn = ["conv1d.weight", "A_log", "dt_bias", "norm.weight", "out_proj.weight", "in_proj_qkvz.weight",
           "in_proj_ba.weight"]  # fmt: skip
    keys = [k for k in keys if not k.startswith("model.layers.0.self_attn.")]
    keys += [f"model.layers.0.linear_attn.{x}" for x in gdn]
    keys += [f"audio_tower.layers.{i}.fc1.weight" for i in range(3)]
    write_metadata(tmp_path, tiny_config(model_type="qwen3_next", tie_word_embeddings=True), keys)
    lay = scan(str(tmp_path))
    g0 = lay.language_model.groups[0]
    assert g0.mixer.family == "gated_delta_net"
    assert g0.mixer.key("in_proj_qkvz") == "linear_attn.in_proj_qkvz.weight"
    assert lay.summary.layer_pattern == "2 layers = 1 gated-delta-net + 1 attention (every 2nd)"
    assert [(t.name, t.prefix, t.num_keys) for t in lay.towers] == [("audio", "audio_tower.", 3)]
    assert lay.summary.unclassified_keys == 0


def test_layers_under_another_container_are_found_and_never_miscounted(tmp_path: Path) -> None:
    """GPT-2/Falcon-style ``transformer.h.<n>``: the layers are found under the declared container, the top-level
    spellings (``word_embeddings``, ``ln_f``) are data, and layers no family classifies are counted as such —
    never reported as "0 decoder layers"."""
    keys = [k.replace("model.layers.", "transformer.h.").replace("model.embed_tokens", "transformer.word_embeddings")
            .replace("model.norm", "transformer.ln_f") for k in tiny_dense()]
    write_metadata(tmp_path / "a", tiny_config(), keys)
    lay = scan(str(tmp_path / "a"))
    assert lay.language_model.prefix == "transformer."
    assert lay.language_model.groups[0].root == "transformer.h.{layer}."
    assert (lay.summary.num_layers, lay.summary.unclassified_keys) == (2, 0)
    odd = [k.replace("self_attn.q_proj", "attn.c_q") for k in keys]  # a spelling no family declares
    write_metadata(tmp_path / "b", tiny_config(), odd)
    lay = scan(str(tmp_path / "b"))
    assert lay.summary.layer_pattern == "2 layers, none classified (see the unclassified keys)"
    assert all(d.code != "config.layers-mismatch" for d in lay.diagnostics)


def test_an_empty_weight_map_and_a_checkpoint_without_layers_say_so(tmp_path: Path) -> None:
    write_metadata(tmp_path / "a", tiny_config(), [])
    with pytest.raises(MapgenError) as exc:
        scan(str(tmp_path / "a"))
    assert [d.code for d in exc.value.diagnostics] == ["checkpoint.no-tensors"]
    write_metadata(tmp_path / "b", tiny_config(), ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
    with pytest.raises(MapgenError) as exc:
        scan(str(tmp_path / "b"))
    codes = [d.code for d in exc.value.diagnostics]
    assert codes == ["keys.no-decoder-layers"]
    assert "the config declares 2 layers" in exc.value.render()
    assert "hold 0" not in exc.value.render()
