"""Recognisers: one per layer family. Each looks at a layer's key suffixes and either claims a complete,
consistent set of them (returning its IR node) or claims nothing.

Per-expert keys are first folded into ``{expert}`` templates (:func:`fold_experts`), so a 256-expert layer
has the same handful of suffixes as an 8-expert one. Shapes, when headers were read, decide what the keys
cannot (attention output gate, packed-expert orientation and count); the config only breaks ties.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

from mapgen.families import Family, Match
from mapgen.families.attention import ATTENTION as ATTENTION_FAMILY
from mapgen.families.attention import CONV1D as ATTENTION_CONV1D
from mapgen.families.attention import FUSED_QKV_LAYOUT
from mapgen.families.dense_mlp import CONV1D as MLP_CONV1D
from mapgen.families.dense_mlp import DENSE_MLP as DENSE_MLP_FAMILY
from mapgen.families.gated_delta_net import GATED_DELTA_NET as GDN_FAMILY
from mapgen.families.mamba import MAMBA as MAMBA_FAMILY
from mapgen.families.mla import MLA as MLA_FAMILY
from mapgen.families.model_types import MODEL_TYPES, Orientation, facts_for
from mapgen.families.moe import EXPERTS, LAYER_EXPERT_BIAS, LAYER_SHARED_ROOTS, MOE, SHARED_EXPERT
from mapgen.ir import Component

ShapeOf = Callable[[str], tuple[int, ...] | None]
"""suffix (``{expert}`` filled with 0) -> shape of that tensor in the layer being recognised, if known."""


def packed_default(model_types: Iterable[str]) -> tuple[Orientation, bool] | None:
    """Packed-expert storage (orientation, gate/up interleaved) the first listed model type declares."""
    return next((MODEL_TYPES[t].packed for t in model_types if t in MODEL_TYPES and MODEL_TYPES[t].packed), None)


EXPERT_SLOT = "{expert}"


def _fold_one(s: str) -> tuple[str, str, int] | None:
    """``mlp.experts.7.w1.weight`` -> (``mlp.experts.``, ``mlp.experts.{expert}.w1.weight``, 7)."""
    i = s.find("experts.")
    j = s.find(".", i + 8) if i >= 0 else -1
    num = s[i + 8 : j] if j > 0 else ""
    if not num.isdigit() or not num.isascii() or (num[0] == "0" and num != "0"):
        return None
    head = s[: i + 8]
    return head, f"{head}{EXPERT_SLOT}{s[j:]}", int(num)


Folded = tuple[dict[str, list[str]], dict[str, dict[str, set[int]]]]
"""(folded suffix -> original suffixes, experts prefix -> {folded suffix -> expert ids})"""


def fold_experts(suffixes: Iterable[str]) -> Folded:
    """Fold ``...experts.<e>.rest`` into ``...experts.{expert}.rest``.

    Returns (folded suffix -> original suffixes, experts prefix -> {folded suffix -> expert ids}).
    """
    folded: dict[str, list[str]] = {}
    ids: dict[str, dict[str, set[int]]] = {}
    for s in suffixes:
        hit = _fold_one(s)
        if hit is None:
            folded.setdefault(s, []).append(s)
            continue
        head, t, num = hit
        folded.setdefault(t, []).append(s)
        ids.setdefault(head, {}).setdefault(t, set()).add(num)
    return folded, ids


class Context(NamedTuple):
    """What recognisers may consult besides the keys: the config's tie-breakers."""

    model_types: tuple[str, ...] = ()
    num_experts: int | None = None
    output_gate: bool = False


class Pool:
    """The folded suffixes of one layer not yet claimed by a recogniser."""

    __slots__ = ("avail", "used")

    def __init__(self, avail: set[str]) -> None:
        self.avail = avail
        self.used: set[str] = set()

    def has(self, *names: str) -> bool:
        return all(n in self.avail for n in names)

    def take(self, name: str) -> str | None:
        if name in self.avail:
            self.avail.discard(name)
            self.used.add(name)
            return name
        return None

    def need(self, name: str) -> str:
        got = self.take(name)
        assert got is not None, name
        return got


class Problem(NamedTuple):
    """A finding inside a layer (the caller adds the file and the full key)."""

    severity: Literal["error", "warning"]
    code: str
    message: str
    suffix: str = ""
    expected: str = ""


# ---------------------------------------------------------------------------------------------------------
# The generic matcher: a family's declared roots, variants and slot spellings against a layer's pool
# ---------------------------------------------------------------------------------------------------------
def _resolve(pool: Pool, root: str, family: Family, slot: str) -> str | None:
    """The first spelling of ``slot`` under ``root`` that the pool holds."""
    return next((root + s for s in family.slot(slot).spellings if root + s in pool.avail), None)


