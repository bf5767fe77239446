"""mapgen synth: tiny random checkpoints with a source's exact key layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from scan_support import CORPUS, HUB_FIXTURES, write_metadata

from mapgen.cli import main
from mapgen.contract.fingerprint import fingerprint
from mapgen.errors import MapgenError
from mapgen.infer import scan
from mapgen.ir import Summary
from mapgen.plan.expand import layout_keys
from mapgen.plan.shapes import expected_shapes
from mapgen.source import read_source
from mapgen.synth import SynthOptions, synthesize

SOURCES = {
    **{name: CORPUS / name for name in sorted(p.name for p in CORPUS.iterdir() if p.is_dir()) if name != "gpt-oss-20b"},
    "qwen3.5-35b-a3b": HUB_FIXTURES / "Qwen--Qwen3.5-35B-A3B",
    "qwen3.6-35b-a3b": HUB_FIXTURES / "Qwen--Qwen3.6-35B-A3B",
}
# Summary fields that are dimensions (counts), not structure.
_DIMENSIONAL = {"num_layers", "attention", "moe_layers", "num_experts", "layer_pattern", "mtp_depth", "mtp_declared"}


def _structure(summary: Summary) -> dict[str, Any]:
    out = {f: getattr(summary, f) for f in Summary.__dataclass_fields__ if f not in _DIMENSIONAL}
    out["attention_kinds"] = [kind for kind, _ in summary.attention]
    return out


def _synth(source: Path, out: Path, *extra: str) -> None:
    assert main(["synth", str(source), str(out), *extra]) == 0


@pytest.mark.parametrize("case", sorted(SOURCES))
def test_synth_keeps_the_layout(tmp_path: Path, case: str) -> None:
    out = tmp_path / "out"
    _synth(SOURCES[case], out)
    before, after = scan(str(SOURCES[case])), scan(str(out))
    assert fingerprint(after) == fingerprint(before)
    assert _structure(after.summary) == _structure(before.summary)
    assert after.summary.unclassified_keys == 0
    # every tensor's header shape is what the config implies, and the keys are exactly the layout's
    source = read_source(str(out))
    headers = {k: info.shape for k, info in source.tensors.items()}
    assert set(headers) == layout_keys(after)
    expected = expected_shapes(after, after.config)
    assert expected == {k: headers[k] for k in expected}
    # the returned layout is what scan reads back
    result = synthesize(before, tensors=read_source(str(SOURCES[case])).tensors)
    assert result.layout.summary == after.summary
    assert result.layout.dims == after.dims
    assert fingerprint(result.layout) == fingerprint(after)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == result.index["weight_map"]
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_hybrid_sources_keep_their_period(tmp_path: Path) -> None:
    _synth(SOURCES["qwen3.5-35b-a3b"], tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["text_config"]
    assert cfg["num_hidden_layers"] == 4
    assert cfg["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert cfg["full_attention_interval"] == 4
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["mtp_num_hidden_layers"]) == (4, 2, 1)
    assert (cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]) == (2, 4)
    _synth(SOURCES["qwen3.5-35b-a3b"], tmp_path / "b", "--layers", "9")
    lay = scan(str(tmp_path / "b"))
    assert [(g.name, str(g.layers)) for g in lay.language_model.groups] == [
        ("linear_attention", "0-2,4-6,8"),
        ("attention", "3,7"),
    ]
    with pytest.raises(MapgenError) as exc:
        synthesize(scan(str(SOURCES["qwen3.5-35b-a3b"])), SynthOptions(layers=3))
    assert exc.value.diagnostics[0].code == "synth.too-few-layers"
    assert "'attention'" in exc.value.diagnostics[0].message


def test_mtp_depth_and_packed_mtp_experts(tmp_path: Path) -> None:
    _synth(SOURCES["qwen3.6-35b-a3b"], tmp_path / "out", "--mtp-depth", "4", "--experts", "6")
    lay = scan(str(tmp_path / "out"))
    mtp = lay.language_model.mtp
    assert mtp is not None
    assert (mtp.depth, lay.summary.mtp_expert_layout, lay.summary.expert_layout) == (4, "packed", "per_expert")
    assert lay.summary.num_experts == 6
    assert fingerprint(lay) == fingerprint(scan(str(SOURCES["qwen3.6-35b-a3b"])))
    source = read_source(str(tmp_path / "out"))
    assert source.tensors["mtp.layers.3.mlp.experts.gate_up_proj"].shape == (6, 2 * 28, 48)  # out_in, [E, 2I, H]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]["mtp_num_hidden_layers"] == 4


def test_declared_but_absent_mtp_is_never_fabricated(tmp_path: Path) -> None:
    reap = SOURCES["qwen3.5-25b-reap-a3b-coding"]
    _synth(reap, tmp_path / "out")
    lay = scan(str(tmp_path / "out"))
    assert lay.language_model.mtp is None
    assert lay.summary.mtp_declared == 1
    assert [d.code for d in lay.diagnostics] == ["mtp.declared-absent"]
    with pytest.raises(MapgenError) as exc:
        synthesize(scan(str(reap)), SynthOptions(mtp_depth=2))
    assert exc.value.diagnostics[0].code == "synth.no-mtp"


def test_gpt_oss_mxfp4_needs_packable_experts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """MXFP4 packs groups of 32 values (tests/test_mxfp4.py writes the release layout): synth's default widths
    are refused by name, and nothing is written."""
    assert main(["synth", str(CORPUS / "gpt-oss-20b"), str(tmp_path / "out")]) == 1
    assert "MXFP4 packs groups of 32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_deterministic_bytes_values_and_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from safetensors.torch import load_file

    src = SOURCES["qwen3.5-35b-a3b"]
    _synth(src, tmp_path / "a", "--seed", "7")
    _synth(src, tmp_path / "b", "--seed", "7")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert main(["synth", str(src), str(tmp_path / "a")]) == 1  # exists
    assert "already exists" in capsys.readouterr().err
    _synth(src, tmp_path / "a", "--seed", "8", "--overwrite")
    shard = "model-00002-of-00003.safetensors"
    assert (tmp_path / "a" / shard).read_bytes() != (tmp_path / "b" / shard).read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if f.endswith(".safetensors"):
            tensors.update(load_file(tmp_path / "b" / f))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    norms = [k for k in tensors if k.endswith("norm.weight") or k.startswith("mtp.pre_fc_norm")]
    assert "model.language_model.layers.0.linear_attn.norm.weight" in norms
    for k in norms:
        assert 0.5 <= tensors[k].float().min() <= tensors[k].float().max() <= 1.5, k
    assert tensors["model.language_model.layers.0.linear_attn.A_log"].float().min() >= 0
    q = tensors["model.language_model.layers.3.self_attn.q_proj.weight"]
    assert q.shape == (2 * 4 * 16, 48)  # output gate; q rows != hidden
    assert 0.005 < q.float().std() < 0.05


def test_source_dtypes_are_kept(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    _synth(SOURCES["qwen3-1.7b-mlx-bf16"], src, "--shards", "1")
    shard = src / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float()
    save_file(tensors, shard, metadata={"format": "pt"})
    _synth(src, tmp_path / "keep", "--shards", "1")
    kept = load_file(tmp_path / "keep" / "model-00001-of-00001.safetensors")
    assert str(kept["model.norm.weight"].dtype) == "torch.float32"
    assert str(kept["model.embed_tokens.weight"].dtype) == "torch.bfloat16"
    _synth(src, tmp_path / "fp32", "--shards", "1", "--dtype", "fp32")
    assert {str(t.dtype) for t in load_file(tmp_path / "fp32" / "model-00001-of-00001.safetensors").values()} == {
        "torch.float32"
    }


def _deepseek(tmp_path: Path) -> Path:
    """A DeepSeek-V3-like source (metadata only): MLA, first layer dense, one extra-layer MTP."""
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300, "num_hidden_layers": 3,
        "intermediate_size": 96, "moe_intermediate_size": 32, "n_routed_experts": 8, "n_shared_experts": 1,
        "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
        "num_nextn_predict_layers": 1, "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "tie_word_embeddings": False,
    }  # fmt: skip
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(4):
        p = f"model.layers.{i}."
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        keys += [p + f"self_attn.{x}.weight" for x in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa",
                                                      "kv_a_layernorm", "kv_b_proj", "o_proj")]  # fmt: skip
        if i == 0:
            keys += [p + f"mlp.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
        else:
            keys += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
            keys += [p + f"mlp.experts.{e}.{w}.weight" for e in range(8) for w in ("gate_proj", "up_proj", "down_proj")]
            keys += [p + f"mlp.shared_experts.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
    keys += [f"model.layers.3.{x}" for x in ("enorm.weight", "hnorm.weight", "eh_proj.weight",
                                             "shared_head.norm.weight", "shared_head.head.weight",
                                             "embed_tokens.weight")]  # fmt: skip
    return write_metadata(tmp_path / "deepseek", cfg, keys)


def test_deepseek_extra_layer_mtp_moves_with_the_layer_count(tmp_path: Path) -> None:
    src = _deepseek(tmp_path)
    _synth(src, tmp_path / "out", "--layers", "5")
    lay = scan(str(tmp_path / "out"))
    assert fingerprint(lay) == fingerprint(scan(str(src)))
    mtp = lay.language_model.mtp
    assert mtp is not None
    assert (mtp.index_offset, mtp.depth) == (5, 1)
    assert [(g.name, str(g.layers)) for g in lay.language_model.groups] == [("mla_dense", "0"), ("mla_moe", "1-4")]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["first_k_dense_replace"], cfg["n_routed_experts"], cfg["num_experts_per_tok"]) == (1, 4, 2)
    assert (cfg["n_group"], cfg["topk_group"], cfg["n_shared_experts"]) == (1, 1, 1)
    headers = {k: i.shape for k, i in read_source(str(tmp_path / "out")).tensors.items()}
    assert headers["model.layers.5.eh_proj.weight"] == (48, 96)
    assert headers["model.layers.5.self_attn.kv_b_proj.weight"] == (4 * (8 + 8), 16)
    assert headers["model.layers.2.mlp.shared_experts.up_proj.weight"] == (28, 48)


# ---------------------------------------------------------------------------------------------------------
# transformers loads what synth writes (so logits-parity tests can use it)
# ---------------------------------------------------------------------------------------------------------
def _load(out: Path, cls: Any) -> Any:
    import torch
    from safetensors.torch import load_file

    model, info = cls.from_pretrained(str(out), output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    logits = model(torch.tensor([[1, 2, 3, 5, 8]])).logits
    assert logits.shape == (1, 5, 160)
    assert bool(torch.isfinite(logits).all())
    state = model.state_dict()
    written: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        written.update(load_file(shard))
    same = [k for k in written if k in state]  # transformers may repack experts on load
    assert any(k.endswith("self_attn.q_proj.weight") for k in same)
    assert all(torch.equal(state[k], written[k]) for k in same)
    return model


def test_transformers_loads_dense_and_mixtral(tmp_path: Path) -> None:
    import transformers

    _synth(SOURCES["qwen3-1.7b-mlx-bf16"], tmp_path / "qwen3")
    model = _load(tmp_path / "qwen3", transformers.Qwen3ForCausalLM)
    assert model.config.head_dim == 16
    _synth(SOURCES["mixtral-8x7b-instruct-v0.1"], tmp_path / "mixtral")
    model = _load(tmp_path / "mixtral", transformers.MixtralForCausalLM)
    assert model.config.bos_token_id < 160


def test_transformers_loads_qwen3_moe_per_expert(tmp_path: Path) -> None:
    import torch
    import transformers

    config = transformers.Qwen3MoeConfig(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=96,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=4, vocab_size=300, num_hidden_layers=3,
        mlp_only_layers=[0],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "src")
    _synth(tmp_path / "src", tmp_path / "out")
    lay = scan(str(tmp_path / "out"))
    assert lay.summary.expert_layout == "per_expert"
    assert [(g.name, str(g.layers)) for g in lay.language_model.groups] == [
        ("attention_dense", "0"),
        ("attention_moe", "1"),
    ]
    _load(tmp_path / "out", transformers.Qwen3MoeForCausalLM)
