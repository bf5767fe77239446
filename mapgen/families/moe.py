"""Mixture of experts: a router (+ router bias, + DeepSeek-style ``e_score_correction_bias``), routed experts
stored per expert (``experts.<e>.gate_proj`` ...) or packed (``experts.gate_up_proj [E, ...]``, optionally MXFP4
``*_blocks``/``*_scales``), and an optional shared expert with an optional sigmoid gate.

Megatron: ``mlp.router``, ``mlp.experts.local_experts.<e>.linear_fc1/linear_fc2`` (EP picks the experts, ETP
splits each), ``mlp.shared_experts.*``.

gpt-oss (``GptOssMLP``): the router's bias is added to its logits (``mlp.router.bias``); packed
``gate_up_proj [E, H, 2I]`` is stored [in, out] with gate/up *interleaved* along its last axis (gate the even
columns, up the odd ones: ``gate_up[..., ::2], gate_up[..., 1::2]``) and ``down_proj [E, I, H]`` [in, out], both
declared by the model type (``Facts.packed``), never guessed from shapes; ``gate_up_proj_bias [E, 2I]`` (interleaved
the same way) and ``down_proj_bias [E, H]`` become each local expert's ``linear_fc1.bias``/``linear_fc2.bias``.
megatron-core biases the router, the experts and the attention output together (``add_bias_linear``) and builds
biased experts at expert-TP 1 only.
"""

from __future__ import annotations

from mapgen.families import dense_mlp
from mapgen.families._dsl import Dims, Family, Planner, ShapePairs, Slot, Variant, opts
from mapgen.ir import Component

SOFTMAX_ROUTERS = ("softmax", "softmax_renorm", "softmax_greedy")
"""Router schemes (:mod:`mapgen.contract.routing`) that score experts by softmax: megatron-core reads no expert bias
with them."""
UNIT_GROUP_EXPERT_BIAS = ("moe_statics.e_score_correction_bias",)
"""Score-correction biases stored per expert group, ``[1, E]`` (ERNIE-4.5-MoE ``Ernie4_5_MoeStatics``: one group,
``squeeze()``-d before use): megatron-core's ``router.expert_bias`` is ``[E]`` (copy ``leading_unit``)."""

MOE = Family(
    "moe",
    role="mlp",
    description="mixture of experts (router, routed experts, optional shared expert)",
    file=__name__,
    roots=("mlp.", "block_sparse_moe.", "feed_forward."),
    slots=(
        # GraniteMoE: router.layer; HunYuan-MoE: gate.wg; HY-V3, AFMoE: router.gate
        Slot("router", ("gate.weight", "router.weight", "router.layer.weight", "gate.wg.weight", "router.gate.weight")),
        Slot("router_bias", ("gate.bias", "router.bias")),
        # Sarvam-MoE: gate.expert_bias; HY-V3, AFMoE: expert_bias beside router.gate
        Slot("expert_bias", ("gate.e_score_correction_bias", "gate.expert_bias", "expert_bias",
                             "experts.e_score_correction_bias",  # Laguna: under experts.
                             "e_score_correction_bias",  # EXAONE-MoE, MiniMax-M2: beside gate.weight
                             *UNIT_GROUP_EXPERT_BIAS)),
        Slot("output_bias", ("bias",)),  # JetMoE: a bias added to the MoE block's output (refused)
    ),
    variants=(Variant("routed", ("router",), ("router_bias", "expert_bias", "output_bias")),),
    children=("experts", "shared"),
)