def match_family(family: Family, pool: Pool, roots: Iterable[str] | None = None) -> Match | None:
    """Try ``family``'s variants (in order) under each root; claim the first complete one. A variant is
    complete when every required slot is present under some spelling and no ``excludes`` spelling is."""
    for root in family.roots if roots is None else roots:
        if any(root + x in pool.avail for x in family.excludes):
            continue
        for variant in family.variants:
            found = {slot: _resolve(pool, root, family, slot) for slot in variant.required}
            if any(v is None for v in found.values()):
                continue
            keys = {slot: pool.need(key) for slot, key in found.items() if key is not None}
            for slot in variant.optional:
                key = _resolve(pool, root, family, slot)
                if key is not None:
                    keys[slot] = pool.need(key)
            return Match(family, root, variant, keys)
    return None


# ---------------------------------------------------------------------------------------------------------
# Mixers
# ---------------------------------------------------------------------------------------------------------
def recognise_attention(pool: Pool, shape: ShapeOf, ctx: Context, *, sliding: bool) -> Component | None:
    m = match_family(ATTENTION_FAMILY, pool)
    if m is None:
        return None
    q, o = m.get("q"), m.get("o")
    gate = ctx.output_gate
    q_shape, o_shape = (shape(q) if q else None), (shape(o) if o else None)
    if q_shape and o_shape and len(q_shape) == 2 and len(o_shape) == 2:
        gate = q_shape[0] == 2 * o_shape[1]
    flags: dict[str, bool | str | None] = {"output_gate": gate and q is not None, "sliding_window": sliding}
    if m.get("qkv") is not None:  # how the fused projection stores q/k/v is declared per spelling
        flags["qkv_layout"] = facts_for(ctx.model_types).qkv_layout or FUSED_QKV_LAYOUT.get(m.keys["qkv"])
    flags["conv1d"] = _conv1d(m, ATTENTION_CONV1D, ctx.model_types)
    if m.get("q_norm") is not None and facts_for(ctx.model_types).qk_norm_projection:
        flags["qk_norm_projection"] = True
    return Component.make(ATTENTION_FAMILY.name, m.variant.name, m.keys, flags=flags)


def _conv1d(m: Match, spellings: frozenset[str], model_types: Iterable[str]) -> bool | str | None:
    """The ``conv1d`` flag: True when the matched weights use GPT-2 spellings (``c_attn``, ``c_proj``, ``c_fc``)
    and the model type declares ``Conv1D`` storage (``[in, out]``); ``"undeclared"`` when it declares neither
    that nor ``nn.Linear`` (the planner refuses: the spelling does not say); None otherwise."""
    if not any(key.removeprefix(m.root) in spellings for key in m.keys.values()):
        return None
    declared = next((MODEL_TYPES[t].conv1d for t in model_types if t in MODEL_TYPES), None)
    if declared is None:
        return "undeclared"
    return True if declared else None


def _plain(family: Family, pool: Pool, roots: Iterable[str] | None = None) -> Component | None:
    """A family whose component is exactly its matched slots (no flags to decide)."""
    m = match_family(family, pool, roots)
    return None if m is None else Component.make(family.name, m.variant.name, m.keys)


def recognise_gated_delta_net(pool: Pool) -> Component | None:
    return _plain(GDN_FAMILY, pool)


def recognise_mla(pool: Pool, ctx: Context) -> Component | None:
    m = match_family(MLA_FAMILY, pool)
    if m is None:
        return None
    flags = {"gated_q": True if facts_for(ctx.model_types).mla_gated_q else None}  # A.X-K2 (declared, never guessed)
    return Component.make(MLA_FAMILY.name, m.variant.name, m.keys, flags=flags)


def recognise_mamba(pool: Pool, shape: ShapeOf, ctx: Context, *, sliding: bool) -> Component | None:
    """A Mamba mixer, with the attention that runs beside it in the same layer as its ``attention`` child
    (Falcon-H1's parallel hybrid)."""
    mamba = _plain(MAMBA_FAMILY, pool)
    if mamba is None:
        return None
    beside = recognise_attention(pool, shape, ctx, sliding=sliding)
    return mamba if beside is None else dataclasses.replace(mamba, children=(("attention", beside),))


def recognise_mixer(pool: Pool, shape: ShapeOf, ctx: Context, *, sliding: bool) -> Component | None:
    return (
        recognise_gated_delta_net(pool) or recognise_mamba(pool, shape, ctx, sliding=sliding)
        or recognise_mla(pool, ctx)
        or recognise_attention(pool, shape, ctx, sliding=sliding)
    )


