"""MoE routing semantics (issue 10, issue 12 item 2): every router variant transformers implements is either built
by megatron-core with the same probabilities, or refused by name.

* Router parity: each model type's transformers router class (built from its own config class) against
  megatron-core's ``topk_routing_with_score_function`` with the settings the bridge derives, over a grid of
  config variants: accepted variants agree to 1e-6, refused ones really differ.
* The catalog and the bridge never disagree: the defaults a bridge carries are the ones the catalog judged.
* End to end (distributed): transformers-written tiny fp32 models, 2+ shards, perturbed weights (and expert
  score-correction biases), emitted into a temporary bridge directory, ``verify`` at TP=2 and at EP=2.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mapgen.catalog import check_config
from mapgen.catalog.check import layout_defaults
from mapgen.contract.config import Facts, bridge_routing
from mapgen.contract.hf_config import TOP_K_READS, HFConfig
from mapgen.contract.routing import ROUTING_KEYS, RouterScheme, Routing, routing
from mapgen.families.model_types import MODEL_TYPES, router_for

EXPERTS = 8
_ROUTING_FIELDS = (*ROUTING_KEYS, *TOP_K_READS)
_EXPERT_KEY = {"mixtral": "num_local_experts", "minimax": "num_local_experts", "qwen2_moe": "num_experts",
               "qwen3_moe": "num_experts", "olmoe": "num_experts", "flex_olmo": "num_experts",
               "qwen3_next": "num_experts", "qwen3_5_moe_text": "num_experts", "qwen3_vl_moe_text": "num_experts",
               "gpt_oss": "num_local_experts", "exaone_moe": "num_experts", "hy_v3": "num_experts",
               "ernie4_5_moe": "moe_num_experts", "lara_mini": "num_experts", "aria_text": "moe_num_experts"}
_TOPK_KEY = {"aria_text": "moe_topk"}  # the top-k spelling the model type's config class reads


# ---------------------------------------------------------------------------------------------------------
# The routing function
# ---------------------------------------------------------------------------------------------------------
def _get(values: dict[str, Any]) -> Any:
    return values.get


_SIGMOID = Routing("sigmoid", dtype="fp32")  # DeepSeek-style, no groups, unscaled


@pytest.mark.parametrize(("scheme", "config", "topk", "want", "gap"), [
    ("softmax", {"norm_topk_prob": False}, 2, Routing("softmax", pre_softmax=True), None),
    ("softmax", {"norm_topk_prob": True}, 2, Routing("softmax"), None),
    ("softmax", {}, 2, Routing("softmax", pre_softmax=True), None),  # transformers: `if None:` renormalises not
    ("softmax", {"norm_topk_prob": True}, 1, Routing("softmax", pre_softmax=True), "norm_topk_prob"),
    ("softmax_renorm", {"norm_topk_prob": False}, 2, Routing("softmax"), None),  # not read
    ("softmax_renorm", {}, 1, Routing("softmax", pre_softmax=True), "num_experts_per_tok"),
    ("sigmoid_grouped", {"norm_topk_prob": True, "routed_scaling_factor": 2.5, "n_group": 2, "topk_group": 1}, 2,
     Routing("sigmoid", scaling_factor=2.5, num_groups=2, group_topk=1, dtype="fp32"), None),
    ("sigmoid_grouped", {"norm_topk_prob": True, "routed_scaling_factor": 1.0, "n_group": 8, "topk_group": 4}, 8,
     Routing("sigmoid", num_groups=8, group_topk=4, dtype="fp32"), None),  # DeepSeek-V3 / Kimi-K2
    ("sigmoid_grouped", {"norm_topk_prob": True, "n_group": 1, "topk_group": 1}, 2, _SIGMOID, None),
    ("sigmoid_grouped", {"norm_topk_prob": True, "n_group": 4, "topk_group": 4}, 2, _SIGMOID, None),
    ("sigmoid_grouped", {"norm_topk_prob": False}, 2, _SIGMOID, "norm_topk_prob"),
    ("sigmoid_grouped", {"norm_topk_prob": False}, 1, _SIGMOID, None),
    ("sigmoid_grouped", {"norm_topk_prob": True}, 1, _SIGMOID, "norm_topk_prob"),
    ("sigmoid_grouped", {"norm_topk_prob": True, "n_group": 2, "topk_group": 1}, 3, _SIGMOID, "topk_group"),
    ("sigmoid_grouped", {"norm_topk_prob": True, "n_group": 3, "topk_group": 1}, 2, _SIGMOID, "n_group"),
    ("softmax_greedy", {"topk_method": "greedy", "routed_scaling_factor": 16.0}, 6,
     Routing("softmax", pre_softmax=True, scaling_factor=16.0, dtype="fp32"), None),
    ("softmax_greedy", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}, 3,
     Routing("softmax", pre_softmax=True, num_groups=4, group_topk=2, dtype="fp32"), None),
    ("softmax_greedy", {"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3}, 6,
     Routing("softmax", pre_softmax=True, dtype="fp32"), "topk_group"),  # DeepSeek-V2: groups by best score
    ("softmax_greedy", {"topk_method": "noaux_tc"}, 2, Routing("softmax", pre_softmax=True, dtype="fp32"),
     "topk_method"),
    ("", {"norm_topk_prob": True, "routed_scaling_factor": 1.0}, 2, Routing("softmax"), None),
    ("", {"norm_topk_prob": False}, 2, Routing("softmax"), "norm_topk_prob"),
    ("", {"routed_scaling_factor": 2.5}, 2, Routing("softmax"), "routed_scaling_factor"),
    ("", {}, 1, Routing("softmax", pre_softmax=True), "num_experts_per_tok"),
])
def test_routing_table(scheme: RouterScheme, config: dict[str, Any], topk: int, want: Routing,
                       gap: str | None) -> None:
    got, gaps = routing(scheme, _get(config), topk=topk, num_experts=EXPERTS)
    assert got == want
    assert [g.key for g in gaps] == ([gap] if gap else [])
    assert all(g.reason for g in gaps)


# The routing keys of released checkpoints (config.json as published, routing keys only): what they build.
RELEASES = [
    ("DeepSeek-V3", "deepseek_v3", {"n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
                                    "norm_topk_prob": True, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
                                    "topk_method": "noaux_tc"},
     Routing("sigmoid", scaling_factor=2.5, num_groups=8, group_topk=4, dtype="fp32"), None),
    ("Kimi-K2 (DeepSeek-V3 class)", "deepseek_v3", {"n_routed_experts": 384, "num_experts_per_tok": 8, "n_group": 1,
                                                    "topk_group": 1, "norm_topk_prob": True,
                                                    "routed_scaling_factor": 2.827},
     Routing("sigmoid", scaling_factor=2.827, dtype="fp32"), None),
    ("GLM-4.5", "glm4_moe", {"n_routed_experts": 160, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1,
                             "norm_topk_prob": True, "routed_scaling_factor": 2.5},
     Routing("sigmoid", scaling_factor=2.5, dtype="fp32"), None),
    ("dots.llm1", "dots1", {"n_routed_experts": 128, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
                            "norm_topk_prob": True, "routed_scaling_factor": 2.5},
     Routing("sigmoid", scaling_factor=2.5, dtype="fp32"), None),
    ("DeepSeek-V2-Lite", "deepseek_v2", {"n_routed_experts": 64, "num_experts_per_tok": 6, "topk_method": "greedy",
                                         "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0},
     Routing("softmax", pre_softmax=True, dtype="fp32"), None),
    ("DeepSeek-V2", "deepseek_v2", {"n_routed_experts": 160, "num_experts_per_tok": 6, "n_group": 8, "topk_group": 3,
                                    "topk_method": "group_limited_greedy", "routed_scaling_factor": 16.0},
     None, "topk_group"),  # groups ranked by their best score; megatron-core would sum their top 6 // 3 = 2
    ("Qwen2-57B-A14B", "qwen2_moe", {"num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False},
     Routing("softmax", pre_softmax=True), None),
    ("Qwen3-30B-A3B", "qwen3_moe", {"num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True},
     Routing("softmax"), None),
    ("Mixtral-8x7B", "mixtral", {"num_local_experts": 8, "num_experts_per_tok": 2}, Routing("softmax"), None),
]


@pytest.mark.parametrize(("name", "model_type", "config", "want", "gap"), RELEASES, ids=[r[0] for r in RELEASES])
def test_released_routing(name: str, model_type: str, config: dict[str, Any], want: Routing | None,
                          gap: str | None) -> None:
    """What the catalog says and the bridge builds for the routing of the releases people convert."""
    config = {"model_type": model_type, **config}
    refused = sorted({d.key for d in check_config(config).errors if d.code == "semantics.unsupported"
                      and d.key in _ROUTING_FIELDS})
    assert refused == ([gap] if gap else []), refused
    if want is not None:
        defaults = layout_defaults(model_type, model_type, ROUTING_KEYS)
        facts = Facts(moe=True, expert_bias=want.score_function == "sigmoid", router=router_for([model_type]),
                      **{f"default_{k}": v for k, v in defaults.items()})
        assert bridge_routing(HFConfig(config), facts) == want


# ---------------------------------------------------------------------------------------------------------
# Router parity: transformers' router classes vs megatron-core's routing function
# ---------------------------------------------------------------------------------------------------------
def _modeling_module(model_type: str, config_module: str) -> str:
    """The module of the model type's modelling code: beside its config, or (a config-only model type such as
    Sarvam-MoE, built by GLM-4-MoE's classes) where its causal-LM class lives."""
    import importlib.util

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    beside = config_module.replace(".configuration_", ".modeling_")
    if importlib.util.find_spec(beside) is not None:
        return beside
    return str(getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]).__module__)