EXPERTS = Family(
    "experts",
    role="part",
    description="routed experts, per expert (experts.<e>.*) or packed 3-D tensors [E, ...]",
    file=__name__,
    # "": GraniteMoE's packed experts sit right under the MoE root (block_sparse_moe.input_linear.weight)
    roots=("experts.", ""),
    # Packed storage; the per-expert variant reuses the dense MLP's spellings under ``experts.{expert}.``.
    slots=(
        # GraniteMoE ParallelExperts: input_linear [E, 2I, H] = [gate; up] per expert, output_linear [E, H, I]
        # Aria: experts.fc1.weight [E, H, 2I] (gate then up), experts.fc2.weight [E, I, H] (conversion_mapping.py)
        Slot("gate_up", ("gate_up_proj", "input_linear.weight", "fc1.weight")),
        Slot("down", ("down_proj", "output_linear.weight", "fc2.weight")),
        Slot("gate_up_bias", ("gate_up_proj_bias",)),
        Slot("down_bias", ("down_proj_bias",)),
        Slot("gate_up_blocks", ("gate_up_proj_blocks",)),
        Slot("down_blocks", ("down_proj_blocks",)),
        Slot("gate_up_scales", ("gate_up_proj_scales",)),
        Slot("down_scales", ("down_proj_scales",)),
    ),
    variants=(
        Variant("packed", ("gate_up", "down"), ("gate_up_bias", "down_bias")),
        Variant("packed_mxfp4", ("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales"),
                ("gate_up_bias", "down_bias")),
    ),
    flags=("layout", "orientation", "gate_up_interleave", "quant"),
    counts=("num_experts", "orientation_source"),
)

SHARED_EXPERT = Family(
    "shared_expert",
    role="part",
    description="always-on shared expert(s) of a MoE block and the optional sigmoid gate in front of them",
    file=__name__,
    roots=("shared_expert.", "shared_experts.", "shared_mlp."),  # HunYuan-MoE: mlp.shared_mlp.
    slots=(Slot("gate", ("shared_expert_gate.weight",)),),
    children=("mlp",),
)


def _biased(c: Component) -> bool:
    """The router or the routed experts carry biases (gpt-oss: both)."""
    e = c.child("experts")
    expert_biases = e is not None and any(e.key(s) for s in ("gate_bias", "up_bias", "down_bias", "gate_up_bias"))
    return bool(c.key("router_bias")) or expert_biases


LAYER_EXPERT_BIAS = ("moe.router.expert_bias",)
"""Score-correction biases stored at the decoder layer's root (Kolibri-1; transformers renames it to
``mlp.gate.e_score_correction_bias``)."""
LAYER_SHARED_ROOTS = ("shared_mlp.",)
"""Shared experts stored beside the MoE block, at the decoder layer's root (GraniteMoeShared / GraniteMoE-Hybrid
``shared_mlp.input_linear``/``output_linear``: a fused [gate; up] and a down projection, added to the experts' sum)."""


def _unit_group_bias(c: Component) -> bool:
    """The score-correction bias is stored ``[1, E]`` (:data:`UNIT_GROUP_EXPERT_BIAS`)."""
    return str(c.key("expert_bias")).endswith(UNIT_GROUP_EXPERT_BIAS)


def facts(c: Component) -> dict[str, bool]:
    shared = c.child("shared")
    return {
        "moe": True,
        # megatron-core's add_bias_linear biases the router, every expert's fc1/fc2 and the attention output
        # projection together: a layout whose attention disagrees is refused by the planner's conflict check
        "add_bias_linear": _biased(c),
        "expert_bias": bool(c.key("expert_bias")),
        "shared_expert": shared is not None,
        "shared_expert_gate": bool(shared and shared.key("gate")),
    }


def kind(c: Component) -> str:
    return "moe"


def experts_of(c: Component) -> Component | None:
    """The routed-experts child of a MoE component (``None`` for any other family)."""
    return c.child("experts") if c.family == "moe" else None


def num_experts(c: Component) -> int:
    experts = experts_of(c)
    return int(experts.count("num_experts")) if experts is not None else 0


def describe(c: Component) -> str:
    e = c.child("experts")
    assert e is not None
    layout = str(e.flag("layout"))
    text = f"MoE {num_experts(c)} experts {layout.replace('_', '-')}"
    if layout == "packed":
        text += f" [{e.flag('orientation')}, {str(e.count('orientation_source')).replace('_', ' ')}"
        text += ", gate/up interleaved" if e.flag("gate_up_interleave") else ""
        text += f", {e.flag('quant')}]" if e.flag("quant") != "none" else "]"
    if c.key("router_bias") or e.key("down_bias"):
        text += " +bias"
    if c.key("expert_bias"):
        text += " +score-correction bias"
    shared = c.child("shared")
    if shared is not None:
        text += " + shared expert" + (" (gated)" if shared.key("gate") else "")
    return text


