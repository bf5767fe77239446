"""Issue 11 (breadth): dense decoder families beyond Llama names.

* every shared real case still in ``tests/fixtures/corpus_pending/`` has a named verdict: scan classifies every
  key (or lists the ones it cannot) and the config catalog, the scope check or the planner refuses it by name;
* block shapes megatron-core cannot build (parallel attention + MLP, sandwich / post norms) are refused by the
  planner with ``plan.megatron-lacks`` before anything is written;
* LayerNorm-with-bias and plain-MLP layouts: the facts and rules they plan into, and the refusals when keys and
  model-type facts disagree;
* GPT-NeoX (fused per-head ``query_key_value``, LayerNorm with bias, plain MLP with biases, partial RoPE,
  ``embed_in``/``embed_out``) written by transformers converts and verifies at TP=2 (slow, distributed);
* GPT-2 (``Conv1D`` weights stored ``[in, out]``, ``c_attn`` as [q; k; v] blocks, learned absolute positions
  ``wpe``) and a Llama with stored ``rotary_emb.inv_freq`` buffers verify at TP=2 too: opt-in
  (``MAPGEN_MATRIX=full``), to keep CI's budget; their rules and refusals are checked here without a run;
* PP=2: GPT-2 (tied head across stages, learned positions) and GPT-NeoX (untied ``embed_out``) verify bitwise with
  logits parity of megatron-core's pipelined forward (distributed); TP=2 x PP=2 opt-in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from scan_support import CORPUS_PENDING
from semantics_matrix import ATOL, run_case

from mapgen.catalog import check_config
from mapgen.errors import MapgenError
from mapgen.infer import scan
from mapgen.ir import Component, Layout
from mapgen.plan.planner import plan

FULL = os.environ.get("MAPGEN_MATRIX") == "full"

# case -> (unclassified keys, catalog/scope error codes, planner error codes; None: the plan succeeds)
PENDING: dict[str, tuple[int, set[str], set[str] | None]] = {
    "falcon-180b-chat": (0, {"semantics.unsupported"}, {"plan.megatron-lacks"}),  # ln_attn/ln_mlp parallel block
    "gemma-2b-it": (0, {"semantics.unsupported"}, None),  # embedding scale, (1 + w) norms, GELU: the catalog
    "medgemma-27b-it-gemma3": (0, {"semantics.unsupported"}, {"plan.megatron-lacks"}),  # sandwich norms
    "oasst-rm-pythia-1.4b-gpt-neox": (-1, {"scope.no-lm-head"}, None),  # a reward model: out of scope
}


def _case(name: str) -> Path:
    return CORPUS_PENDING / name


def test_every_pending_case_has_a_verdict() -> None:
    assert sorted(PENDING) == sorted(p.name for p in CORPUS_PENDING.iterdir() if p.is_dir())


@pytest.mark.parametrize("name", sorted(PENDING))
def test_pending_case_verdict(name: str) -> None:
    unclassified, catalog_codes, plan_codes = PENDING[name]
    config = json.loads((_case(name) / "config.json").read_text())
    report = check_config(config, file="config.json")
    assert {d.code for d in report.errors} == catalog_codes
    if report.scope_error:
        return
    layout = scan(str(_case(name)))
    assert sum(u.count for u in layout.unclassified) == unclassified
    if unclassified:
        return
    if plan_codes is None:
        plan(layout)
        return
    with pytest.raises(MapgenError) as err:
        plan(layout)
    assert {d.code for d in err.value.diagnostics} == plan_codes
    assert all("megatron-core" in d.message for d in err.value.diagnostics)


def test_falcon_keys_are_named_and_the_parallel_block_refused() -> None:
    layout = scan(str(_case("falcon-180b-chat")))
    (group,) = layout.language_model.groups
    assert group.block.variant == "parallel_two_norms"
    assert group.block.key("attention_branch_norm_bias") == "ln_attn.bias"
    assert group.mixer.key("qkv") == "self_attention.query_key_value.weight"
    assert group.mixer.flag("qkv_layout") == "per_group"
    assert group.mlp.variant == "plain"
    assert layout.language_model.top.key("final_norm_bias") == "transformer.ln_f.bias"
    with pytest.raises(MapgenError) as err:
        plan(layout)
    (diag,) = err.value.diagnostics
    assert "parallel attention + MLP" in diag.message
    assert diag.key == "transformer.h.{layer}.ln_attn.weight"


def _edit(layout: Layout, **changes: Any) -> Layout:
    """``layout`` with its first group's block/mixer/mlp replaced and/or its model_type changed."""
    import dataclasses

    lm = layout.language_model
    group = lm.groups[0]
    group = dataclasses.replace(group, **{k: v for k, v in changes.items() if k in ("block", "mixer", "mlp")})
    lm = dataclasses.replace(lm, groups=(group, *lm.groups[1:]))
    out = dataclasses.replace(layout, language_model=lm)
    if "model_type" in changes:
        out = dataclasses.replace(out, model_type=changes["model_type"], text_model_type=changes["model_type"])
    return out