# ---------------------------------------------------------------------------------------------------------
# MLPs
# ---------------------------------------------------------------------------------------------------------
def recognise_dense(pool: Pool, p: str, model_types: Iterable[str] = ()) -> Component | None:
    """A dense MLP under prefix ``p`` (``mlp.``, ``mlp.shared_expert.``, ``mlp.experts.{expert}.``)."""
    m = match_family(DENSE_MLP_FAMILY, pool, (p,))
    if m is None:
        return None
    flags = {"conv1d": _conv1d(m, MLP_CONV1D, model_types)}
    return Component.make(DENSE_MLP_FAMILY.name, m.variant.name, m.keys, flags=flags)


def _orientation(gate_up: tuple[int, ...] | None, down: tuple[int, ...] | None) -> Orientation | None:
    """From packed shapes: out_in = gate_up [E, 2I, H], down [E, H, I]; in_out = [E, H, 2I], [E, I, H]."""
    if not gate_up or not down or len(gate_up) != 3 or len(down) != 3:
        return None
    out_in = gate_up[1] == 2 * down[2] and gate_up[2] == down[1]
    in_out = gate_up[2] == 2 * down[1] and gate_up[1] == down[2]
    if out_in != in_out:
        return "out_in" if out_in else "in_out"
    return None


def _per_expert_problems(pool: Pool, ep: str, ctx: Context, per_template: dict[str, set[int]],
                         problems: list[Problem]) -> int:
    """Diagnostics of a per-expert block (duplicate/leading-zero ids, mixed storage, missing or extra experts);
    returns the expert count."""
    union = set().union(*per_template.values())
    for name in sorted(pool.avail):  # ``experts.01.``: the same expert id written twice, or not canonically
        num = name[len(ep) :].split(".", 1)[0] if name.startswith(ep) else ""
        if num.isdigit() and num.isascii() and num != str(int(num)):
            dup = int(num) in union
            problems.append(
                Problem(
                    "error",
                    "experts.duplicate" if dup else "experts.bad-index",
                    f"expert index {num!r} " + (f"duplicates expert {int(num)}" if dup else "has a leading zero"),
                    suffix=name,
                    expected="expert ids written once each, as 0, 1, 2, ... without leading zeros",
                )
            )
    packed_names = [ep[: -len(EXPERTS.roots[0])] + r + s for r in EXPERTS.roots
                    for n in ("gate_up", "down", "gate_up_blocks") for s in EXPERTS.slot(n).spellings]
    packed = [n for n in packed_names if pool.has(n)]
    if packed:
        problems.append(
            Problem(
                "error",
                "experts.mixed-storage",
                f"this block stores experts both per expert ({ep}<e>.*) and packed ({packed[0]})",
                suffix=packed[0],
                expected="one storage scheme per MoE block: per-expert tensors or packed [E, ...] tensors",
            )
        )
    expected = set(range(ctx.num_experts if ctx.num_experts else max(union) + 1))
    for template, have in sorted(per_template.items()):
        for e in sorted(expected - have):
            problems.append(
                Problem(
                    "error",
                    "experts.missing",
                    f"expert {e} has no {template.replace(EXPERT_SLOT, str(e))}",
                    suffix=template.replace(EXPERT_SLOT, str(e)),
                    expected=f"experts 0..{len(expected) - 1} each with the same tensors",
                )
            )
    extra = union - expected
    if extra:
        problems.append(
            Problem(
                "error",
                "config.experts-mismatch",
                f"keys hold experts up to {max(union)} but the config declares {len(expected)} experts",
                suffix=f"{ep}{max(extra)}.",
                expected=f"expert ids 0..{len(expected) - 1}",
            )
        )
    return len(expected)