def _expert_shapes(x: Component, d: Dims) -> ShapePairs:
    inter, hidden, e = d.moe_intermediate, d.hidden, int(x.count("num_experts"))
    if x.flag("layout") == "per_expert":
        return dense_mlp.sized(x, hidden, inter)
    if inter is None:
        return []
    if x.flag("orientation") == "out_in":
        gate_up, down = (e, 2 * inter, hidden), (e, hidden, inter)
    else:
        gate_up, down = (e, hidden, 2 * inter), (e, inter, hidden)
    biases: ShapePairs = [(x.key("gate_up_bias"), (e, 2 * inter)), (x.key("down_bias"), (e, hidden))]
    if x.flag("quant") != "none":  # MXFP4 blocks/scales: not described (left out); the biases are plain tensors
        return biases
    return [(x.key("gate_up"), gate_up), (x.key("down"), down), *biases]


def shapes(c: Component, d: Dims) -> ShapePairs:
    e = num_experts(c)
    bias = (1, e) if _unit_group_bias(c) else (e,)
    pairs: ShapePairs = [(c.key("router"), (e, d.hidden)), (c.key("router_bias"), (e,)), (c.key("expert_bias"), bias)]
    experts = c.child("experts")
    assert experts is not None
    pairs += _expert_shapes(experts, d)
    shared = c.child("shared")
    if shared is not None:
        mlp = shared.child("mlp")
        assert mlp is not None
        pairs += dense_mlp.sized(mlp, d.hidden, d.shared_intermediate)
        pairs.append((shared.key("gate"), (1, d.hidden)))
    return pairs


def plan(c: Component, p: Planner, mroot: str, hroot: str, domain: str, name: str) -> None:
    mlp = f"{mroot}mlp."
    p.add("moe.router", f"{mlp}router.weight", (hroot + str(c.key("router")),), "copy", "replicated", domain=domain,
          comment=f"[{name}] Router (replicated).")
    if c.key("router_bias"):
        p.add("moe.router_bias", f"{mlp}router.bias", (hroot + str(c.key("router_bias")),), "copy", "replicated",
              domain=domain, comment=f"[{name}] Router bias, added to the logits before top-k (replicated).")
    if c.key("output_bias"):
        p.unbuildable("a bias added to the whole MoE block's output (JetMoE mlp.bias): megatron-core's MoELayer has "
                      "no block-level bias", hroot + str(c.key("output_bias")))
    if c.key("expert_bias"):
        if p.router in SOFTMAX_ROUTERS:
            p.unbuildable(f"a score-correction bias added to softmax scores for the expert selection ({p.router!r} "
                          "router, e.g. ERNIE-4.5-MoE's moe_statics): megatron-core's router adds "
                          "moe_router_enable_expert_bias to sigmoid scores only", hroot + str(c.key("expert_bias")))
        unit = _unit_group_bias(c)
        p.add("moe.expert_bias", f"{mlp}router.expert_bias", (hroot + str(c.key("expert_bias")),), "copy",
              "replicated", domain=domain,
              options=opts(dtype="fp32", leading_unit=True) if unit else opts(dtype="fp32"),
              comment=f"[{name}] Expert score-correction bias, kept in fp32" + (" ([1, E] -> [E])." if unit else "."))
    e = c.child("experts")
    assert e is not None
    if e.flag("quant") != "none":
        p.unsupported(f"{e.flag('quant')} quantised experts", hroot + str(e.key("gate_up_blocks")))
        return
    local = f"{mlp}experts.local_experts.{{expert}}."
    layout, orientation = str(e.flag("layout")), str(e.flag("orientation"))
    if layout == "per_expert":
        fc1: tuple[str, ...] = (hroot + str(e.key("gate")), hroot + str(e.key("up")))
        options = opts(layout="per_expert")
        where = "per expert"
    else:
        fc1 = (hroot + str(e.key("gate_up")),)
        options = opts(layout="packed", orientation=orientation, interleave=bool(e.flag("gate_up_interleave")))
        where = f"packed 3-D [{'E, out, in' if orientation == 'out_in' else 'E, in, out'}]"
    p.add("moe.experts.fc1", f"{local}linear_fc1.weight", fc1, "expert_fc1", "expert_gated_column", domain=domain,
          experts=True, options=options,
          comment=f"[{name}] Routed experts ({where}) gate + up -> local expert linear_fc1; EP picks the "
          "experts, ETP splits each.")
    fc2_options = opts(layout=layout, orientation=orientation) if layout == "packed" else options
    p.add("moe.experts.fc2", f"{local}linear_fc2.weight", (hroot + str(e.key("down")),), "expert_fc2", "expert_row",
          domain=domain, experts=True, options=fc2_options,
          comment=f"[{name}] Routed experts ({where}) down -> local expert linear_fc2.")
    plan_expert_biases(c, p, local, hroot, domain, name)
    shared = c.child("shared")
    if shared is not None:
        smlp = shared.child("mlp")
        assert smlp is not None
        dense_mlp.plan_mlp(smlp, p, f"{mlp}shared_experts.", hroot, domain, name, "moe.shared")
        if shared.key("gate"):
            p.add("moe.shared.gate", f"{mlp}shared_experts.gate_weight", (hroot + str(shared.key("gate")),), "copy",
                  "replicated", domain=domain, comment=f"[{name}] Sigmoid gate of the shared expert.")


