"""The config catalog (``mapgen.catalog``): calibration on every stored config, agreement with the contract's
config table,
value validation, value-dependent refusals, transformers' defaults, escapes, scope, and the CLI gate.

Regenerate the defaults table with ``.venv/bin/python -m tests.regen_catalog_defaults``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mapgen.catalog import BRIDGE_READS, TOP, ConfigReport, catalog_size, check_config
from mapgen.catalog.fields import NESTED_INDEX, ROPE_TYPES
from mapgen.contract.hf_config import SHARED_COUNT_READS, SHARED_SIZE_READS
from mapgen.contract.routing import ROUTING_KEYS
from mapgen.ir import Layout, layout_from_json

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
INPUTS = REPO / "generated" / "inputs"
FIXTURE_CONFIGS = sorted(FIXTURES.glob("*/*/config.json"))
STORED_INPUTS = sorted(INPUTS.glob("*.json"))


def _codes(report: ConfigReport) -> list[tuple[str, str]]:
    return [(d.code, d.key) for d in report.errors]


def _stored(path: Path) -> Layout:
    return layout_from_json(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------
# Calibration: everything mapgen stores classifies with zero unknown fields
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", FIXTURE_CONFIGS, ids=[p.parent.name for p in FIXTURE_CONFIGS])
def test_every_fixture_config_has_no_unknown_field(path: Path) -> None:
    report = check_config(json.loads(path.read_text()), file=str(path))
    assert report.by_verdict("unknown") == ()
    assert not [d for d in report.errors if d.code in ("config.unknown-field", "config.invalid-value")], _codes(report)


@pytest.mark.parametrize("path", STORED_INPUTS, ids=[p.stem for p in STORED_INPUTS])
def test_every_committed_bridge_input_passes(path: Path) -> None:
    """A stored input has a committed bridge: nothing in its config may be unknown, invalid or refused."""
    report = check_config(_stored(path).config, file=str(path))
    assert report.ok, _codes(report)
    assert report.counts()["mapped"] >= 9  # Baichuan-7B's config (no rope_theta, no KV-head count) maps 9


def test_transformers_written_tiny_configs_pass() -> None:
    from tiny import qwen3_config, qwen3_moe_config

    for cfg in (qwen3_config(), qwen3_moe_config()):
        data = json.loads(cfg.to_json_string(use_diff=True))  # type: ignore[attr-defined]
        report = check_config(data)
        assert report.ok, _codes(report)


# ---------------------------------------------------------------------------------------------------------
# The mapped set is what the bridges read: mapgen.contract.config.CONFIG + the derivation helpers
# ---------------------------------------------------------------------------------------------------------
# Keys the derivations in mapgen/contract/hf_config.py (head_dim, rope_scaling, rope_scaling_factor, activation,
# sliding windows, NoPE layers, M-RoPE, the softmax scale) read.
HELPER_TOP = {"head_dim", "hidden_size", "num_attention_heads", "rope_scaling", "rope_parameters", "hidden_act",
              "hidden_activation", "activation_function", "sliding_window", "use_sliding_window", "max_window_layers",
              "no_rope_layers", "no_rope_layer_interval", "attention_multiplier", "query_pre_attn_scalar"}
HELPER_ROPE = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
               "mrope_section"}
HELPER_TOP |= set(ROUTING_KEYS)  # the routing derivation (mapgen/contract/routing.py)
HELPER_TOP |= {"swiglu_alpha", "swiglu_limit"}  # gpt-oss's clamped SwiGLU (hf_config.activation, activation_clamp)
HELPER_TOP |= {"multi_query", "num_key_value_heads", "n_head"}  # num_query_groups (hf_config.query_groups)
HELPER_TOP |= {*SHARED_SIZE_READS, *SHARED_COUNT_READS}  # hf_config.shared_expert_size


def test_mapped_rows_are_exactly_what_the_config_table_reads() -> None:
    from mapgen.contract.config import CONFIG, POSITION_READS

    names = {n for row in CONFIG for n in row.hf} | set(POSITION_READS[0])  # the position-table derivation
    top = {n for n in names if "." not in n} | HELPER_TOP
    nested: dict[str, set[str]] = {"rope_parameters": set(HELPER_ROPE), "rope_scaling": set(HELPER_ROPE)}
    for n in names:
        if "." in n:
            head, tail = n.split(".", 1)
            nested[head].add(tail)
    catalog_top = {r.name for r in TOP if r.verdict == "mapped" and r.via == "config"}
    assert catalog_top == top
    for table, expected in nested.items():
        got = {name for name, r in NESTED_INDEX[table].items() if r.verdict == "mapped" and r.via == "config"}
        assert got == expected, table


def test_bridge_reads_mirror_the_config_table() -> None:
    """BRIDGE_READS (names tried in order + fallback) equals the contract's config table field by field."""
    from mapgen.contract.config import CONFIG, POSITION_READS, REQUIRED
    from mapgen.contract.hf_config import QUERY_GROUP_READS
    from mapgen.contract.spec import ModelSpec

    seen = {row.field: (row.hf, None if row.default is REQUIRED else row.default) for row in CONFIG if row.hf}
    seen["max_position_embeddings"] = POSITION_READS  # a derivation: these reads plus OPT's position offset
    seen["num_query_groups"] = (QUERY_GROUP_READS, None)  # a derivation: these reads, or 1 when multi-query
    seen["moe_shared_expert_intermediate_size"] = (SHARED_SIZE_READS, None)  # else count x one expert's size
    assert seen == BRIDGE_READS
    spec_fields = set(ModelSpec.__dataclass_fields__)
    for row in TOP:
        assert set(row.feeds) <= spec_fields, row.name
    for table in NESTED_INDEX.values():
        for row in table.values():
            assert set(row.feeds) <= spec_fields, row.name