def _component(c: Component, drop: tuple[str, ...] = (), **slots: str) -> Component:
    keys = {k: v for k, v in c.slots if k not in drop} | slots
    return Component.make(c.family, c.variant, keys, flags=dict(c.flags), counts=dict(c.counts))


def test_stablelm_layernorm_rules_and_facts() -> None:
    from scan_support import CORPUS

    layout = scan(str(CORPUS / "stable-code-3b-stablelm"))
    bridge = plan(layout)
    assert bridge.facts.layernorm
    by_megatron = {r.megatron: r for r in bridge.rules}
    for megatron, hf in (("decoder.layers.{layer}.input_layernorm.bias", "model.layers.{layer}.input_layernorm.bias"),
                         ("decoder.layers.{layer}.pre_mlp_layernorm.bias",
                          "model.layers.{layer}.post_attention_layernorm.bias"),
                         ("decoder.final_layernorm.bias", "model.norm.bias")):
        assert by_megatron[megatron].hf == (hf,)
        assert by_megatron[megatron].sharding == "replicated"


def test_norm_bias_and_layernorm_fact_must_agree() -> None:
    from scan_support import CORPUS

    layout = scan(str(CORPUS / "stable-code-3b-stablelm"))
    with pytest.raises(MapgenError, match="not declared LayerNorm"):  # biases on an RMSNorm model type
        plan(_edit(layout, model_type="llama"))
    block = _component(layout.language_model.groups[0].block, drop=("input_norm_bias",))
    with pytest.raises(MapgenError, match="LayerNorm without a bias"):
        plan(_edit(layout, block=block))


def test_plain_mlp_biases_must_agree_with_the_attention_output_bias() -> None:
    """megatron-core's add_bias_linear biases linear_proj and the MLP together: a layout with one and not the other
    is refused by name (never a proof failure or a silently zero bias)."""
    layout = scan(str(_case("falcon-180b-chat")))
    lm = layout.language_model
    block = Component.make("norms", "pre_norm", {"input_norm": "input_layernorm.weight",
                                                 "post_attention_norm": "post_attention_layernorm.weight",
                                                 "input_norm_bias": "input_layernorm.bias",
                                                 "post_attention_norm_bias": "post_attention_layernorm.bias"})
    mlp = _component(lm.groups[0].mlp, fc1_bias="mlp.dense_h_to_4h.bias", fc2_bias="mlp.dense_4h_to_h.bias")
    with pytest.raises(MapgenError, match="add_bias_linear"):
        plan(_edit(layout, block=block, mlp=mlp, model_type="gpt_neox"))


@pytest.mark.slow
@pytest.mark.distributed
def test_gpt_neox_verifies_at_tp2(tmp_path: Path) -> None:
    """GPT-NeoX with a sequential residual (use_parallel_residual=False): per-head fused query_key_value + bias,
    dense bias, LayerNorm with bias, plain GELU MLP with biases, rotary_pct 0.25, embed_in/embed_out."""
    case = run_case("gpt_neox", tmp_path, overrides={"use_parallel_residual": False})
    assert case.outcome == "verified", case.row()
    assert case.max_diff is not None
    assert case.max_diff <= ATOL


# -- PP=2: first / last stage owning the embedding, learned positions, final norm, output layer --------------------
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("model_type", "overrides", "parallel"), [
    # tied head: the last stage's output_layer is the first stage's word_embeddings (megatron-core keeps the
    # copies in sync); learned positions (wpe) and Conv1D on the first stage
    ("gpt2", {"n_inner": None}, ("--pp", "2")),
    # untied embed_out on the last stage, LayerNorm final norm with bias, fused per-head query_key_value
    ("gpt_neox", {"use_parallel_residual": False}, ("--pp", "2")),
], ids=["gpt2-pp2", "gpt_neox-pp2"])
def test_verifies_at_pp2(tmp_path: Path, model_type: str, overrides: dict[str, Any],
                         parallel: tuple[str, ...]) -> None:
    """``verify --pp 2``: the round trip bitwise and the logits of megatron-core's own pipelined forward (stage 0
    sends its hidden states to stage 1, which broadcasts the logits back) against transformers."""
    case = run_case(model_type, tmp_path, overrides=overrides, parallel=parallel)
    assert case.outcome == "verified", case.row()
    assert case.max_diff is not None
    assert case.max_diff <= ATOL


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not FULL, reason="opt-in: MAPGEN_MATRIX=full (about a minute, 4 ranks)")
@pytest.mark.parametrize("model_type", ["gpt2", "starcoder2"])
def test_verifies_at_tp2_pp2(tmp_path: Path, model_type: str) -> None:
    case = run_case(model_type, tmp_path, parallel=("--tp", "2", "--pp", "2"))
    assert case.outcome == "verified", case.row()