class _BiasArgument(torch.nn.Module):
    """A router whose forward takes the score-correction bias as an argument (HY-V3: the MoE block holds the
    buffer and passes it), with the bias held beside its weight as the other routers hold it."""

    def __init__(self, router: torch.nn.Module, experts: int) -> None:
        super().__init__()
        self.router = router
        self.weight = router.weight
        self.e_score_correction_bias = torch.nn.Parameter(torch.zeros(experts), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> Any:
        return self.router(hidden, self.e_score_correction_bias)


def _router(model_type: str, **config: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import CONFIG_MAPPING

    if model_type in _TOPK_KEY and "num_experts_per_tok" in config:
        config = {**config}
        config[_TOPK_KEY[model_type]] = config.pop("num_experts_per_tok")
    cfg = CONFIG_MAPPING[model_type](hidden_size=64, **{_EXPERT_KEY.get(model_type, "n_routed_experts"): EXPERTS},
                                     **config)
    module = importlib.import_module(_modeling_module(model_type, type(cfg).__module__))
    (cls,) = [c for n, c in inspect.getmembers(module, inspect.isclass)
              if "Router" in n and c.__module__ == module.__name__]
    router = cls(cfg)
    if "e_score_correction_bias" in inspect.signature(cls.forward).parameters:
        router = _BiasArgument(router, EXPERTS)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.rand(bias.shape, generator=gen) * 0.5)
        logit_bias = getattr(router, "bias", None)  # gpt-oss: added to the logits (megatron-core's router bias)
        if isinstance(logit_bias, torch.Tensor):
            logit_bias.copy_(torch.randn(logit_bias.shape, generator=gen))
    saved = json.loads(cfg.to_json_string(use_diff=False))
    # ERNIE-4.5-MoE saves its top-k as moe_k (attribute_map), a spelling the bridge does not read: a config that
    # states both (the catalog accepts moe_k equal to num_experts_per_tok)
    if model_type not in _TOPK_KEY:
        saved.setdefault("num_experts_per_tok", cfg.num_experts_per_tok)
    return router, saved


def _dense(weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.zeros(weights.shape[0], EXPERTS).scatter(1, indices, weights.float())


def _megatron_probs(router: torch.nn.Module, hidden: torch.Tensor, r: Routing, topk: int) -> torch.Tensor:
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    logits = hidden @ router.weight.float().t()
    logit_bias = getattr(router, "bias", None)
    if isinstance(logit_bias, torch.Tensor):  # TopKRouter.gating: router_gating_linear(input, weight, bias)
        logits = logits + logit_bias.float()
    bias = getattr(router, "e_score_correction_bias", None)
    probs, _ = topk_routing_with_score_function(
        logits, topk, use_pre_softmax=r.pre_softmax, num_groups=r.num_groups, group_topk=r.group_topk,
        scaling_factor=r.scaling_factor, score_function=r.score_function,
        expert_bias=bias.float() if bias is not None and r.score_function == "sigmoid" else None)
    return probs


def _variants(scheme: str) -> list[dict[str, Any]]:
    topks = (1, 2, 4)
    if scheme == "softmax":
        return [{"num_experts_per_tok": k, "norm_topk_prob": n} for k in topks for n in (True, False)]
    if scheme == "softmax_renorm":
        return [{"num_experts_per_tok": k} for k in topks]
    if scheme == "sigmoid_renorm":
        return [{"num_experts_per_tok": k, "router_scaling_factor": s} for k in topks for s in (1.0, 2.826)]
    groups = ((1, 1), (2, 1), (4, 2), (4, 1), (2, 2))
    # topk < topk_group is left out: megatron-core then ranks groups by the sum of their top-0 scores (all
    # ties, whatever torch.topk returns for them); refused, but agreement there is an accident of tie-breaking
    if scheme == "sigmoid_grouped":
        return [{"num_experts_per_tok": k, "norm_topk_prob": n, "n_group": g, "topk_group": t,
                 "routed_scaling_factor": 2.5 if (k + g) % 2 else 1.0}
                for k, n, (g, t) in itertools.product(topks, (True, False), groups) if t <= k <= t * EXPERTS // g]
    return [{"num_experts_per_tok": k, "topk_method": m, "n_group": g, "topk_group": t,
             "routed_scaling_factor": 2.5 if (k + g) % 2 else 1.0}
            for k, m, (g, t) in itertools.product(topks, ("greedy", "group_limited_greedy"), groups)
            if t <= k <= t * EXPERTS // g]


# wrappers (qwen3_5_moe, qwen3_vl_moe, glm4v_moe) route in their text model: tested as *_text
ROUTER_TYPES = sorted(t for t, f in MODEL_TYPES.items() if f.router and f"{t}_text" not in MODEL_TYPES)


@pytest.mark.parametrize("model_type", ROUTER_TYPES)
def test_router_parity(model_type: str) -> None:
    """Accepted variants route exactly like transformers (probabilities to 1e-6); every refusal is real."""
    scheme = router_for([model_type])
    hidden = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    facts = Facts(moe=True, expert_bias=scheme.startswith("sigmoid"), router=scheme,
                  **{f"default_{k}": v for k, v in layout_defaults(model_type, model_type, ROUTING_KEYS).items()})
    accepted = refused = 0
    for variant in _variants(scheme):
        router, config = _router(model_type, **variant)
        with torch.no_grad():
            _, weights, indices = router(hidden)
            r = bridge_routing(HFConfig(config), facts)
            got = _megatron_probs(router, hidden, r, variant["num_experts_per_tok"])
        want = _dense(weights, indices)
        gaps = [d for d in check_config(config).errors if d.key in _ROUTING_FIELDS]
        same = torch.allclose(got, want, atol=1e-6, rtol=0)
        if gaps:
            refused += 1
            assert all(d.code == "semantics.unsupported" for d in gaps), gaps
            assert not same, f"{model_type} {variant}: refused ({gaps[0].message}) but megatron-core agrees"
        else:
            accepted += 1
            assert same, f"{model_type} {variant}: {r} differs by {float((got - want).abs().max())}"
    assert accepted


# ---------------------------------------------------------------------------------------------------------
# The catalog and the bridge never disagree
# ---------------------------------------------------------------------------------------------------------
def test_generated_bridges_carry_the_catalogs_defaults() -> None:
    """Every committed MoE bridge carries its model type's router scheme and exactly the transformers defaults
    the catalog judges absent routing keys by."""
    import generated
    from generated import BRIDGES

    seen = 0
    for module, attribute in BRIDGES.values():
        bridge = getattr(importlib.import_module(f"{generated.__name__}.{module}"), attribute)
        if not bridge.facts.moe:
            continue
        seen += 1
        want = layout_defaults(bridge.model_type, "", ROUTING_KEYS)
        got = {k: getattr(bridge.facts, f"default_{k}") for k in ROUTING_KEYS
               if getattr(bridge.facts, f"default_{k}") is not None}
        assert got == want, bridge.model_type
        assert bridge.facts.router == router_for([bridge.model_type])
    assert seen >= 4


@pytest.mark.parametrize("model_type", sorted({*ROUTER_TYPES, "longcat_flash", "afmoe"}))
def test_catalog_judges_absent_keys_by_the_bridges_defaults(model_type: str) -> None:
    """A config that leaves the routing keys out: the values the catalog reports (source "default") are the ones
    the bridge computes with, and the catalog refuses exactly when the routing has a gap."""
    defaults = layout_defaults(model_type, model_type, ROUTING_KEYS)
    config = {"model_type": model_type, "num_experts_per_tok": 2, "num_experts": EXPERTS}
    report = check_config(config)
    judged = {f.key: f.value for f in report.fields if f.source == "default" and f.key in ROUTING_KEYS}
    assert judged == defaults
    facts = Facts(moe=True, router=router_for([model_type]), **{f"default_{k}": v for k, v in defaults.items()})
    hf = HFConfig(config)
    _, gaps = routing(facts.router, lambda k: hf.get(k, default=defaults.get(k)), topk=2, num_experts=EXPERTS)
    refused = {d.key for d in report.errors if d.key in _ROUTING_FIELDS}
    assert refused == {g.key for g in gaps}


def test_megatron_args_carry_group_limited_routing() -> None:
    from mapgen.contract.spec import ModelSpec
    from mapgen.runtime.megatron_args import canonical, megatron_args, spec_from_args

    spec = ModelSpec(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                     ffn_hidden_size=96, vocab_size=128, num_moe_experts=8, moe_router_topk=2,
                     moe_ffn_hidden_size=32, moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
                     moe_router_topk_scaling_factor=2.5, moe_router_num_groups=2, moe_router_group_topk=1,
                     moe_router_dtype="fp32")
    args = megatron_args(spec)
    assert args[args.index("--moe-router-num-groups") + 1] == "2"
    assert args[args.index("--moe-router-group-topk") + 1] == "1"
    back, _ = spec_from_args(args)
    assert canonical(back).moe_router_num_groups == 2
    assert canonical(back).moe_router_group_topk == 1
    assert back.moe_router_topk_scaling_factor == 2.5
    assert back.moe_router_dtype == "fp32"


# ---------------------------------------------------------------------------------------------------------
# End to end: transformers-written checkpoints, verify at TP=2 and at EP=2
# ---------------------------------------------------------------------------------------------------------
_TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 64, "tie_word_embeddings": False, "num_experts_per_tok": 2}
_DEEPSEEK_STYLE = {"n_routed_experts": EXPERTS, "n_shared_experts": 1, "norm_topk_prob": True}
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    # norm_topk_prob left out: Qwen2MoeConfig's default false -> moe_router_pre_softmax
    "qwen2_moe-default": ("qwen2_moe", {"num_experts": EXPERTS, "shared_expert_intermediate_size": 32}),
    "qwen3_moe-unnormalised": ("qwen3_moe", {"num_experts": EXPERTS, "norm_topk_prob": False}),
    "qwen3_moe-normalised": ("qwen3_moe", {"num_experts": EXPERTS, "norm_topk_prob": True}),
    # GLM-4.5's scaling, group-limited: 2 groups of 4 experts, the best 1 group by its top-2 sum (topk 2)
    "glm4_moe-grouped": ("glm4_moe", {**_DEEPSEEK_STYLE, "routed_scaling_factor": 2.5, "n_group": 2,
                                      "topk_group": 1, "first_k_dense_replace": 0, "partial_rotary_factor": 0.5}),
    # sigmoid scores + score-correction bias, renormalised and scaled as in the dots.llm1 release
    "dots1-sigmoid": ("dots1", {**_DEEPSEEK_STYLE, "routed_scaling_factor": 2.5, "first_k_dense_replace": 1}),
}
LAYOUTS = {"tp2": {"tp": 2}, "ep2": {"ep": 2}}


def _write_model(model_type: str, out: Path, seed: int, **config: Any) -> Path:
    """fp32, several shards, every parameter (and the score-correction bias buffer) perturbed."""
    import transformers
    from transformers import CONFIG_MAPPING

    transformers.logging.set_verbosity_error()
    cfg = CONFIG_MAPPING[model_type](**{**_TINY, **config})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if "norm" in name and p.dim() == 1 else
                    torch.randn(p.shape, generator=gen) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=gen) * 0.2)
    model.save_pretrained(str(out), max_shard_size="60KB")
    assert len(list(out.glob("*.safetensors"))) >= 2
    return out


