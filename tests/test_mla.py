"""Multi-latent attention (DeepSeek-V2/V3, Kimi-K2) onto megatron-core's MLASelfAttention.

Sources are written by transformers itself (``tests/tiny_mla.py``): DeepSeek-V3 with its published YaRN (factor 40,
mscale = mscale_all_dim = 1), its full-rank-q variant, Kimi-K2's config on the V3 class (YaRN beta_fast 1,
rope_theta 50000, routed_scaling_factor 2.827), V3 with its MTP layer, V3's grouped routing (4 groups, top 2,
scaling 2.5), DeepSeek-V2 (group-limited greedy softmax, scaling 16, YaRN mscale 0.707) and V2-Lite (full-rank
``q_proj``, greedy); plus DeepSeek-V3's FP8 release layout, synthesized (``mapgen synth``) from its full index.
Each verifies HF -> Megatron -> HF bitwise and logits against transformers' fp32 eager forward at TP=2 and/or
EP=2; one TP=2 x EP=2 case (4 processes) is slow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests import tiny_mla
from tests.runtime_support import Case, assert_case, run_cases, synth

PARALLEL: dict[str, dict[str, Any]] = {"tp2": {"tp": 2}, "ep2": {"ep": 2, "etp": 1}}
CASES = [("deepseek-v3", "tp2"), ("deepseek-v3", "ep2"), ("deepseek-v3-q-full-rank", "tp2"), ("kimi-k2", "tp2"),
         ("kimi-k2", "ep2"), ("deepseek-v3-mtp", "tp2"), ("deepseek-v3-mtp", "ep2"), ("deepseek-v3-groups", "ep2"),
         ("deepseek-v2", "tp2"), ("deepseek-v2-lite", "tp2"), ("deepseek-v2-lite", "ep2"),
         ("deepseek-v3-fp8-release", "tp2")]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from benchmarks.bench_deepseek_v3 import write as write_release_index

    root = tmp_path_factory.mktemp("mla")
    out = {kind: tiny_mla.write(kind, root / kind) for kind in tiny_mla.KINDS}
    # DeepSeek-V3's FP8 release, key for key (91,991 keys, weight_scale_inv beside every linear weight), shrunk by
    # mapgen synth to 4 layers + MTP with 4x4 scale tiles: MLA through the block-scaled FP8 reader
    meta = write_release_index(root / "deepseek-v3-release-index", fp8=True)
    out["deepseek-v3-fp8-release"] = synth(meta, root / "deepseek-v3-fp8-release", "--fp8-block", "4x4")
    return out


# -- the RoPE of MLA: mapped exactly or refused by name ------------------------------------------------------------
def test_yarn_maps_deepseek_mscale_exactly() -> None:
    from mapgen.contract.hf_config import HFConfig, mla_rope

    got = mla_rope(HFConfig({"rope_scaling": tiny_mla.DEEPSEEK_V3_YARN, "max_position_embeddings": 163840}))
    assert got == {"mla_rope_type": "yarn", "yarn_scaling_factor": 40.0, "yarn_original_max_position_embeddings": 4096,
                   "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_mscale": 1.0, "yarn_mscale_all_dim": 1.0,
                   "yarn_truncate": True}  # MLA rounds the correction range (truncate=false is refused below)
    # transformers ignores mscale without mscale_all_dim (attention factor get_mscale(factor)): megatron's 1.0/0.0
    only = {**tiny_mla.DEEPSEEK_V3_YARN, "mscale": 0.707, "mscale_all_dim": None}
    assert mla_rope(HFConfig({"rope_scaling": only}))["yarn_mscale"] == 1.0
    # transformers 5 spelling, factor from the context ratio
    v5 = {"rope_type": "yarn", "original_max_position_embeddings": 4096, "rope_theta": 10000.0}
    assert mla_rope(HFConfig({"rope_parameters": v5, "max_position_embeddings": 16384}))["yarn_scaling_factor"] == 4.0
    assert mla_rope(HFConfig({"rope_parameters": {"rope_type": "default"}}))["mla_rope_type"] == "rope"


@pytest.mark.parametrize(("change", "reason"), [
    ({"mscale": None, "mscale_all_dim": 1.0}, "mscale_all_dim but no mscale"),
    ({"truncate": False}, "truncate=false"),
    ({"attention_factor": 1.5}, "explicit attention_factor"),
    ({"rope_type": "llama3", "type": None}, "'llama3' in multi-latent attention"),
])
def test_unexpressible_rope_is_refused_by_name(change: dict[str, Any], reason: str) -> None:
    from mapgen.contract.hf_config import HFConfig, mla_rope
    from mapgen.errors import MapgenError

    rope = {**tiny_mla.DEEPSEEK_V3_YARN, **change}
    with pytest.raises(MapgenError) as info:
        mla_rope(HFConfig({"rope_scaling": rope}))
    assert info.value.diagnostics[0].code == "config.unsupported-rope"
    assert reason in info.value.diagnostics[0].message


def _catalog(config: dict[str, Any]) -> dict[str, str]:
    from mapgen.catalog import check_config

    return {str(d.key): d.message for d in check_config(config).errors}


def test_catalog_maps_mla_fields_and_refuses_what_mla_cannot_build(sources: dict[str, Path]) -> None:
    config = json.loads((sources["deepseek-v3"] / "config.json").read_text())
    assert _catalog(config) == {}
    assert "rope_interleave" in _catalog({**config, "rope_interleave": False})
    assert "qk_head_dim" in _catalog({**config, "qk_head_dim": 20})
    # transformers repeats MLA's per-head keys/values when num_key_value_heads is smaller (youtu's tiny config)
    assert "num_key_value_heads" in _catalog({**config, "num_key_value_heads": 2})
    # DeepSeek's latent norms keep transformers' RMSNorm default eps 1e-6 whatever rms_norm_eps says (glm4_moe_lite's
    # tiny config with 1e-5 verified at 3.5e-5 instead of 6e-7 before this refusal); megatron has one epsilon
    assert "rms_norm_eps" in _catalog({**config, "rms_norm_eps": 1e-5})
    bad = {**config["rope_parameters"], "mscale": None}
    assert any("mscale_all_dim but no mscale" in m for m in _catalog({**config, "rope_parameters": bad}).values())


def test_rope_dims_are_interleaved_as_megatron_expects(sources: dict[str, Path]) -> None:
    """The verify cases match transformers with ``rope_interleave: true`` to < 1e-6; the same weights read with
    ``rope_interleave: false`` give logits that differ by far more, so that parity is a proof of the layout
    megatron-core's MLA expects (pairs, de-interleaved before rotating) and not of shapes."""
    import shutil

    from mapgen.runtime.verify import fixed_batch, transformers_logits

    src = sources["deepseek-v3"]
    ids = fixed_batch(128)
    interleaved, _ = transformers_logits(src, ids)
    halves_dir = src.parent / "deepseek-v3-halves"
    shutil.copytree(src, halves_dir)
    config = json.loads((halves_dir / "config.json").read_text())
    (halves_dir / "config.json").write_text(json.dumps({**config, "rope_interleave": False}))
    halves, _ = transformers_logits(halves_dir, ids)
    assert interleaved is not None
    assert halves is not None
    assert float((interleaved - halves).abs().max()) > 1e-3