# -- OPT: decoder prefix, fc1/fc2 directly in the layer, learned positions at position + 2 ---------------------------
def test_opt_rules(tmp_path: Path) -> None:
    """OPT as transformers writes it: every key classified; the position table rotated by its offset of 2 (the
    Megatron table is 2 rows longer, nothing is dropped); LayerNorm eps 1e-5 from the model code (no config key)."""
    from semantics_matrix import build

    from mapgen.contract.config import model_spec
    from mapgen.contract.hf_config import HFConfig

    build("opt", tmp_path / "opt")
    layout = scan(str(tmp_path / "opt"))  # headers read: embed_positions is checked [max_positions + 2, hidden]
    assert not layout.unclassified
    assert layout.language_model.prefix == "model.decoder."
    group = layout.language_model.groups[0]
    assert (group.block.key("input_norm"), group.block.key("post_attention_norm")) == (
        "self_attn_layer_norm.weight", "final_layer_norm.weight")
    assert (group.mlp.variant, group.mlp.key("fc1")) == ("plain", "fc1.weight")
    bridge = plan(layout)
    assert (bridge.facts.layernorm, bridge.facts.add_qkv_bias, bridge.facts.add_bias_linear) == (True, True, True)
    spec = model_spec(HFConfig(layout.config), layout, bridge.facts)
    assert spec.max_position_embeddings == layout.config["max_position_embeddings"] + 2
    assert spec.norm_epsilon == 1e-5
    assert spec.position_embedding_type == "learned_absolute"
    (position,) = [r for r in bridge.rules if r.megatron == "embedding.position_embeddings.weight"]
    assert (position.hf, position.option("roll")) == (("model.decoder.embed_positions.weight",), 2)


def test_a_position_table_needs_a_declared_offset(tmp_path: Path) -> None:
    """embed_positions in a model type that declares no offset is refused (the spelling does not say whether
    position 0 is row 0 or row 2), never mapped as GPT-2's wpe."""
    from semantics_matrix import build

    ckpt = tmp_path / "opt"
    build("opt", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | {"model_type": "my_opt_fork"}))
    with pytest.raises(MapgenError) as err:
        plan(scan(str(ckpt), headers=False))
    assert any("declares no position offset" in d.message and d.key == "model.decoder.embed_positions.weight"
               for d in err.value.diagnostics)


def test_opt_position_roll_is_a_permutation() -> None:
    """The roll op: Megatron row i is HF row i + 2; export rotates back bitwise (no row is dropped); the plain-copy
    spans the streaming convert moves without reading say the same."""
    import torch

    from mapgen import ops
    from mapgen.contract.rules import Rule
    from mapgen.contract.spec import ModelSpec

    hf = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    rule = Rule(family="position_embedding", megatron="embedding.position_embeddings.weight", hf=("p",), op="copy",
                sharding="replicated", domain="global", options=(("roll", 2),))
    spec = ModelSpec(num_layers=1, hidden_size=3, num_attention_heads=1, num_query_groups=1, kv_channels=3,
                     ffn_hidden_size=4, vocab_size=8, max_position_embeddings=10)
    got = ops.load(rule, ("p",), spec, ops.Shard(0, 1), ops.DictReader({"p": hf}))
    assert torch.equal(got[:8], hf[2:])
    assert torch.equal(got[8:], hf[:2])
    (frag,) = ops.save(rule, ("p",), spec, got)
    assert torch.equal(frag.tensor, hf)
    # the streaming convert's file-to-file path: the same rows as two blocks of the stored table
    reader = ops.DictReader({"p": hf})
    blocks = ops.spans(rule, ("p",), spec, ops.Shard(0, 1), reader)
    assert blocks is not None
    assert torch.equal(torch.cat([reader.read(key, index) for key, index in blocks]), got)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"do_layer_norm_before": False}, "do_layer_norm_before"),  # OPT-350m: post-norm blocks
    ({"word_embed_proj_dim": 32}, "word_embed_proj_dim"),  # project_in / project_out
    ({"layer_norm_elementwise_affine": False}, "layer_norm_elementwise_affine"),
])
def test_opt_variants_megatron_cannot_build_are_refused_by_name(overrides: dict[str, Any], field: str) -> None:
    from transformers import OPTConfig

    config = OPTConfig(**overrides).to_dict()
    report = check_config(config, file="config.json")
    assert {(d.code, d.key) for d in report.errors} == {("semantics.unsupported", field)}


