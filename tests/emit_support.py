"""Hand-built layouts and plans for the emit tests (no checkpoint, no scan needed).

``qwen3_dense_layout`` / ``qwen3_5_moe_layout`` are realistic layouts as ``mapgen scan`` describes them;
``qwen3_dense_plan`` is the plan written out by hand (what the planner should produce for Qwen3 dense),
so renderer tests do not depend on the planner; ``plan_to_data``/``plan_from_data`` store plans as JSON
for the golden cases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from mapgen.contract.config import Facts
from mapgen.contract.rules import Rule
from mapgen.ir import (
    MTP,
    Component,
    Dims,
    IndexSet,
    LanguageModel,
    LayerGroup,
    Layout,
    Summary,
    layout_from_json,
    layout_to_json,
)
from mapgen.plan.plan import BridgePlan

REPO = Path(__file__).resolve().parents[1]

NORMS = Component.make("norms", "pre_norm", {"input_norm": "input_layernorm.weight",
                                             "post_attention_norm": "post_attention_layernorm.weight"})

QWEN3_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}


def qwen3_dense_layout(num_layers: int = 4, config: dict[str, Any] | None = None) -> Layout:
    attn = Component.make("attention", "separate", {
        "o": "self_attn.o_proj.weight",
        "q": "self_attn.q_proj.weight",
        "k": "self_attn.k_proj.weight",
        "v": "self_attn.v_proj.weight",
        "q_norm": "self_attn.q_norm.weight",
        "k_norm": "self_attn.k_norm.weight",
    }, flags={"output_gate": False, "sliding_window": False})
    mlp = Component.make("dense_mlp", "separate", {"down": "mlp.down_proj.weight", "gate": "mlp.gate_proj.weight",
                                                   "up": "mlp.up_proj.weight"})
    group = LayerGroup("dense", "model.layers.{layer}.", IndexSet.of(range(num_layers)), NORMS, attn, mlp)
    lm = LanguageModel(
        prefix="model.",
        top=Component.make("embedding", "untied", {"embedding": "model.embed_tokens.weight",
                                                    "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}),
        groups=(group,),
        num_layers=num_layers,
    )
    cfg = dict(config or QWEN3_CONFIG, num_hidden_layers=num_layers)
    return Layout(
        model_type="qwen3",
        text_model_type="qwen3",
        architectures=("Qwen3ForCausalLM",),
        language_model=lm,
        dims=Dims(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, vocab_size=256),
        summary=Summary(
            model_type="qwen3", num_layers=num_layers, attention=(("attention", num_layers),), moe_layers=0,
            num_experts=0, expert_layout="none", shared_experts=False, mtp_depth=0, mtp_scheme="none",
            mtp_expert_layout="none", tied_embeddings=False, unclassified_keys=0,
        ),
        config=cfg,
    )


def qwen3_5_moe_layout() -> Layout:
    """Hybrid: 3 gated-delta-net layers per attention layer, routed + shared experts, one MTP depth."""
    root = "model.language_model.layers.{layer}."
    experts = Component.make(
        "experts", "packed", {"gate_up": "mlp.experts.gate_up_proj", "down": "mlp.experts.down_proj"},
        flags={"layout": "packed", "orientation": "out_in", "gate_up_interleave": False, "quant": "none"},
        counts={"num_experts": 8, "orientation_source": "shapes"},
    )
    shared_mlp = Component.make("dense_mlp", "separate", {
        "down": "mlp.shared_expert.down_proj.weight", "gate": "mlp.shared_expert.gate_proj.weight",
        "up": "mlp.shared_expert.up_proj.weight"})
    shared = Component.make("shared_expert", "shared", {"gate": "mlp.shared_expert_gate.weight"},
                            children={"mlp": shared_mlp})
    moe = Component.make("moe", "routed", {"router": "mlp.gate.weight"},
                         children={"experts": experts, "shared": shared})
    gdn = Component.make("gated_delta_net", "split", {
        "conv1d": "linear_attn.conv1d.weight", "a_log": "linear_attn.A_log", "dt_bias": "linear_attn.dt_bias",
        "norm": "linear_attn.norm.weight", "out_proj": "linear_attn.out_proj.weight",
        "in_proj_qkv": "linear_attn.in_proj_qkv.weight", "in_proj_z": "linear_attn.in_proj_z.weight",
        "in_proj_b": "linear_attn.in_proj_b.weight", "in_proj_a": "linear_attn.in_proj_a.weight",
    })
    attn = Component.make("attention", "separate", {
        "o": "self_attn.o_proj.weight", "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
        "v": "self_attn.v_proj.weight", "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    }, flags={"output_gate": True, "sliding_window": False})
    linear = LayerGroup("linear", root, IndexSet.of([0, 1, 2, 4, 5, 6]), NORMS, gdn, moe)
    full = LayerGroup("full", root, IndexSet.of([3, 7]), NORMS, attn, moe)
    mtp_inner = LayerGroup("mtp", "mtp.layers.{layer}.", IndexSet.of([0]), NORMS, attn, moe)
    parts = Component.make("mtp", "mtp_block", {
        "enorm": "mtp.pre_fc_norm_embedding.weight", "hnorm": "mtp.pre_fc_norm_hidden.weight",
        "eh_proj": "mtp.fc.weight", "final_norm": "mtp.norm.weight",
    }, flags={"shared": True, "eh_proj_order": "embedding_hidden"})
    mtp = MTP(scheme="mtp_block", depth=1, root="mtp.", parts=parts, inner=(mtp_inner,))
    lm = LanguageModel(
        prefix="model.language_model.",
        top=Component.make("embedding", "untied", {"embedding": "model.language_model.embed_tokens.weight",
                                                    "final_norm": "model.language_model.norm.weight",
                                                    "lm_head": "lm_head.weight"}),
        groups=(linear, full), num_layers=8, mtp=mtp,
    )
    config = {
        "model_type": "qwen3_5_moe",
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "text_config": {
            "hidden_size": 64, "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 256, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
            "num_experts": 8, "num_experts_per_tok": 2, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
            "mtp_num_hidden_layers": 1, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        },
    }
    return Layout(
        model_type="qwen3_5_moe",
        text_model_type="qwen3_5_moe_text",
        architectures=("Qwen3_5MoeForConditionalGeneration",),
        language_model=lm,
        dims=Dims(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                  moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts_per_tok=2),
        summary=Summary(
            model_type="qwen3_5_moe", num_layers=8, attention=(("attention", 2), ("gated_delta_net", 6)),
            moe_layers=8, num_experts=8, expert_layout="packed", shared_experts=True, mtp_depth=1,
            mtp_scheme="mtp_block", mtp_expert_layout="packed", tied_embeddings=False, unclassified_keys=0,
            layer_pattern="LLLALLLA",
        ),
        config=config,
    )


def qwen3_dense_plan(fingerprint: str = "0123456789ab") -> BridgePlan:
    """The Qwen3 dense plan, written out by hand."""
    d = "decoder:dense"
    m = "decoder.layers.{layer}."
    h = "model.layers.{layer}."

    def rule(family: str, megatron: str, hf: tuple[str, ...], op: str, sharding: str, domain: str = d,
             options: tuple[tuple[str, str | int | bool], ...] = (), comment: str = "") -> Rule:
        return Rule(family=family, megatron=megatron, hf=hf, op=op, sharding=sharding,  # type: ignore[arg-type]
                    domain=domain, options=options, comment=comment)

    rules = (
        rule("embedding", "embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy", "vocab",
             "global", comment="Token embedding: vocab-parallel; padded on import, truncated on export."),
        rule("norm.input", m + "input_layernorm.weight", (h + "input_layernorm.weight",), "copy", "replicated",
             comment="[dense] Pre-attention norm."),
        rule("attention.qkv", m + "self_attention.linear_qkv.weight",
             (h + "self_attn.q_proj.weight", h + "self_attn.k_proj.weight", h + "self_attn.v_proj.weight"),
             "qkv", "qkv_groups", options=(("output_gate", False), ("part", "weight")),
             comment="[dense] q/k/v -> linear_qkv, interleaved per query group; TP splits whole groups."),
        rule("attention.o", m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), "copy",
             "row", comment="[dense] Output projection: row-parallel."),
        rule("attention.q_norm", m + "self_attention.q_layernorm.weight", (h + "self_attn.q_norm.weight",),
             "copy", "replicated", comment="[dense] QK-norm on queries (per head)."),
        rule("attention.k_norm", m + "self_attention.k_layernorm.weight", (h + "self_attn.k_norm.weight",),
             "copy", "replicated", comment="[dense] QK-norm on keys (per head)."),
        rule("norm.post_attention", m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",),
             "copy", "replicated", comment="[dense] Pre-MLP norm."),
        rule("mlp.fc1", m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
             "gated_fc1", "gated_column", options=(("fused", False),),
             comment="[dense] gate + up -> linear_fc1, laid out per TP rank as [gate_r; up_r]."),
        rule("mlp.fc2", m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "copy", "row",
             comment="[dense] down -> linear_fc2: row-parallel."),
        rule("final_norm", "decoder.final_layernorm.weight", ("model.norm.weight",), "copy", "replicated",
             "global", comment="Final norm before the output layer."),
        rule("output", "output_layer.weight", ("lm_head.weight",), "copy", "vocab", "global",
             comment="Output layer (untied): vocab-parallel."),
    )

    return BridgePlan(
        fingerprint=fingerprint,
        module_name="qwen3",
        model_type="qwen3",
        description=(
            f"Bridge for model_type 'qwen3', layout fingerprint {fingerprint}.",
            "Language model under 'model.'; tied embeddings: False.",
            "Decoder layer groups: dense: attention + dense gated MLP.",
            "MTP: none.",
        ),
        facts=Facts(qk_layernorm=True),
        rules=rules,
    )


# ---------------------------------------------------------------------------------------------------------
# Plans as JSON (golden cases)
# ---------------------------------------------------------------------------------------------------------
def plan_to_data(plan: BridgePlan) -> dict[str, Any]:
    data = dataclasses.asdict(plan)
    return json.loads(json.dumps(data))  # tuples -> lists


def plan_from_data(data: dict[str, Any]) -> BridgePlan:
    rules = tuple(
        Rule(**dict(r, hf=tuple(r["hf"]), options=tuple((k, v) for k, v in r["options"]))) for r in data["rules"]
    )
    return BridgePlan(
        fingerprint=data["fingerprint"],
        module_name=data["module_name"],
        model_type=data["model_type"],
        description=tuple(data["description"]),
        facts=Facts(**data["facts"]),
        rules=rules,
    )


def plan_to_json(plan: BridgePlan) -> str:
    return json.dumps(plan_to_data(plan), indent=2, sort_keys=True) + "\n"


def plan_from_json(text: str) -> BridgePlan:
    return plan_from_data(json.loads(text))


def load_layout(path: Path) -> Layout:
    return layout_from_json(path.read_text(encoding="utf-8"))


def dump_layout(layout: Layout) -> str:
    return layout_to_json(layout)


# ---------------------------------------------------------------------------------------------------------
# Hostile inputs: strings a malicious checkpoint could put into key names, model_type and prose
# ---------------------------------------------------------------------------------------------------------
EVIL_STRINGS: tuple[str, ...] = (
    "it's \"quoted\"",
    "line\nbreak = __import__('os').system('x')",
    "\"); __import__('os').system('x') #",
    "'); __import__('os').system('x') #",
    "sep\u2028__import__('os').system('x')",
    "para\u2029x = 1",
    "cr\rx = 2",
    "tab\tand\x0bvt\x0cff\x1cfs\x85nel",
    "bidi \u202e)x(__tropmi__\u202c",
    "\"\"\" + __import__('os').system('x') + \"\"\"",
    "back\\slash\\",
    "zero\u200bwidth \u0430 cyrillic-a",
    "|pipe| `tick` <!-- html -->",
    "{layer}}}{{",
    "nul\x00byte",
)

EVIL_KEY = "\"); __import__('os').system('x') #"


def evil_layout() -> Layout:
    """A Qwen3-shaped layout whose key names, model_type and config are hostile."""
    base = qwen3_dense_layout(num_layers=2)
    lm = base.language_model
    group = dataclasses.replace(
        lm.groups[0],
        root="model.layers.{layer}.\n__import__('os').system('x')#",
        mixer=lm.groups[0].mixer.with_slots(q="q\u2028__import__('os').system('x')", o=EVIL_KEY),
    )
    top = lm.top.with_slots(embedding="emb\"\"\"\n__import__('os')", lm_head="head'\r\n#")
    lm = dataclasses.replace(lm, groups=(group,), top=top)
    return dataclasses.replace(base, model_type="qwen3\n__import__('os').system('x')", language_model=lm)


def evil_plan() -> BridgePlan:
    """A plan in which every free-text field carries hostile strings."""
    good = qwen3_dense_plan("abcdef012345")
    rules = []
    for i, rule in enumerate(good.rules):
        evil = EVIL_STRINGS[i % len(EVIL_STRINGS)]
        rules.append(
            dataclasses.replace(
                rule,
                family=rule.family if i % 3 else f"{evil}.x",
                megatron=rule.megatron + evil,
                hf=(*rule.hf, evil),
                domain=rule.domain + evil if i % 2 else rule.domain,
                options=((evil, evil), ("n", i), ("flag", True)),
                comment=f"{evil} -- {rule.comment}",
            )
        )
    return dataclasses.replace(
        good,
        model_type=EVIL_KEY + "\u2028x",
        description=EVIL_STRINGS,
        rules=tuple(rules),
    )


@contextlib.contextmanager
def import_tree(root: Path) -> Iterator[ModuleType]:
    """Import a rendered tree as a uniquely named package (its registry imports modules lazily)."""
    name = f"golden_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    return root
