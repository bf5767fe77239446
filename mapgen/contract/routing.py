"""MoE routing: what a model type's transformers router computes, as megatron-core router settings.

One function, :func:`routing`, decides both what a bridge builds (the config table's routing rows) and what
the config catalog refuses (``semantics.unsupported``), so the two cannot disagree.

megatron-core 0.16.1 (``moe_utils.topk_routing_with_score_function``) computes, per token:

* ``softmax``, ``pre_softmax``:  softmax over all experts, top-k of those probabilities (not renormalised);
* ``softmax``, not pre_softmax:   top-k of the logits, softmax over the k (= the top-k softmax probabilities
  renormalised to sum 1); megatron-core refuses this at top-1;
* ``sigmoid``: sigmoid scores; the expert bias (when enabled) is added for the selection only; the selected
  scores are renormalised, ``s / (sum + 1e-20)``, whenever top-k > 1, never at top-1;
* groups (``moe_router_num_groups`` / ``moe_router_group_topk``): groups ranked by the sum of their top
  ``topk // group_topk`` selection scores, experts of the other groups masked;
* the scaling factor multiplies the final weights;
* ``moe_router_dtype="fp32"``: the gate's logits (and the weighting) in fp32 whatever the model's dtype, as the
  DeepSeek-style routers of transformers compute them.

transformers' routers, by the scheme a model type's modelling code implements (``mapgen.families.model_types``):

* ``softmax`` (Qwen2/3-MoE, OLMoE, FlexOlmo, Qwen3-Next): softmax, top-k, renormalised iff ``norm_topk_prob``;
* ``softmax_renorm`` (Mixtral, MiniMax, Qwen3.5/3-VL MoE): softmax, top-k, always renormalised
  (``norm_topk_prob`` is not read);
* ``sigmoid_grouped`` (DeepSeek-V3/V3.2, Kimi-K2 on the V3 class, GLM-4.5/-Lite/-MoE-DSA/-4.5V, dots1):
  sigmoid, ``e_score_correction_bias`` for the selection only, groups by the sum of their top-2 scores,
  ``norm_topk_prob`` renormalises with the same 1e-20, weights times ``routed_scaling_factor``
  (``scoring_func``/``topk_method`` are not read);
* ``softmax_greedy`` (DeepSeek-V2): softmax, ``topk_method`` greedy or group_limited_greedy (groups by their
  best score), never renormalised, weights times ``routed_scaling_factor``.
* ``sigmoid_renorm`` (HY-V3, ``HYV3TopKRouter``): sigmoid in fp32, ``e_score_correction_bias`` for the selection
  only, no groups, the selected scores always renormalised ``s / (sum + 1e-20)`` (``norm_topk_prob`` is not read),
  weights times ``router_scaling_factor`` (its own spelling of megatron-core's
  ``moe_router_topk_scaling_factor``); at top-1 megatron-core would not renormalise: refused.

A model type whose router scheme mapgen does not know (``""``) keeps the bridge's historic router (softmax
renormalised, sigmoid with an expert bias) and only the values that compute exactly that are accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ROUTING_KEYS", "RouterScheme", "Routing", "RoutingGap", "routing"]

RouterScheme = Literal["", "softmax", "softmax_renorm", "sigmoid_grouped", "softmax_greedy", "sigmoid_renorm"]
ScoreFunction = Literal["softmax", "sigmoid"]

# The config keys routers read (their transformers defaults travel with the bridge: Facts.default_*).
ROUTING_KEYS = ("norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group", "topk_method",
                "router_scaling_factor")
# Which of them each scheme's modelling code reads (the rest are not read: inert for that model type).
READS: dict[str, frozenset[str]] = {
    "": frozenset(ROUTING_KEYS),
    "softmax": frozenset({"norm_topk_prob"}),
    "softmax_renorm": frozenset(),
    "sigmoid_grouped": frozenset({"norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group"}),
    "softmax_greedy": frozenset({"routed_scaling_factor", "n_group", "topk_group", "topk_method"}),
    "sigmoid_renorm": frozenset({"router_scaling_factor"}),
}


@dataclass(frozen=True)
class Routing:
    """The megatron-core router settings (``TransformerConfig.moe_router_*``)."""

    score_function: ScoreFunction = "softmax"
    pre_softmax: bool = False
    scaling_factor: float | None = None
    num_groups: int | None = None
    group_topk: int | None = None
    dtype: Literal["fp32"] | None = None  # the gate in fp32 (transformers casts input and weight to fp32)


@dataclass(frozen=True)
class RoutingGap:
    """A config value whose routing megatron-core cannot reproduce: ``key``, its ``value``, and why."""

    key: str
    value: Any
    reason: str


Get = Callable[[str], Any]  # a config value, else transformers' default for this model type, else None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _scale(get: Get, key: str = "routed_scaling_factor") -> float | None:
    value = get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or float(value) == 1.0:
        return None
    return float(value)


Groups = tuple[int | None, int | None, RoutingGap | None]  # num_groups, group_topk, or why not


def _groups(get: Get, topk: int, num_experts: int | None, per_group: int) -> Groups:
    """Group-limited selection when it restricts anything (``topk_group < n_group``), else none. transformers
    ranks groups by the sum of their best ``per_group`` scores; megatron-core by the sum of their best
    ``topk // topk_group``."""
    n_group, topk_group = get("n_group"), get("topk_group")
    if not (_is_int(n_group) and _is_int(topk_group)) or n_group <= 1 or topk_group >= n_group:
        return None, None, None
    if topk_group <= 0:
        return None, None, RoutingGap("topk_group", topk_group, "must select at least one expert group")
    if _is_int(num_experts) and num_experts % n_group:
        return None, None, RoutingGap("n_group", n_group, f"{num_experts} experts do not split into {n_group} "
                                      "groups")
    if topk // topk_group != per_group:
        what = "its best score" if per_group == 1 else f"the sum of its top-{per_group} scores"
        return None, None, RoutingGap(
            "topk_group", topk_group,
            f"group-limited routing ranks each of the {n_group} groups by {what}; megatron-core's "
            f"moe_router_group_topk ranks them by the sum of their top num_experts_per_tok // topk_group = "
            f"{topk} // {topk_group} = {topk // topk_group} scores (equal only when that is {per_group})")
    return n_group, topk_group, None