@pytest.mark.slow
@pytest.mark.distributed
def test_opt_verifies_at_tp2_and_exports_without_its_source(tmp_path: Path) -> None:
    """OPT (relu fc1/fc2 with biases, q/k/v/out_proj biases, LayerNorm with bias, tied head, positions + 2) verifies
    at TP=2; then convert at TP=2 and export with no --source reproduce the checkpoint bitwise: the 2 rows before
    position 0 live in the Megatron table (rotated), and the exporter reads the vocabulary padded as saved
    (vocab 128: 256 rows at TP=2, where a TP=1 reader would pad to 128)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    case = run_case("opt", tmp_path)
    assert case.outcome == "verified", case.row()
    assert case.max_diff is not None
    assert case.max_diff <= ATOL
    src, gen = tmp_path / "opt" / "hf", tmp_path / "opt" / "pkg" / "generated"
    run = [sys.executable, "-m", "mapgen"]
    env = dict(os.environ, MAPGEN_PROGRESS="0")
    for args in (["convert", str(src), str(tmp_path / "mcore"), "--tp", "2"],
                 ["export", str(tmp_path / "mcore"), str(tmp_path / "back")]):
        done = subprocess.run([*run, *args, "--bridges", str(gen)], capture_output=True, text=True, env=env,
                              check=False)
        assert done.returncode == 0, done.stderr[-2000:]
    index = "model.safetensors.index.json"
    assert json.loads((src / index).read_text())["weight_map"] == json.loads(
        (tmp_path / "back" / index).read_text())["weight_map"]
    for shard in sorted(p.name for p in src.glob("*.safetensors")):
        want, got = load_file(str(src / shard)), load_file(str(tmp_path / "back" / shard))
        assert want.keys() == got.keys()
        assert all(want[k].equal(got[k]) for k in want), shard


# -- OLMo-2/3, OLMoE, FlexOlmo: post-norm-only blocks and QK norms over the whole projection -------------------------
@pytest.mark.parametrize(("model_type", "post_norm"), [("olmo2", True), ("olmo3", True), ("olmoe", False),
                                                       ("flex_olmo", True)])
def test_olmo_layouts_are_classified_and_refused_by_name(tmp_path: Path, model_type: str, post_norm: bool) -> None:
    """Every key is classified (q_norm sized [heads * head_dim], k_norm [kv_heads * head_dim]: a model-type fact,
    not a shape error); the catalog and the planner both refuse what megatron-core lacks, by name."""
    from semantics_matrix import build

    build(model_type, tmp_path / model_type)
    layout = scan(str(tmp_path / model_type))  # headers read: the QK-norm shapes are checked
    assert not layout.unclassified
    group = layout.language_model.groups[0]
    assert group.mixer.flag("qk_norm_projection") is True
    assert group.block.variant == ("post_norm" if post_norm else "pre_norm")
    report = check_config(layout.config, file="config.json")
    refused = {d.key for d in report.errors if d.code == "semantics.unsupported"}
    assert "model_type.qk-norm-over-all-heads" in refused
    assert ("model_type.post-norm-block" in refused) == post_norm
    with pytest.raises(MapgenError) as err:
        plan(layout)
    lacks = {d.key: d.message for d in err.value.diagnostics if d.code == "plan.megatron-lacks"}
    assert {d.code for d in err.value.diagnostics} == {"plan.megatron-lacks"}
    assert "whole q / k projection" in lacks["model.layers.{layer}.self_attn.q_norm.weight"]
    assert ("model.layers.{layer}.post_attention_layernorm.weight" in lacks) == post_norm
    assert all("megatron-core" in m for m in lacks.values())


# -- Baichuan (remote code only): W_pack [q; k; v] blocks; ALiBi (13B) and NormHead (Baichuan2) refused ----------
BAICHUAN_7B = Path(__file__).resolve().parent / "fixtures" / "layouts" / "baichuan-7b"


def test_baichuan_w_pack_is_declared_blocks() -> None:
    from mapgen.families.attention import FUSED_QKV_LAYOUT

    assert FUSED_QKV_LAYOUT["self_attn.W_pack.weight"] == "blocks"
    layout = scan(str(BAICHUAN_7B))
    assert not layout.unclassified
    assert [t.name for t in layout.towers] == ["derived_rope_buffers"]  # inv_freq: checked, dropped, restored
    mixer = layout.language_model.groups[0].mixer
    assert (mixer.key("qkv"), mixer.flag("qkv_layout")) == ("self_attn.W_pack.weight", "blocks")
    rules = {r.megatron.removeprefix("decoder.layers.{layer}."): r for r in plan(layout).rules}
    qkv = rules["self_attention.linear_qkv.weight"]
    assert (qkv.hf, qkv.sharding, qkv.option("layout")) == (("model.layers.{layer}.self_attn.W_pack.weight",),
                                                            "qkv_groups", "blocks")
    assert check_config(layout.config).ok


@pytest.mark.parametrize(("changes", "facts"), [
    ({}, set()),  # Baichuan-7B: RoPE from max_position_embeddings, plain lm_head
    # Baichuan-13B: no max_position_embeddings, ALiBi from model_max_length
    ({"max_position_embeddings": None, "model_max_length": 4096}, {"model_type.alibi"}),
    ({"z_loss_weight": 0}, {"model_type.normhead"}),  # Baichuan2-7B: NormHead
    ({"max_position_embeddings": None, "model_max_length": 4096, "z_loss_weight": 0},  # Baichuan2-13B
     {"model_type.alibi", "model_type.normhead"}),
])
def test_baichuan_variants_megatron_cannot_build_are_refused_by_name(changes: dict[str, Any],
                                                                      facts: set[str]) -> None:
    config = json.loads((BAICHUAN_7B / "config.json").read_text())
    config = {k: v for k, v in (config | changes).items() if v is not None}
    report = check_config(config)
    assert {d.key for d in report.errors} == facts
    assert {d.code for d in report.errors} <= {"semantics.unsupported"}


@pytest.mark.slow
@pytest.mark.distributed
def test_baichuan_synthesized_round_trip_at_tp2(tmp_path: Path) -> None:
    """``mapgen synth`` of the Baichuan-7B layout, then ``verify --tp 2`` with the shipped bridge: W_pack regrouped
    per query group and back, the inv_freq buffers checked against the config and restored, bitwise; logits are
    honestly skipped (no transformers class for model_type 'baichuan')."""
    import subprocess
    import sys

    tiny = tmp_path / "baichuan"
    run = [sys.executable, "-m", "mapgen"]
    env = dict(os.environ, MAPGEN_PROGRESS="0")
    subprocess.run([*run, "synth", str(BAICHUAN_7B), str(tiny), "--hidden", "64", "--heads", "4", "--head-dim", "16",
                    "--dtype", "fp32"], check=True, capture_output=True, env=env)
    out = subprocess.run([*run, "verify", str(tiny), "--tp", "2"], capture_output=True, text=True, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "bitwise identical" in out.stdout
    (line,) = [x for x in out.stdout.splitlines() if "inv_freq buffers (2) vs the config's RoPE" in x]
    assert line.endswith("-> OK")
    assert "skipped: no reference model" in out.stdout


# -- derived RoPE buffers (rotary_emb.inv_freq: LLaVA-1.5, older Llama exports) ---------------------------------
def _add_inv_freq(ckpt: Path, scale: float = 1.0) -> None:
    """Store ``model.layers.<i>.self_attn.rotary_emb.inv_freq`` as transformers 4.x exports did (a shard of its
    own, listed in the index), computed from the config (``scale`` != 1 corrupts them)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((ckpt / "config.json").read_text())
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta", 10000.0)
    inv = scale / (float(base) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    tensors = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv.clone()
               for i in range(config["num_hidden_layers"])}
    save_file(tensors, str(ckpt / "rope-buffers.safetensors"), metadata={"format": "pt"})
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update(dict.fromkeys(tensors, "rope-buffers.safetensors"))
    index_path.write_text(json.dumps(index, indent=2))


