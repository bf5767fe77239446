"""Recognisers: one per layer family. Each looks at a layer's key suffixes and either claims a complete,
consistent set of them (returning its IR node) or claims nothing.

Per-expert keys are first folded into ``{expert}`` templates (:func:`fold_experts`), so a 256-expert layer
has the same handful of suffixes as an 8-expert one. Shapes, when headers were read, decide what the keys
cannot (attention output gate, packed-expert orientation and count); the config only breaks ties.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

from mapgen.infer.ir import MLA, Attention, DenseMLP, Experts, GatedDeltaNet, Mixer, Mlp, MoE, SharedExpert

ShapeOf = Callable[[str], tuple[int, ...] | None]
"""suffix (``{expert}`` filled with 0) -> shape of that tensor in the layer being recognised, if known."""

Orientation = Literal["out_in", "in_out"]

# Packed-expert storage per model_type when no header says otherwise: (orientation, gate/up interleaved).
# qwen3_vl_moe: [E, hidden, 2*inter] (transposed). gpt_oss: [E, hidden, 2*inter], gate/up columns alternate.
# qwen3_5_moe (Qwen3.6 MTP experts): [E, 2*inter, hidden] as in transformers' Qwen3_5MoeExperts.
PACKED_DEFAULTS: dict[str, tuple[Orientation, bool]] = {
    "qwen3_vl_moe": ("in_out", False),
    "qwen3_vl_moe_text": ("in_out", False),
    "gpt_oss": ("in_out", True),
    "qwen3_5_moe": ("out_in", False),
    "qwen3_5_moe_text": ("out_in", False),
}

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
# Mixers
# ---------------------------------------------------------------------------------------------------------
def recognise_attention(pool: Pool, shape: ShapeOf, ctx: Context, *, sliding: bool) -> Attention | None:
    a = "self_attn."
    if not pool.has(a + "o_proj.weight") or pool.has(a + "kv_a_proj_with_mqa.weight"):
        return None
    separate = pool.has(*(f"{a}{x}_proj.weight" for x in "qkv"))
    if not separate and not pool.has(a + "qkv_proj.weight"):
        return None
    o = pool.need(a + "o_proj.weight")
    q = k = v = qkv = None
    if separate:
        q, k, v = (pool.need(f"{a}{x}_proj.weight") for x in "qkv")
    else:
        qkv = pool.need(a + "qkv_proj.weight")
    gate = ctx.output_gate
    q_shape, o_shape = (shape(q) if q else None), shape(o)
    if q_shape and o_shape and len(q_shape) == 2 and len(o_shape) == 2:
        gate = q_shape[0] == 2 * o_shape[1]
    return Attention(
        o=o,
        q=q,
        k=k,
        v=v,
        qkv=qkv,
        q_bias=pool.take(a + "q_proj.bias"),
        k_bias=pool.take(a + "k_proj.bias"),
        v_bias=pool.take(a + "v_proj.bias"),
        qkv_bias=pool.take(a + "qkv_proj.bias"),
        o_bias=pool.take(a + "o_proj.bias"),
        q_norm=pool.take(a + "q_norm.weight"),
        k_norm=pool.take(a + "k_norm.weight"),
        sinks=pool.take(a + "sinks"),
        output_gate=gate and q is not None,
        sliding_window=sliding,
    )


def recognise_gated_delta_net(pool: Pool) -> GatedDeltaNet | None:
    g = "linear_attn."
    core = [g + n for n in ("conv1d.weight", "A_log", "dt_bias", "norm.weight", "out_proj.weight")]
    split = [g + f"in_proj_{n}.weight" for n in ("qkv", "z", "b", "a")]
    fused = [g + f"in_proj_{n}.weight" for n in ("qkvz", "ba")]
    if not pool.has(*core) or not (pool.has(*split) or pool.has(*fused)):
        return None
    conv1d, a_log, dt_bias, norm, out_proj = (pool.need(n) for n in core)
    if pool.has(*split):
        qkv, z, b, a = (pool.need(n) for n in split)
        return GatedDeltaNet(
            conv1d=conv1d,
            a_log=a_log,
            dt_bias=dt_bias,
            norm=norm,
            out_proj=out_proj,
            in_proj_qkv=qkv,
            in_proj_z=z,
            in_proj_b=b,
            in_proj_a=a,
            conv1d_bias=pool.take(g + "conv1d.bias"),
        )
    qkvz, ba = (pool.need(n) for n in fused)
    return GatedDeltaNet(
        conv1d=conv1d,
        a_log=a_log,
        dt_bias=dt_bias,
        norm=norm,
        out_proj=out_proj,
        in_proj_qkvz=qkvz,
        in_proj_ba=ba,
        conv1d_bias=pool.take(g + "conv1d.bias"),
    )


def recognise_mla(pool: Pool) -> MLA | None:
    a = "self_attn."
    core = [a + n for n in ("kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight")]
    low_rank = [a + n for n in ("q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight")]
    if not pool.has(*core) or not (pool.has(*low_rank) or pool.has(a + "q_proj.weight")):
        return None
    kv_a, kv_norm, kv_b, o = (pool.need(n) for n in core)
    if pool.has(*low_rank):
        q_a, q_norm, q_b = (pool.need(n) for n in low_rank)
        return MLA(
            kv_a_proj_with_mqa=kv_a,
            kv_a_layernorm=kv_norm,
            kv_b_proj=kv_b,
            o=o,
            q_a_proj=q_a,
            q_a_layernorm=q_norm,
            q_b_proj=q_b,
        )
    return MLA(kv_a_proj_with_mqa=kv_a, kv_a_layernorm=kv_norm, kv_b_proj=kv_b, o=o, q=pool.need(a + "q_proj.weight"))


def recognise_mixer(pool: Pool, shape: ShapeOf, ctx: Context, *, sliding: bool) -> Mixer | None:
    return (
        recognise_gated_delta_net(pool) or recognise_mla(pool) or recognise_attention(pool, shape, ctx, sliding=sliding)
    )


# ---------------------------------------------------------------------------------------------------------
# MLPs
# ---------------------------------------------------------------------------------------------------------
_GATE_UP_DOWN = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def recognise_dense(pool: Pool, p: str) -> DenseMLP | None:
    """A gated MLP under prefix ``p`` (``mlp.``, ``mlp.shared_expert.``, ``mlp.experts.{expert}.``)."""
    for gate, up, down in _GATE_UP_DOWN:
        names = (f"{p}{gate}.weight", f"{p}{up}.weight", f"{p}{down}.weight")
        if pool.has(*names):
            g, u, d = (pool.need(n) for n in names)
            return DenseMLP(
                down=d,
                gate=g,
                up=u,
                gate_bias=pool.take(f"{p}{gate}.bias"),
                up_bias=pool.take(f"{p}{up}.bias"),
                down_bias=pool.take(f"{p}{down}.bias"),
            )
    if pool.has(p + "gate_up_proj.weight", p + "down_proj.weight"):
        return DenseMLP(
            down=pool.need(p + "down_proj.weight"),
            gate_up=pool.need(p + "gate_up_proj.weight"),
            down_bias=pool.take(p + "down_proj.bias"),
        )
    return None


def _orientation(gate_up: tuple[int, ...] | None, down: tuple[int, ...] | None) -> Orientation | None:
    """From packed shapes: out_in = gate_up [E, 2I, H], down [E, H, I]; in_out = [E, H, 2I], [E, I, H]."""
    if not gate_up or not down or len(gate_up) != 3 or len(down) != 3:
        return None
    out_in = gate_up[1] == 2 * down[2] and gate_up[2] == down[1]
    in_out = gate_up[2] == 2 * down[1] and gate_up[1] == down[2]
    if out_in != in_out:
        return "out_in" if out_in else "in_out"
    return None


def recognise_experts(
    pool: Pool, p: str, shape: ShapeOf, ctx: Context, ids: dict[str, dict[str, set[int]]], problems: list[Problem]
) -> Experts | None:
    ep = p + "experts."
    slot = f"{ep}{EXPERT_SLOT}."
    # -- per expert ---------------------------------------------------------------------------------------
    if ep in ids:
        mlp = recognise_dense(pool, slot)
        if mlp is None:
            return None
        per_template = ids[ep]
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
        packed = [n for n in (ep + "gate_up_proj", ep + "down_proj", ep + "gate_up_proj_blocks") if pool.has(n)]
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
        return Experts(
            layout="per_expert",
            num_experts=len(expected),
            down=mlp.down,
            gate=mlp.gate,
            up=mlp.up,
            gate_up=mlp.gate_up,
            gate_bias=mlp.gate_bias,
            up_bias=mlp.up_bias,
            down_bias=mlp.down_bias,
        )

    # -- packed -------------------------------------------------------------------------------------------
    quant: Literal["none", "mxfp4"] = "none"
    if pool.has(ep + "gate_up_proj", ep + "down_proj"):
        gate_up, down = pool.need(ep + "gate_up_proj"), pool.need(ep + "down_proj")
        gate_up_scales = down_scales = None
    elif pool.has(
        *(ep + n for n in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"))
    ):
        gate_up, down = pool.need(ep + "gate_up_proj_blocks"), pool.need(ep + "down_proj_blocks")
        gate_up_scales, down_scales = pool.need(ep + "gate_up_proj_scales"), pool.need(ep + "down_proj_scales")
        quant = "mxfp4"
    else:
        return None
    gu_shape, down_shape = shape(gate_up), shape(down)
    count = gu_shape[0] if gu_shape else ctx.num_experts
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
    known = next((PACKED_DEFAULTS[t] for t in ctx.model_types if t in PACKED_DEFAULTS), None)
    default: tuple[Orientation, bool] = known or ("out_in", False)
    orientation = _orientation(gu_shape, down_shape) if quant == "none" else None
    source: Literal["shapes", "model_type_default"] = "shapes"
    if orientation is None:
        if known is None:
            problems.append(
                Problem(
                    "error",
                    "experts.orientation-unknown",
                    f"packed experts of model_type {ctx.model_types[:1]} with no shapes to tell [E, out, in] from "
                    "[E, in, out]",
                    suffix=gate_up,
                    expected="shard files present (headers are read), or a model_type with a known default",
                )
            )
        orientation, source = default[0], "model_type_default"
    return Experts(
        layout="packed",
        num_experts=count,
        down=down,
        gate_up=gate_up,
        gate_up_bias=pool.take(ep + "gate_up_proj_bias"),
        down_bias=pool.take(ep + "down_proj_bias"),
        gate_up_scales=gate_up_scales,
        down_scales=down_scales,
        orientation=orientation,
        orientation_source=source,
        gate_up_interleave=default[1],
        quant=quant,
    )


def recognise_mlp(
    pool: Pool, shape: ShapeOf, ctx: Context, ids: dict[str, dict[str, set[int]]], problems: list[Problem]
) -> Mlp | None:
    for p in ("mlp.", "block_sparse_moe.", "feed_forward."):
        router = next((r for r in (p + "gate.weight", p + "router.weight") if pool.has(r)), None)
        if router is not None:
            experts = recognise_experts(pool, p, shape, ctx, ids, problems)
            if experts is not None:
                pool.need(router)
                shared_mlp = recognise_dense(pool, p + "shared_expert.") or recognise_dense(pool, p + "shared_experts.")
                shared_gate = pool.take(p + "shared_expert_gate.weight")
                shared = SharedExpert(shared_mlp, shared_gate) if shared_mlp else None
                if shared is None and shared_gate is not None:
                    pool.avail.add(shared_gate)  # a gate without an expert: leave it unclassified
                    pool.used.discard(shared_gate)
                return MoE(
                    router=router,
                    experts=experts,
                    router_bias=pool.take(router.removesuffix("weight") + "bias"),
                    expert_bias=pool.take(p + "gate.e_score_correction_bias"),
                    shared=shared,
                )
        dense = recognise_dense(pool, p)
        if dense is not None:
            return dense
    return None
