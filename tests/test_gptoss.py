"""gpt-oss onto megatron-core: attention sinks, q/k/v/o biases, the biased router (softmax after top-k), packed
experts with interleaved gate/up columns stored [in, out] and their biases, the clamped SwiGLU, alternating
sliding-window layers and YaRN on standard attention.

Sources are written by transformers itself (``tests/tiny_gptoss.py``: hidden 64, 2 layers one sliding one full,
4 experts top-2, a window of 4 over the 11-token verify batch, fp32, several shards, perturbed). Each verifies HF ->
Megatron -> HF bitwise and logits against transformers' fp32 eager ``GptOssForCausalLM`` (<= 1e-4). Every variant is
shown to move transformers' logits on the verify batch, so parity proves the Megatron model applies the setting.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import tiny_gptoss
from tests.runtime_support import CORPUS, Case, assert_case, run_cases, synth

PARALLEL: dict[str, dict[str, Any]] = {"tp1": {}, "tp2": {"tp": 2, "etp": 1}, "ep2": {"ep": 2, "etp": 1},
                                       "tp2ep2": {"tp": 2, "ep": 2, "etp": 1}}
CASES = [("gpt-oss", "tp2"), ("gpt-oss", "ep2"), ("gpt-oss", "tp2ep2"), ("gpt-oss-limit", "ep2"),
         ("gpt-oss-all-windows", "tp2"), ("gpt-oss-no-window", "ep2"), ("gpt-oss-yarn-truncate", "tp2"),
         ("gpt-oss-rope", "ep2"), ("qwen3-yarn", "tp2"), ("gpt-oss-20b-bf16", "ep2")]
# how far each variant moves transformers' logits from the base model's (the verify batch); the parity tolerance
# is 1e-4, the measured parity about 5e-7
MOVES = {"gpt-oss-limit": 1e-2, "gpt-oss-all-windows": 1e-2, "gpt-oss-no-window": 1e-2, "gpt-oss-rope": 1e-2,
         "gpt-oss-sinks-off": 1e-2, "qwen3-yarn": 1e-2,
         # rounding YaRN's correction range moves one blended frequency a little: 3e-4 here, still 3x the tolerance
         # (test_yarn_equals_transformers compares the frequencies themselves)
         "gpt-oss-yarn-truncate": 2e-4}
QWEN3_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    from mapgen.cli import main as mapgen_main

    root = tmp_path_factory.mktemp("gptoss")
    sources = {kind: tiny_gptoss.write(kind, root / kind) for kind in tiny_gptoss.KINDS}
    # transformers' gpt-oss always has sinks: a sink logit of -1e4 is a model without them
    off = root / "gpt-oss-sinks-off"
    shutil.copytree(sources["gpt-oss"], off)
    for shard in off.glob("*.safetensors"):
        tensors = load_file(str(shard))
        if any(k.endswith(".sinks") for k in tensors):
            save_file({k: torch.full_like(v, -1e4) if k.endswith(".sinks") else v for k, v in tensors.items()},
                      str(shard), metadata={"format": "pt"})
    sources["gpt-oss-sinks-off"] = off
    sources["gpt-oss-20b-bf16"] = synth(_release_bf16(root / "gpt-oss-20b-bf16-meta"), root / "gpt-oss-20b-bf16")
    # YaRN on standard attention is not gpt-oss's alone: a Qwen3 with YaRN (rounded correction range), and without
    sources["qwen3-yarn"] = _qwen3(root / "qwen3-yarn", QWEN3_YARN)
    sources["qwen3-rope"] = _qwen3(root / "qwen3-rope", None)
    # the window variants have their own layer groups, hence their own bridges (the base and Qwen3 are in generated/)
    bridges = root / "bridges" / "generated"
    variants = [sources["gpt-oss-all-windows"], sources["gpt-oss-no-window"]]
    assert mapgen_main(["emit", *map(str, variants), "--out", str(bridges)]) == 0
    return {"sources": sources, "bridges": bridges}


def _release_bf16(out: Path) -> Path:
    """gpt-oss-20b's own config and key layout (metadata only) with each MXFP4 ``*_blocks``/``*_scales`` pair as
    the one dequantized tensor it stands for (the bf16 layout the MXFP4 keys dequantize to), for ``mapgen synth``."""
    out.mkdir()
    config = json.loads((CORPUS / "gpt-oss-20b" / "config.json").read_text())
    del config["quantization_config"]
    index = json.loads((CORPUS / "gpt-oss-20b" / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k.removesuffix("_blocks"): v for k, v in index["weight_map"].items()
                           if not k.endswith("_scales")}
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def _qwen3(out: Path, rope: dict[str, Any] | None) -> Path:
    import transformers

    from tests.tiny import _randomise, qwen3_config

    config: Any = qwen3_config()
    if rope is not None:
        config.rope_parameters = rope
    model = transformers.Qwen3ForCausalLM(config)
    _randomise(model, 0)
    model.save_pretrained(str(out), max_shard_size="60KB")
    return out


def _spec(built: dict[str, Any], kind: str) -> Any:
    from mapgen.runtime.api import HFSource, bind

    os.environ["MAPGEN_BRIDGES"] = str(built["bridges"])
    try:
        return bind(HFSource.open(str(built["sources"][kind])).layout).spec
    finally:
        os.environ.pop("MAPGEN_BRIDGES", None)


# -- what the bridge builds ------------------------------------------------------------------------------------
def test_the_bridge_builds_gpt_oss(built: dict[str, Any]) -> None:
    spec = _spec(built, "gpt-oss")
    assert (spec.softmax_type, spec.add_qkv_bias, spec.add_bias_linear) == ("learnable", True, True)
    # clamped SwiGLU: quick_gelu(min(g, 7)) * (clamp(u, -7, 7) + 1)
    assert (spec.gated_linear_unit, spec.activation, spec.glu_linear_offset, spec.activation_func_clamp_value) == (
        True, "quick_gelu", 1.0, 7.0)
    # GptOssTopKRouter: top-k of the biased logits, softmax over the k
    assert (spec.moe_router_score_function, spec.moe_router_pre_softmax, spec.moe_router_topk) == ("softmax", False, 2)
    assert (spec.window_size, spec.window_layers) == (4, (True, False))
    yarn = (spec.position_embedding_type, spec.rotary_base, spec.yarn_scaling_factor,
            spec.yarn_original_max_position_embeddings, spec.yarn_beta_fast, spec.yarn_beta_slow, spec.yarn_truncate)
    assert yarn == ("yarn", 150000.0, 32.0, 4096, 32.0, 1.0, False)
    assert _spec(built, "gpt-oss-rope").position_embedding_type == "rope"
    assert _spec(built, "gpt-oss-limit").activation_func_clamp_value == 0.05
    assert _spec(built, "gpt-oss-all-windows").window_layers == (True, True)
    assert _spec(built, "gpt-oss-no-window").window_size is None
    qwen3 = _spec(built, "qwen3-yarn")
    assert (qwen3.position_embedding_type, qwen3.yarn_scaling_factor, qwen3.yarn_truncate) == ("yarn", 4.0, True)


@pytest.mark.parametrize("kind", sorted(MOVES))
def test_each_variant_changes_transformers_logits(built: dict[str, Any], kind: str) -> None:
    from mapgen.runtime.verify import fixed_batch, transformers_logits

    ids = fixed_batch(128)
    base, _ = transformers_logits(built["sources"]["qwen3-rope" if kind == "qwen3-yarn" else "gpt-oss"], ids)
    other, _ = transformers_logits(built["sources"][kind], ids)
    assert base is not None
    assert other is not None
    moved = float((base - other).abs().max())
    assert moved > MOVES[kind], f"{kind} moves the logits by only {moved:.2g}"


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_equals_transformers(truncate: bool) -> None:
    """megatron-core's YarnRotaryEmbedding (GPTModel position_embedding_type yarn) and attention factor against
    transformers' YaRN for gpt-oss's parameters: the same blended frequencies and cos/sin scale."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
        _yarn_get_concentration_factor,
    )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mapgen.contract.hf_config import HFConfig, yarn_fields
    from mapgen.runtime.megatron import cpu_shims

    rope = {**tiny_gptoss.GPT_OSS_YARN, "truncate": truncate}
    config = tiny_gptoss.config(rope_parameters=rope)
    want_freq, want_scale = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    f = yarn_fields(HFConfig({"model_type": "gpt_oss", "rope_parameters": rope, "max_position_embeddings": 131072}))
    assert f["yarn_truncate"] is truncate
    with cpu_shims():
        emb = YarnRotaryEmbedding(
            kv_channels=16, rotary_base=150000.0, scaling_factor=f["yarn_scaling_factor"],
            original_max_position_embeddings=f["yarn_original_max_position_embeddings"],
            beta_fast=f["yarn_beta_fast"], beta_slow=f["yarn_beta_slow"], mscale=f["yarn_mscale"],
            mscale_all_dim=f["yarn_mscale_all_dim"], correction_range_round_to_int=f["yarn_truncate"],
            use_cpu_initialization=True)
        freqs, _ = emb.get_emb(2)
    got_freq = freqs[1, 0, 0, : freqs.shape[-1] // 2]  # position 1: the inverse frequencies themselves
    assert torch.allclose(got_freq, want_freq, rtol=1e-6, atol=0)
    got_scale = _yarn_get_concentration_factor(f["yarn_scaling_factor"], f["yarn_mscale"], f["yarn_mscale_all_dim"])
    assert abs(got_scale - want_scale) < 1e-12


@pytest.mark.parametrize(("rope", "extra", "reason"), [
    ({"attention_factor": 1.5}, {}, "explicit attention_factor"),
    ({}, {"partial_rotary_factor": 0.5}, "part of the rotary dims"),
    ({"original_max_position_embeddings": None}, {}, "needs original_max_position_embeddings"),
])
def test_unexpressible_yarn_is_refused_by_name(rope: dict[str, Any], extra: dict[str, Any], reason: str) -> None:
    from mapgen.contract.hf_config import HFConfig, yarn_fields
    from mapgen.errors import MapgenError

    config = {"model_type": "gpt_oss", "rope_parameters": {**tiny_gptoss.GPT_OSS_YARN, **rope}, **extra}
    with pytest.raises(MapgenError) as info:
        yarn_fields(HFConfig(config))
    assert info.value.diagnostics[0].code == "config.unsupported-rope"
    assert reason in info.value.diagnostics[0].message


# -- the config catalog ----------------------------------------------------------------------------------------
def _catalog(config: dict[str, Any]) -> dict[str, str]:
    from mapgen.catalog import check_config

    return {str(d.key): d.message for d in check_config(config).errors}


def test_catalog_maps_the_release_config_and_refuses_what_megatron_cannot_build() -> None:
    """gpt-oss-20b's own config.json (legacy rope_scaling, experts_per_token, initial_context_length): everything
    is mapped or inert, its MXFP4 quantization included (the scan pairs the blocks and scales, the reader
    dequantizes them: tests/test_mxfp4.py)."""
    release = json.loads((CORPUS / "gpt-oss-20b" / "config.json").read_text())
    assert _catalog(release) == {}
    bf16 = {k: v for k, v in release.items() if k != "quantization_config"}
    assert _catalog(bf16) == {}
    assert "swiglu_alpha" in _catalog({**bf16, "swiglu_alpha": 1.0})  # quick_gelu's gain is 1.702
    assert "rope_scaling" in _catalog({**bf16, "rope_scaling": {**release["rope_scaling"], "attention_factor": 2.0}})
    assert "experts_per_token" in _catalog({**bf16, "experts_per_token": 2})  # the bridge reads num_experts_per_tok
    # top-1: transformers weights the one expert 1.0, megatron-core's top-1 softmax by its probability
    assert "num_experts_per_tok" in _catalog({**bf16, "num_experts_per_tok": 1, "experts_per_token": 1})
    # the clamped SwiGLU of another model type is not gpt-oss's formula
    assert "swiglu_limit" in _catalog({"model_type": "qwen3", "swiglu_limit": 7.0})


# -- the planner and the runtime refuse what megatron-core cannot build -----------------------------------------
def test_unbiased_attention_with_biased_experts_is_refused(tmp_path: Path) -> None:
    """``attention_bias: false`` leaves o_proj without a bias while the router and experts keep theirs;
    megatron-core's add_bias_linear is one switch for all of them."""
    import transformers

    from mapgen.errors import MapgenError
    from mapgen.plan.planner import plan
    from mapgen.runtime.api import HFSource

    transformers.GptOssForCausalLM(tiny_gptoss.config(attention_bias=False)).save_pretrained(str(tmp_path))
    with pytest.raises(MapgenError) as info:
        plan(HFSource.open(str(tmp_path)).layout)
    assert any("add_bias_linear" in d.message for d in info.value.diagnostics)


def test_biased_experts_need_expert_tp_1(built: dict[str, Any]) -> None:
    from mapgen.runtime.megatron import check_divisibility

    spec = _spec(built, "gpt-oss")
    assert any("etp=2" in e and "--etp 1" in e for e in check_divisibility(spec, tp=2))
    assert check_divisibility(spec, tp=2, etp=1) == []


def test_megatron_lm_arguments(built: dict[str, Any]) -> None:
    """Sinks, the GLU offset and the clamp have Megatron-LM flags; YaRN on standard attention is named as having
    none this parser knows."""
    from mapgen.runtime.megatron_args import ArgsError, canonical, megatron_args, spec_from_args

    rope = _spec(built, "gpt-oss-rope")
    argv = megatron_args(rope)
    assert {"--softmax-type", "--glu-linear-offset", "--activation-func-clamp-value", "--quick-geglu"} <= set(argv)
    assert spec_from_args(argv)[0] == canonical(rope)
    with pytest.raises(ArgsError, match="YaRN"):
        megatron_args(_spec(built, "gpt-oss"))


# -- conversions -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(built: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    os.environ["MAPGEN_BRIDGES"] = str(built["bridges"])  # the spawned workers inherit it
    try:
        return run_cases([Case(f"{kind}-{p}", str(built["sources"][kind]), **PARALLEL[p]) for kind, p in CASES])
    finally:
        os.environ.pop("MAPGEN_BRIDGES", None)


@pytest.mark.distributed
@pytest.mark.parametrize("name", [f"{k}-{p}" for k, p in CASES])
def test_round_trip_and_logits(results: dict[str, list[dict[str, Any]]], name: str) -> None:
    assert_case(results, name)


@pytest.mark.slow
@pytest.mark.distributed
def test_convert_and_export_reproduce_the_source_byte_for_byte(built: dict[str, Any], tmp_path: Path) -> None:
    """Through a Megatron dist checkpoint written at TP=2 x EP=2 (ETP=1): the exported shard files equal the
    source's, the interleaved, [in, out] packed experts and their biases included. The 128-row vocabulary is
    padded to 256 rows at TP=2 and loads at the export's TP=1."""
    from mapgen.cli import main as mapgen_main

    src = built["sources"]["gpt-oss"]
    ckpt, out = tmp_path / "mcore", tmp_path / "hf"
    assert mapgen_main(["convert", str(src), str(ckpt), "--tp", "2", "--ep", "2", "--etp", "1"]) == 0
    assert mapgen_main(["export", str(ckpt), str(out), "--source", str(src)]) == 0
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert shards == sorted(p.name for p in out.glob("*.safetensors"))
    for name in [*shards, "model.safetensors.index.json"]:
        assert (src / name).read_bytes() == (out / name).read_bytes(), name