def test_rope_buffers_are_carried_and_checked(tmp_path: Path) -> None:
    from semantics_matrix import build

    from mapgen.contract.config import model_spec
    from mapgen.contract.hf_config import HFConfig
    from mapgen.runtime.api import HFSource
    from mapgen.runtime.verify import rope_buffer_check

    for scale, ok in ((1.0, True), (2.0, False)):
        ckpt = tmp_path / f"llama-{scale}"
        build("llama", ckpt)
        _add_inv_freq(ckpt, scale)
        layout = scan(str(ckpt))
        assert not layout.unclassified
        (tower,) = layout.towers
        assert tower.name == "derived_rope_buffers"
        assert tower.patterns == ("model.layers.{0..1}.self_attn.rotary_emb.inv_freq",)
        assert not any("inv_freq" in r.hf[0] for r in plan(layout).rules)  # dropped on import: no rule reads them
        spec = model_spec(HFConfig(layout.config), layout, plan(layout).facts)
        found = rope_buffer_check(HFSource.open(ckpt), spec)
        assert found is not None
        assert found["checked"] == 2
        assert found["ok"] is ok, found


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not FULL, reason="opt-in: MAPGEN_MATRIX=full (about a minute)")
def test_llama_with_rope_buffers_verifies_at_tp2(tmp_path: Path) -> None:
    """The buffers come back bitwise on export (copied from the source, in their shard) and logits match."""
    case = run_case("llama", tmp_path, post_build=_add_inv_freq)
    assert case.outcome == "verified", case.row()