def test_megatron_lm_arguments_carry_mla(sources: dict[str, Path]) -> None:
    from mapgen.runtime.api import HFSource, bind
    from mapgen.runtime.megatron_args import canonical, megatron_args, spec_from_args

    v3 = bind(HFSource.open(str(sources["deepseek-v3"])).layout).spec
    dims = (v3.q_lora_rank, v3.kv_lora_rank, v3.qk_head_dim, v3.qk_pos_emb_head_dim, v3.v_head_dim)
    assert dims == (24, 32, 16, 8, 12)
    yarn = (v3.mla_rope_type, v3.yarn_scaling_factor, v3.yarn_mscale, v3.yarn_mscale_all_dim)
    assert yarn == ("yarn", 40.0, 1.0, 1.0)
    assert set(v3.kinds) == {"mla"}
    assert bind(HFSource.open(str(sources["deepseek-v2-lite"])).layout).spec.q_lora_rank is None
    for kind in ("deepseek-v3", "deepseek-v3-q-full-rank", "deepseek-v3-mtp", "kimi-k2", "deepseek-v2-lite"):
        spec = bind(HFSource.open(str(sources[kind])).layout).spec
        argv = megatron_args(spec)
        assert "--multi-latent-attention" in argv
        assert spec_from_args(argv)[0] == canonical(spec), kind


def test_dist_checkpoint_keys_of_mla_layers_are_te_spelled(sources: dict[str, Path]) -> None:
    """The keys megatron-core's sharded state dict gives the MLA layers (with mapgen's keys map) are the TE
    spellings ``local_to_te_names`` computes: latent norms fused into the up projections, input norm unfused."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from mapgen.runtime import megatron as M
    from mapgen.runtime.api import HFSource, bind

    spec = bind(HFSource.open(str(sources["deepseek-v3"])).layout).spec
    te = {v for k, v in M.local_to_te_names(M.enumerate_parameters(spec)).items() if ".self_attention." in k
          or k.endswith("input_layernorm.weight")}
    with M.parallel():
        model = M.build_model(spec, device="meta")
        with M.cpu_shims():
            keys = {t.key for t in nested_values(model.sharded_state_dict()) if isinstance(t, ShardedTensor)}
    assert "decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight" in te
    assert "decoder.layers.0.input_layernorm.weight" in te
    assert te <= keys, sorted(te - keys)


# -- conversions -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(sources: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    return run_cases([Case(f"{kind}-{p}", str(sources[kind]), **PARALLEL[p]) for kind, p in CASES])


@pytest.mark.distributed
@pytest.mark.parametrize("name", [f"{k}-{p}" for k, p in CASES])
def test_round_trip_and_logits(results: dict[str, list[dict[str, Any]]], name: str) -> None:
    assert_case(results, name)


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_ep2(sources: dict[str, Path]) -> None:
    """TP=2 x EP=2 (ETP=1): two processes, each holding half the heads and half the routed experts (the
    expert-data-parallel groups pair the TP ranks). DeepSeek-V3 with MTP, Kimi-K2 and DeepSeek-V2's greedy group
    routing, one set of workers."""
    kinds = ("deepseek-v3-mtp", "kimi-k2", "deepseek-v2")
    results = run_cases([Case(f"{kind}-tp2ep2", str(sources[kind]), tp=2, ep=2, etp=1) for kind in kinds])
    for kind in kinds:
        assert_case(results, f"{kind}-tp2ep2")