def test_catalog_size_is_reported() -> None:
    size = catalog_size()
    assert (size.mapped >= 40, size.inert >= 80, size.refused >= 40) == (True, True, True), size


# ---------------------------------------------------------------------------------------------------------
# Values: invalid, refused, equivalent
# ---------------------------------------------------------------------------------------------------------
def _tiny_qwen3(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 48, "intermediate_size": 40,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
        "vocab_size": 160, "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 64,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
    }
    base.update(changes)
    return base


def _moe(model_type: str, **changes: Any) -> dict[str, Any]:
    cfg = _tiny_qwen3(model_type=model_type, architectures=["X"], num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=24)
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize(("change", "key"), [
    ({"hidden_size": -5}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"rms_norm_eps": -1}, "rms_norm_eps"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"hidden_act": "banana"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "spiral"}}, "rope_parameters"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ({"vocab_size": 0}, "vocab_size"),
])
def test_invalid_values(change: dict[str, Any], key: str) -> None:
    report = check_config(_tiny_qwen3(**change))
    assert ("config.invalid-value", key) in _codes(report)


@pytest.mark.parametrize(("config", "key"), [
    (_moe("dots1"), "norm_topk_prob"),  # absent: Dots1Config's default false; megatron-core's sigmoid renormalises
    (_moe("x", norm_topk_prob=False), "norm_topk_prob"),  # a router scheme mapgen does not know
    (_moe("deepseek_v3", n_group=2, topk_group=1, num_experts_per_tok=3), "topk_group"),  # groups by top-3 sums
    (_moe("x", scoring_func="sigmoid"), "scoring_func"),
    (_tiny_qwen3(hidden_act="mish"), "hidden_act"),
    # absent: gemma computes the tanh GELU, the bridge would build SiLU
    ({k: v for k, v in _tiny_qwen3(model_type="gemma").items() if k != "hidden_act"}, "hidden_act"),
    (_tiny_qwen3(model_type="gemma"), "model_type.embedding-scale"),
    (_tiny_qwen3(model_type="granite", embedding_multiplier=12.0), "embedding_multiplier"),
    (_tiny_qwen3(model_type="granite", residual_multiplier=0.22), "residual_multiplier"),
    (_tiny_qwen3(model_type="granite", logits_scaling=8.0), "logits_scaling"),
    # absent: SmolLM3's no_rope_layer_interval=4 makes layer 3 NoPE
    (_tiny_qwen3(model_type="smollm3", num_hidden_layers=4), "no_rope_layer_interval"),
    (_tiny_qwen3(model_type="mistral"), "sliding_window"),  # absent: MistralConfig's window is 4096
    (_tiny_qwen3(model_type="granite"), "attention_multiplier"),  # absent: GraniteConfig's scale is 1.0
    (_tiny_qwen3(model_type="mimo_x", sliding_window=16, use_sliding_window=True), "sliding_window"),
    (_tiny_qwen3(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope_parameters"),
    (_tiny_qwen3(rope_scaling={"type": "mrope"}), "rope_scaling"),  # no sections
])
def test_refused_values_name_the_field(config: dict[str, Any], key: str) -> None:
    report = check_config(config)
    assert ("semantics.unsupported", key) in _codes(report), _codes(report)


@pytest.mark.parametrize("config", [
    _moe("glm4_moe", norm_topk_prob=True, routed_scaling_factor=1.0, n_group=1, topk_group=1,
         rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.5, "rope_type": "default"}),
    _moe("qwen3_moe", norm_topk_prob=True),
    _moe("qwen3_moe", norm_topk_prob=False),  # moe_router_pre_softmax
    _moe("qwen2_moe"),  # absent: transformers' Qwen2MoeConfig default is false -> moe_router_pre_softmax
    _moe("glm4_moe", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=2, topk_group=1,
         partial_rotary_factor=1.0),
    _tiny_qwen3(model_type="mistral", sliding_window=64),  # not shorter than the context
    _tiny_qwen3(sliding_window=16, use_sliding_window=False),
    _tiny_qwen3(model_type="smollm3", no_rope_layers=[1, 1]),
    _tiny_qwen3(model_type="smollm3", num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0]),
    _tiny_qwen3(model_type="mistral", sliding_window=16),
    _tiny_qwen3(sliding_window=16, use_sliding_window=True, max_window_layers=1),
    _tiny_qwen3(rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}),
    _tiny_qwen3(hidden_act="gelu_pytorch_tanh"),
    _tiny_qwen3(model_type="granite", attention_multiplier=0.5),
    _tiny_qwen3(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 2]}),
    _tiny_qwen3(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_theta": 5e5}),
])
def test_equivalent_values_pass(config: dict[str, Any]) -> None:
    report = check_config(config)
    assert report.ok, _codes(report)