# -- GPT-2: Conv1D storage, learned absolute positions -----------------------------------------------------------
def test_gpt2_rules(tmp_path: Path) -> None:
    from semantics_matrix import build

    from mapgen.contract.config import model_spec
    from mapgen.contract.hf_config import HFConfig

    build("gpt2", tmp_path / "gpt2", overrides={"activation_function": "silu"})
    layout = scan(str(tmp_path / "gpt2"))  # headers read: the Conv1D shapes are checked [in, out]
    assert not layout.unclassified
    bridge = plan(layout)
    assert model_spec(HFConfig(layout.config), layout, bridge.facts).position_embedding_type == "learned_absolute"
    assert bridge.facts.layernorm
    assert bridge.facts.non_gated_mlp
    assert bridge.facts.add_bias_linear
    rules = {r.megatron.removeprefix("decoder.layers.{layer}."): r for r in bridge.rules}
    for megatron in ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight", "mlp.linear_fc1.weight",
                     "mlp.linear_fc2.weight"):
        assert rules[megatron].option("orientation") == "in_out", megatron
    assert rules["self_attention.linear_qkv.weight"].option("layout") == "blocks"
    assert rules["self_attention.linear_qkv.bias"].option("orientation") is None
    position = rules["embedding.position_embeddings.weight"]
    assert (position.hf, position.sharding) == (("transformer.wpe.weight",), "replicated")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not FULL, reason="opt-in: MAPGEN_MATRIX=full (about two minutes)")
def test_gpt2_verifies_at_tp2(tmp_path: Path) -> None:
    """GPT-2 as transformers writes it (gelu_new, Conv1D, wpe, tied head, n_inner null)."""
    case = run_case("gpt2", tmp_path, overrides={"n_inner": None})  # as real GPT-2 configs: 4 * n_embd
    assert case.outcome == "verified", case.row()


def _drop_stray_kv_heads(ckpt: Path) -> None:
    """The matrix builder states ``num_key_value_heads: 2`` for every config; GPT-BigCode's config class derives it
    from ``multi_query`` (1, else ``n_head``) and its code never reads it: drop it, as real configs have it."""
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    config.pop("num_key_value_heads", None)
    path.write_text(json.dumps(config))