def recognise_experts(
    pool: Pool, p: str, shape: ShapeOf, ctx: Context, ids: dict[str, dict[str, set[int]]], problems: list[Problem]
) -> Component | None:
    for container in EXPERTS.roots:
        ep = p + container
        # -- per expert: the dense MLP's spellings under ``experts.{expert}.`` ------------------------------
        if ep in ids:
            mlp = recognise_dense(pool, f"{ep}{EXPERT_SLOT}.")
            if mlp is None:
                return None
            if mlp.variant == "plain":  # per-expert fc1/fc2: no expert op builds them; leave them unclassified
                for key in mlp.own_keys():
                    pool.avail.add(key)
                    pool.used.discard(key)
                return None
            n = _per_expert_problems(pool, ep, ctx, ids[ep], problems)
            return Component.make(
                EXPERTS.name, "per_expert", dict(mlp.slots),
                flags={"layout": "per_expert", "orientation": "out_in", "gate_up_interleave": False, "quant": "none"},
                counts={"num_experts": n, "orientation_source": "per_expert"},
            )
        # -- packed -------------------------------------------------------------------------------------------
        m = match_family(EXPERTS, pool, roots=(ep,))
        if m is None:
            continue
        quant: Literal["none", "mxfp4"] = "mxfp4" if m.variant.name == "packed_mxfp4" else "none"
        gate_up = m.keys["gate_up_blocks" if quant == "mxfp4" else "gate_up"]
        down = m.keys["down_blocks" if quant == "mxfp4" else "down"]
        gu_shape, down_shape = shape(gate_up), shape(down)
        count: int | None = gu_shape[0] if gu_shape else ctx.num_experts
        if count is None:
            problems.append(
                Problem(
                    "error",
                    "experts.count-unknown",
                    "packed experts but neither a header nor the config gives their number",
                    suffix=gate_up,
                    expected="num_experts / num_local_experts in config.json",
                )
            )
            count = 0
        elif gu_shape and ctx.num_experts and gu_shape[0] != ctx.num_experts:
            problems.append(
                Problem(
                    "error",
                    "config.experts-mismatch",
                    f"packed tensor holds {gu_shape[0]} experts but the config declares {ctx.num_experts}",
                    suffix=gate_up,
                )
            )
        known = packed_default(ctx.model_types)
        default: tuple[Orientation, bool] = known or ("out_in", False)
        orientation = _orientation(gu_shape, down_shape) if quant == "none" else None
        source: Literal["shapes", "model_type_default"] = "shapes"
        if orientation is None:
            if known is None:
                problems.append(
                    Problem(
                        "error",
                        "experts.orientation-unknown",
                        f"packed experts of model_type {ctx.model_types[:1]} with no shapes to tell [E, out, in] "
                        "from [E, in, out]",
                        suffix=gate_up,
                        expected="shard files present (headers are read), or a model_type with a known default",
                    )
                )
            orientation, source = default[0], "model_type_default"
        return Component.make(
            EXPERTS.name, m.variant.name, m.keys,
            flags={"layout": "packed", "orientation": orientation, "gate_up_interleave": default[1], "quant": quant},
            counts={"num_experts": count, "orientation_source": source},
        )
    return None


def recognise_mlp(
    pool: Pool, shape: ShapeOf, ctx: Context, ids: dict[str, dict[str, set[int]]], problems: list[Problem]
) -> Component | None:
    for p in MOE.roots:
        router = _resolve(pool, p, MOE, "router")
        if router is not None:
            experts = recognise_experts(pool, p, shape, ctx, ids, problems)
            if experts is not None:
                pool.need(router)
                shared_mlp = next((m for r in (*(p + r for r in SHARED_EXPERT.roots), *LAYER_SHARED_ROOTS)
                                   if (m := recognise_dense(pool, r))), None)
                gate_key = _resolve(pool, p, SHARED_EXPERT, "gate")
                shared_gate = pool.need(gate_key) if gate_key else None
                shared = (Component.make(SHARED_EXPERT.name, "shared", {"gate": shared_gate},
                                         children={"mlp": shared_mlp}) if shared_mlp else None)
                if shared is None and shared_gate is not None:
                    pool.avail.add(shared_gate)  # a gate without an expert: leave it unclassified
                    pool.used.discard(shared_gate)
                router_bias = next((p + s for s in MOE.slot("router_bias").spellings
                                    if p + s == router.removesuffix("weight") + "bias"), None)
                expert_bias = _resolve(pool, p, MOE, "expert_bias") or next(
                    (k for k in LAYER_EXPERT_BIAS if k in pool.avail), None)
                output_bias = _resolve(pool, p, MOE, "output_bias")
                slots = {
                    "router": router,
                    "router_bias": pool.take(router_bias) if router_bias else None,
                    "expert_bias": pool.take(expert_bias) if expert_bias else None,
                    "output_bias": pool.take(output_bias) if output_bias else None,
                }
                return Component.make(MOE.name, "routed", slots, children={"experts": experts, "shared": shared})
        dense = recognise_dense(pool, p, ctx.model_types)
        if dense is not None:
            return dense
    for p in DENSE_MLP_FAMILY.roots:  # dense-only roots (OPT: fc1/fc2 directly in the layer)
        if p not in MOE.roots and (dense := recognise_dense(pool, p, ctx.model_types)) is not None:
            return dense
    return None