def test_absent_rotary_fraction_takes_the_transformers_default() -> None:
    """GLM-4-MoE's class default partial_rotary_factor is 0.5; the bridge's fallback is 1.0."""
    cfg = _moe("glm4_moe", rope_parameters={"rope_theta": 1e4, "rope_type": "default"})
    assert ("semantics.unsupported", "partial_rotary_factor") in _codes(check_config(cfg))


def test_absent_epsilon_takes_the_transformers_default() -> None:
    """Llama's class default rms_norm_eps is 1e-6 = the bridge's fallback; a class whose default differs is
    refused while the key is absent (the bridge would silently use 1e-6)."""
    cfg = _tiny_qwen3(model_type="llama")
    del cfg["rms_norm_eps"]
    assert check_config(cfg).ok
    cfg = _tiny_qwen3(model_type="mixtral")
    del cfg["rms_norm_eps"]
    assert ("semantics.unsupported", "rms_norm_eps") in _codes(check_config(cfg))


# ---------------------------------------------------------------------------------------------------------
# Unknown keys, escapes, scope
# ---------------------------------------------------------------------------------------------------------
def test_unknown_key_names_key_value_and_file() -> None:
    report = check_config(_tiny_qwen3(frobnicate=3), file="x/config.json")
    (d,) = report.errors
    assert (d.code, d.key, d.file) == ("config.unknown-field", "frobnicate", "x/config.json")
    assert "= 3" in d.message
    assert "--assume-inert frobnicate" in d.hint


def test_escapes_are_recorded() -> None:
    report = check_config(_moe("dots1", norm_topk_prob=False, frobnicate=3), assume_inert=["frobnicate"],
                          accept_gaps=["norm_topk_prob"])
    assert report.ok
    data = report.to_json()
    assert data["assumed_inert"] == ["frobnicate"]
    assert data["accepted_gaps"] == ["norm_topk_prob"]
    assert data["fields"]["frobnicate"]["escape"] == "assume-inert"
    assert data["fields"]["norm_topk_prob"]["escape"] == "accept-semantic-gap"
    assert [d.code for d in report.diagnostics] == ["semantics.gap-accepted"]


def test_text_config_is_classified_with_its_own_defaults() -> None:
    cfg = {"model_type": "qwen3_vl_moe", "architectures": ["Qwen3VLMoeForConditionalGeneration"],
           "text_config": _moe("qwen3_vl_moe_text", num_experts_per_tok=1), "vision_config": {"depth": 2}}
    report = check_config(cfg)
    # Qwen3-VL-MoE's router always renormalises: at top-1 megatron-core cannot (it requires pre-softmax)
    assert ("semantics.unsupported", "text_config.num_experts_per_tok") in _codes(report)
    assert check_config(cfg, accept_gaps=["num_experts_per_tok"]).ok
    # ... and it never reads norm_topk_prob: false is not a gap for it
    cfg["text_config"] = _moe("qwen3_vl_moe_text", norm_topk_prob=False)
    assert check_config(cfg).ok, _codes(check_config(cfg))