def test_gpt_bigcode_multi_query_verifies_and_tp2_is_refused(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """GPT-BigCode (StarCoder-1, SantaCoder) with ``multi_query``: one KV head for every query head
    (num_query_groups 1), ``c_attn`` ``[q; k; v]`` as nn.Linear; its softmax-precision switches are inert.
    Verifies at TP=1; TP=2 is refused by name before anything is written (megatron-core splits the KV groups
    over TP and does not replicate one)."""
    from mapgen.cli import main
    from mapgen.contract.config import model_spec
    from mapgen.contract.hf_config import HFConfig

    case = run_case("gpt_bigcode", tmp_path, post_build=_drop_stray_kv_heads, parallel=("--tp", "1"))
    assert case.outcome == "verified", case.row()
    assert case.max_diff is not None
    assert case.max_diff <= ATOL
    ckpt, gen = tmp_path / "gpt_bigcode" / "hf", tmp_path / "gpt_bigcode" / "pkg" / "generated"
    layout = scan(str(ckpt))
    bridge = plan(layout)
    assert model_spec(HFConfig(layout.config), layout, bridge.facts).num_query_groups == 1
    rules = {r.megatron.removeprefix("decoder.layers.{layer}."): r for r in bridge.rules}
    assert rules["self_attention.linear_qkv.weight"].option("layout") == "per_group"
    assert rules["self_attention.linear_qkv.weight"].option("orientation") is None  # nn.Linear, not Conv1D
    capsys.readouterr()
    assert main(["convert", str(ckpt), str(tmp_path / "out"), "--tp", "2", "--bridges", str(gen)]) != 0
    assert "parallel.divisibility: num_query_groups=1 is not divisible by tp=2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_gpt_bigcode_multi_head_verifies_at_tp2(tmp_path: Path) -> None:
    """GPT-BigCode without ``multi_query`` stores ``c_attn`` per head ``[q_h; k_h; v_h]`` (view(..., heads, 3 *
    head_dim)), not GPT-2's ``[q; k; v]`` blocks under the same root and spelling: the model type declares it."""
    case = run_case("gpt_bigcode", tmp_path, overrides={"multi_query": False}, post_build=_drop_stray_kv_heads)
    assert case.outcome == "verified", case.row()


def test_sarvam_mla_routes_as_deepseek_v3(tmp_path: Path) -> None:
    """Sarvam-MLA is DeepSeek-V3's model class under its own model type (modeling_auto: DeepseekV3ForCausalLM;
    SarvamMLAConfig subclasses DeepseekV3Config): the same router facts, so the catalog accepts its routing keys
    (it refused routed_scaling_factor while the model type had no router scheme)."""
    from semantics_matrix import build

    from mapgen.families.model_types import facts_for

    assert facts_for(["sarvam_mla"]) == facts_for(["deepseek_v3"])
    build("sarvam_mla", tmp_path / "hf")
    report = check_config(json.loads((tmp_path / "hf" / "config.json").read_text()), file="config.json")
    assert report.ok, [d.message for d in report.errors]


@pytest.mark.slow
@pytest.mark.distributed
def test_sarvam_mla_verifies_at_tp2_ep2(tmp_path: Path) -> None:  # about 20 s
    case = run_case("sarvam_mla", tmp_path)
    assert case.outcome == "verified", case.row()


def test_granite_swa_per_layer_rope_base_is_refused_unless_it_is_rope_theta(tmp_path: Path) -> None:
    """Granite-SWA's ``layer_rope_theta`` gives each layer its RoPE base (0: no RoPE on that layer); its config
    class fills it with ``rope_theta``, which is the bridge's one rotary_base. Any other base is refused by name."""
    from semantics_matrix import build

    build("granite_swa", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    theta = config["rope_parameters"]["rope_theta"]
    assert config["layer_rope_theta"] == [theta, theta]
    assert check_config(config, file="config.json").ok
    for other in ([theta, 0], [theta, 2 * theta]):
        report = check_config({**config, "layer_rope_theta": other}, file="config.json")
        assert [(d.code, d.key) for d in report.errors] == [("semantics.unsupported", "layer_rope_theta")], other


@pytest.mark.slow
@pytest.mark.distributed
def test_granite_swa_verifies_at_tp2(tmp_path: Path) -> None:  # about 20 s
    """Granite multipliers at 1, a full-attention layer and a sliding one (window 4 < the 11 tokens verified)."""
    case = run_case("granite_swa", tmp_path)
    assert case.outcome == "verified", case.row()


@pytest.mark.slow
@pytest.mark.distributed
def test_interleaved_rope_is_megatrons_rotary_interleaved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """GLM (like Helium and ERNIE-4.5) rotates adjacent pairs of dims (rotate_half over x[..., 0::2] /
    x[..., 1::2], each frequency repeated twice), with partial rotary: a model-type fact that sets
    megatron-core's ``rotary_interleaved`` (Megatron-LM ``--rotary-interleaved``). Verifies at TP=2; without the
    fact, emit's numerical proof fails on the same checkpoint (the rotation is not visible in the keys)."""
    from dataclasses import replace

    from mapgen.cli import main
    from mapgen.contract.config import model_spec
    from mapgen.contract.hf_config import HFConfig
    from mapgen.families import model_types
    from mapgen.runtime.megatron_args import canonical, megatron_args, spec_from_args

    case = run_case("glm", tmp_path)
    assert case.outcome == "verified", case.row()
    ckpt = tmp_path / "glm" / "hf"
    layout = scan(str(ckpt))
    spec = model_spec(HFConfig(layout.config), layout, plan(layout).facts)
    assert spec.rotary_interleaved
    assert spec.rotary_percent < 1  # partial rotary: the pairs are those of the rotated slice
    argv = megatron_args(spec)
    assert argv is not None
    assert "--rotary-interleaved" in argv
    assert spec_from_args(argv)[0] == canonical(spec)
    monkeypatch.setitem(model_types.MODEL_TYPES, "glm", replace(model_types.MODEL_TYPES["glm"],
                                                                rotary_interleaved=False))
    capsys.readouterr()
    assert main(["emit", str(ckpt), "--out", str(tmp_path / "halves")]) != 0
    assert "emit.numerics-diverged" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
def test_two_shared_experts_are_one_mlp_of_twice_the_size(tmp_path: Path) -> None:
    """DeepSeek-V2's releases fuse n_shared_experts = 2 into one shared MLP of 2 x moe_intermediate_size: the bridge
    built one of moe_intermediate_size and the load stopped at a shape mismatch; hf_config.shared_expert_size is now
    the one reading for the bridge and the shape check. Verifies at TP=2 x EP=2."""
    case = run_case("deepseek_v2", tmp_path, overrides={"n_shared_experts": 2})
    assert case.outcome == "verified", case.row()


@pytest.mark.slow
@pytest.mark.distributed
def test_aria_text_verifies_and_a_non_silu_activation_is_refused(tmp_path: Path) -> None:
    """Aria's text model: moe_num_experts / moe_topk spellings, packed experts stored (in, out) with gate then up
    (model-type facts), softmax over the top-k logits (renormalised), shared experts of moe_num_shared_experts x
    intermediate_size. Verifies at TP=2 x EP=2. Its routed experts are SiLU whatever hidden_act says while its
    shared experts follow hidden_act: another hidden_act is refused by name."""
    case = run_case("aria_text", tmp_path)
    assert case.outcome == "verified", case.row()
    config = json.loads((tmp_path / "aria_text" / "hf" / "config.json").read_text())
    assert config["moe_num_shared_experts"] > 1
    report = check_config({**config, "hidden_act": "gelu"}, file="config.json")
    assert [(d.code, d.key) for d in report.errors] == [("semantics.unsupported", "hidden_act")]
    assert "routed experts" in report.errors[0].message


def test_conv1d_spellings_need_a_declared_storage(tmp_path: Path) -> None:
    """c_attn/c_proj/c_fc are Conv1D [in, out] in GPT-2 and nn.Linear [out, in] in GPT-BigCode/StarCoder2: a model
    type that declares neither is refused, never guessed from the names."""
    from semantics_matrix import build

    ckpt = tmp_path / "gpt2"
    build("gpt2", ckpt, overrides={"activation_function": "silu"})
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | {"model_type": "my_gpt2_fork"}))
    layout = scan(str(ckpt), headers=False)
    with pytest.raises(MapgenError) as err:
        plan(layout)
    found = {d.message.split(" is recognised")[0] for d in err.value.diagnostics}
    assert any("declares neither Conv1D" in m for m in found), found
    assert any("not declared LayerNorm" in m for m in found), found  # and the LayerNorm fact is missing too


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not FULL, reason="opt-in: MAPGEN_MATRIX=full (about two minutes)")
def test_starcoder2_verifies_at_tp2(tmp_path: Path) -> None:
    """StarCoder2: c_fc/c_proj as nn.Linear (Facts.conv1d=False), q/k/v/o and MLP biases, LayerNorm with bias,
    norm_epsilon spelling, gelu_pytorch_tanh."""
    case = run_case("starcoder2", tmp_path)
    assert case.outcome == "verified", case.row()