def routing(scheme: RouterScheme, get: Get, *, topk: int, num_experts: int | None = None,
            expert_bias: bool = False) -> tuple[Routing, tuple[RoutingGap, ...]]:
    """The megatron-core router for a model type's router ``scheme`` and its config (``get``), and the config
    values it cannot reproduce (empty: the Megatron model routes exactly as transformers does). The routing
    returned for a config with gaps is the nearest one megatron-core has (used under --accept-semantic-gap)."""
    gaps: list[RoutingGap] = []
    if scheme in ("softmax", "softmax_renorm"):
        renorm = scheme == "softmax_renorm" or bool(get("norm_topk_prob"))
        if renorm and topk == 1:
            key = "norm_topk_prob" if scheme == "softmax" else "num_experts_per_tok"
            gaps.append(RoutingGap(key, get(key) if scheme == "softmax" else topk,
                                   "top-1 routing renormalised (every token's expert weighted 1.0): megatron-core "
                                   "requires moe_router_pre_softmax at top-1, which weights it by its softmax "
                                   "probability"))
        return Routing("softmax", pre_softmax=not renorm or topk == 1), tuple(gaps)
    if scheme == "sigmoid_grouped":
        norm = bool(get("norm_topk_prob"))
        if norm != (topk > 1):
            gaps.append(RoutingGap(
                "norm_topk_prob", get("norm_topk_prob"),
                "sigmoid scores not renormalised over the top-k: megatron-core's sigmoid router always "
                "renormalises them when moe_router_topk > 1" if not norm else
                "a single sigmoid score renormalised (weight s / (s + 1e-20)): megatron-core never renormalises "
                "at top-1"))
        num_groups, group_topk, gap = _groups(get, topk, num_experts, 2)
        gaps += [gap] if gap else []
        return Routing("sigmoid", False, _scale(get), num_groups, group_topk, "fp32"), tuple(gaps)
    if scheme == "softmax_greedy":
        method = get("topk_method")
        num_groups = group_topk = None
        if method == "group_limited_greedy":
            num_groups, group_topk, gap = _groups(get, topk, num_experts, 1)
            gaps += [gap] if gap else []
        elif method not in ("greedy", None):
            gaps.append(RoutingGap("topk_method", method, "only greedy and group_limited_greedy are read by this "
                                   "model type's router"))
        return Routing("softmax", True, _scale(get), num_groups, group_topk, "fp32"), tuple(gaps)
    if scheme == "sigmoid_renorm":
        if topk == 1:
            gaps.append(RoutingGap("num_experts_per_tok", topk, "a single sigmoid score renormalised (weight "
                                   "s / (s + 1e-20)): megatron-core never renormalises at top-1"))
        return Routing("sigmoid", False, _scale(get, "router_scaling_factor"), None, None, "fp32"), tuple(gaps)
    # unknown router code: the bridge's historic router, neutral values only
    neutral = {"norm_topk_prob": (True,), "routed_scaling_factor": (1, 1.0), "n_group": (0, 1),
               "topk_group": (0, 1), "topk_method": ("greedy", "noaux_tc"), "router_scaling_factor": (1, 1.0)}
    for key, ok in neutral.items():
        value = get(key)
        if value is not None and not any(value == v and type(value) is type(v) for v in ok):
            gaps.append(RoutingGap(key, value, "mapgen does not know how this model type's router code reads "
                                   f"{key} (mapgen/families/model_types.py has no router scheme for it); the "
                                   "bridge builds a renormalised softmax router (sigmoid with a score-correction "
                                   "bias), which computes the same only for " + " / ".join(map(repr, ok))))
    if topk == 1:
        gaps.append(RoutingGap("num_experts_per_tok", topk, "top-1 routing under a router scheme mapgen does not "
                               "know: megatron-core neither renormalises a single weight to 1.0 nor builds a "
                               "top-1 softmax router without moe_router_pre_softmax"))
    return Routing("sigmoid" if expert_bias else "softmax", pre_softmax=topk == 1 and not expert_bias), tuple(gaps)