@pytest.mark.parametrize(("config", "code"), [
    ({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}, "scope.no-model-type"),
    ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, "scope.encoder-decoder"),
    ({"model_type": "bart", "is_encoder_decoder": True}, "scope.encoder-decoder"),
    ({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}, "scope.no-lm-head"),
    ({"model_type": "gpt_neox_reward_model", "architectures": ["GPTNeoXRewardModel"]}, "scope.no-lm-head"),
    ({"model_type": "qwen3", "architectures": ["Qwen3Model"]}, "scope.no-lm-head"),
])
def test_out_of_scope_is_one_line(config: dict[str, Any], code: str) -> None:
    report = check_config(config)
    (d,) = report.diagnostics
    assert d.code == code
    assert d.message.startswith("out of scope: ")
    assert "\n" not in d.message


# ---------------------------------------------------------------------------------------------------------
# Drift against the installed transformers
# ---------------------------------------------------------------------------------------------------------
def test_defaults_table_matches_installed_transformers() -> None:
    from regen_catalog_defaults import TARGET, compute, render

    assert TARGET.read_text(encoding="utf-8") == render(compute()), (
        "mapgen/catalog/defaults.json is stale; run: .venv/bin/python -m tests.regen_catalog_defaults")


def test_known_names_match_installed_transformers() -> None:
    from transformers.activations import ACT2FN
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mapgen.catalog.fields import ACTIVATIONS

    assert set(ACT2FN) == ACTIVATIONS
    assert set(ROPE_INIT_FUNCTIONS) | {"default"} <= ROPE_TYPES


# ---------------------------------------------------------------------------------------------------------
# The CLI gate: nothing is written, no traceback
# ---------------------------------------------------------------------------------------------------------
def _mapgen(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "mapgen", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env, check=False)


def _checkpoint(tmp: Path, **changes: Any) -> Path:
    src = REPO / "tests" / "fixtures" / "corpus" / "qwen3-1.7b-mlx-bf16"
    d = tmp / "ckpt"
    d.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors.index.json").write_text((src / "model.safetensors.index.json").read_text())
    return d


def test_scan_json_lists_verdicts(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    proc = _mapgen("scan", str(d), "--json", "-", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fields = json.loads(proc.stdout)["config_fields"]["fields"]
    assert fields["hidden_size"] == {"megatron": ["hidden_size"], "reason": "sizes the Megatron model",
                                     "source": "config.json", "verdict": "mapped", "via": "config"}
    assert fields["bos_token_id"]["verdict"] == "inert"


@pytest.mark.parametrize(("command", "changes", "code"), [
    ("emit", {"hidden_size": -5}, "config.invalid-value"),
    ("emit", {"num_attention_heads": 0}, "config.invalid-value"),
    ("scan", {"rms_norm_eps": -1}, "config.invalid-value"),
    ("scan", {"frobnicate": 1}, "config.unknown-field"),
    ("emit", {"hidden_act": "mish"}, "semantics.unsupported"),
    ("scan", {"model_type": None}, "scope.no-model-type"),
])
def test_cli_refuses_before_writing(tmp_path: Path, command: str, changes: dict[str, Any], code: str) -> None:
    d = _checkpoint(tmp_path, **changes)
    args = [command, str(d)] + (["--out", str(tmp_path / "gen")] if command == "emit" else ["-q"])
    proc = _mapgen(*args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"error: {code}:" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "gen").exists()


def test_cli_escape_flags(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path, frobnicate=1, hidden_act="mish")
    proc = _mapgen("scan", str(d), "-q", "--assume-inert", "frobnicate", "--accept-semantic-gap", "hidden_act",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "semantics.gap-accepted" in proc.stderr


@pytest.mark.slow
def test_convert_records_the_accepted_gap(tmp_path: Path) -> None:
    """--accept-semantic-gap converts the weights and records the gap (and every verdict) in mapgen.json."""
    from tiny import write

    src = write("qwen3-moe", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_experts_per_tok"] = 1  # renormalised top-1 routing: megatron-core requires pre-softmax at top-1
    (src / "config.json").write_text(json.dumps(cfg))
    refused = _mapgen("convert", str(src), str(tmp_path / "out"), cwd=tmp_path)
    assert refused.returncode == 1
    assert "error: semantics.unsupported:" in refused.stderr
    assert not (tmp_path / "out").exists()
    done = _mapgen("convert", str(src), str(tmp_path / "out"), "--accept-semantic-gap", "norm_topk_prob",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "out" / "mapgen.json").read_text())["config_check"]
    assert meta["accepted_gaps"] == ["norm_topk_prob"]
    assert meta["fields"]["norm_topk_prob"]["escape"] == "accept-semantic-gap"