def test_phi_parallel_block_and_head_bias_are_refused_by_name(tmp_path: Path) -> None:
    """Phi-1/2: one input norm feeding attention and MLP in parallel, and a biased output layer: every key is
    classified, and both are refused as what megatron-core cannot build."""
    from semantics_matrix import build

    build("phi", tmp_path / "phi")
    layout = scan(str(tmp_path / "phi"))
    assert not layout.unclassified
    assert layout.language_model.groups[0].block.variant == "parallel_one_norm"
    with pytest.raises(MapgenError) as err:
        plan(layout)
    lacks = {d.key for d in err.value.diagnostics if d.code == "plan.megatron-lacks"}
    assert lacks == {"model.layers.{layer}.input_layernorm.weight", "lm_head.bias"}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not FULL, reason="opt-in: MAPGEN_MATRIX=full (about a minute)")
def test_persimmon_verifies_at_tp2(tmp_path: Path) -> None:
    """Persimmon: per-head fused query_key_value, LayerNorm QK norms with bias, partial rotary 0.5, plain relu2 MLP
    with biases."""
    case = run_case("persimmon", tmp_path)
    assert case.outcome == "verified", case.row()


def test_a_fused_qkv_order_is_declared_per_root_and_spelling() -> None:
    """qkv_proj is Phi-3's [q; k; v] under self_attn. but CodeGen's mp_num-interleaved order under attn.: the
    declaration names the root, so CodeGen's is undeclared (refused by the planner), never read as Phi-3's."""
    from mapgen.families.attention import FUSED_QKV_LAYOUT

    assert FUSED_QKV_LAYOUT["self_attn.qkv_proj.weight"] == "blocks"
    assert "attn.qkv_proj.weight" not in FUSED_QKV_LAYOUT


def test_persimmon_rules(tmp_path: Path) -> None:
    """Persimmon's fused self_attn.query_key_value is declared per head, its QK norms are LayerNorms with bias."""
    from semantics_matrix import build

    build("persimmon", tmp_path / "persimmon")
    layout = scan(str(tmp_path / "persimmon"))
    assert not layout.unclassified
    rules = {r.megatron.removeprefix("decoder.layers.{layer}."): r for r in plan(layout).rules}
    assert rules["self_attention.linear_qkv.weight"].option("layout") == "per_group"
    assert rules["self_attention.q_layernorm.bias"].hf == ("model.layers.{layer}.self_attn.q_layernorm.bias",)
    assert rules["self_attention.k_layernorm.bias"].hf == ("model.layers.{layer}.self_attn.k_layernorm.bias",)