def _router_inputs(root: Path) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """Each MoE router of the transformers model at ``root`` and its input on verify's fixed batch."""
    import transformers

    from mapgen.runtime.verify import fixed_batch

    model = transformers.AutoModelForCausalLM.from_pretrained(str(root), dtype=torch.float32)
    seen: list[tuple[torch.nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].detach())))
             for name, m in model.named_modules() if name.endswith("mlp.gate")]
    with torch.no_grad():
        model(input_ids=fixed_batch(int(model.config.vocab_size)), use_cache=False)
    for h in hooks:
        h.remove()
    return seen


@pytest.fixture(scope="module")
def verified(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import os

    from runtime_support import Case, run_cases

    from mapgen.cli import main as mapgen_main

    root = tmp_path_factory.mktemp("routing")
    sources = {name: _write_model(mt, root / name, i, **cfg) for i, (name, (mt, cfg)) in enumerate(MODELS.items())}
    qwen2 = sources["qwen2_moe-default"] / "config.json"  # as real Qwen2-MoE configs: no norm_topk_prob, so the
    data = json.loads(qwen2.read_text())  # bridge must take transformers' default (false), not megatron-core's
    assert data.pop("norm_topk_prob") is False
    qwen2.write_text(json.dumps(data, indent=2))
    gen = root / "generated"
    assert mapgen_main(["emit", *map(str, sources.values()), "--out", str(gen)]) == 0
    old = os.environ.get("MAPGEN_BRIDGES")
    os.environ["MAPGEN_BRIDGES"] = str(gen)
    try:
        cases = [Case(f"{name}-{lay}", str(src), **par)
                 for name, src in sources.items() for lay, par in LAYOUTS.items()]
        cases.append(Case("glm4_moe-grouped-tp2ep2", str(sources["glm4_moe-grouped"]), tp=2, ep=2, etp=1))
        results = run_cases(cases)
    finally:
        if old is None:
            os.environ.pop("MAPGEN_BRIDGES", None)
        else:
            os.environ["MAPGEN_BRIDGES"] = old
    return {"results": results, "sources": sources}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_verify(verified: dict[str, Any], name: str, layout: str) -> None:
    from runtime_support import assert_case

    r0 = assert_case(verified["results"], f"{name}-{layout}")
    assert r0["logits"]["max_abs"] <= 1e-4


@pytest.mark.slow
@pytest.mark.distributed
def test_verify_grouped_at_tp2_ep2(verified: dict[str, Any]) -> None:
    """Issue 12: GLM-4.5-style routing also at TP=2 x EP=2 (ETP=1) on the same two ranks."""
    from runtime_support import assert_case

    assert_case(verified["results"], "glm4_moe-grouped-tp2ep2")


@pytest.mark.slow
@pytest.mark.distributed
def test_the_grouped_case_exercises_group_selection(verified: dict[str, Any]) -> None:
    """On verify's own batch, GLM-4.5-style group-limited selection picks other experts than plain top-k (so the
    grouped case proves the groups, not only the scaling)."""
    differ = 0
    for router, hidden in _router_inputs(verified["sources"]["glm4_moe-grouped"]):
        assert (router.num_group, router.topk_group) == (2, 1)
        with torch.no_grad():
            _, _, grouped = router(hidden)
            router.num_group = router.topk_group = 1
            _, _, plain = router(hidden)
            router.num_group, router.topk_group = 2, 1
        differ += int((grouped.sort(-1).values != plain.sort(-1).values).any(-1).sum())
    assert differ > 0