def plan_expert_biases(c: Component, p: Planner, local: str, hroot: str, domain: str, name: str) -> bool:
    """The routed experts' biases (gpt-oss: packed ``gate_up_proj_bias [E, 2I]``, gate/up interleaved like the
    weight's output columns, and ``down_proj_bias [E, H]``); False when they are refused. megatron-core biases the
    router and the experts together (``add_bias_linear``), so biased experts need a router bias and vice versa.
    Shared by every packed storage of the weights (plain or MXFP4 blocks/scales)."""
    e = c.child("experts")
    assert e is not None
    fc1, fc2 = e.key("gate_up_bias"), e.key("down_bias")
    stray = e.key("gate_bias") or e.key("up_bias") or (fc1 or fc2 if e.flag("layout") != "packed" else None)
    if stray:
        p.unsupported("biases of experts stored one per expert", hroot + str(stray))
        return False
    if not fc1 and not fc2 and not c.key("router_bias"):
        return True
    if not (fc1 and fc2 and c.key("router_bias")):
        what = "a router bias without expert biases" if c.key("router_bias") else "expert biases without both of " \
            "gate_up_proj_bias and down_proj_bias and a router bias"
        p.unsupported(f"{what} (megatron-core's add_bias_linear biases the router and every expert's fc1 and fc2 "
                      "together)", hroot + str(c.key("router_bias") or fc1 or fc2))
        return False
    p.add("moe.experts.fc1_bias", f"{local}linear_fc1.bias", (hroot + str(fc1),), "expert_fc1",
          "expert_gated_column", domain=domain, experts=True,
          options=opts(layout="packed", interleave=bool(e.flag("gate_up_interleave")), part="bias"),
          comment=f"[{name}] Routed experts' gate/up bias (packed [E, 2I]) -> local expert linear_fc1.bias, "
          "split like the weight's rows.")
    p.add("moe.experts.fc2_bias", f"{local}linear_fc2.bias", (hroot + str(fc2),), "copy", "replicated",
          domain=domain, experts=True, options=opts(layout="packed"),
          comment=f"[{name}] Routed experts' down bias (packed [E, H]) -> local expert linear_fc2.bias (whole on "
          "every expert-TP rank, scaled by the routing weight with the output).")
    return True
