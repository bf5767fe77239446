"""DeepSeek multi-latent attention: ``q_a_proj``/``q_a_layernorm``/``q_b_proj`` (or a full-rank ``q_proj``),
``kv_a_proj_with_mqa`` (latent + rope part), ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``.

Classified by scan; the planner refuses it by name until the MLA conversion lands.
"""

from __future__ import annotations

from mapgen.families._dsl import Dims, Family, Planner, ShapePairs, Slot, Variant
from mapgen.ir import Component

_CORE = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o")

MLA = Family(
    "mla",
    role="mixer",
    description="multi-latent attention (DeepSeek-V2/V3, Kimi-K2)",
    file=__name__,
    roots=("self_attn.",),
    slots=(
        Slot("kv_a_proj_with_mqa", ("kv_a_proj_with_mqa.weight",)),
        Slot("kv_a_layernorm", ("kv_a_layernorm.weight",), init="norm"),
        Slot("kv_b_proj", ("kv_b_proj.weight",)),
        Slot("o", ("o_proj.weight",)),
        Slot("q_a_proj", ("q_a_proj.weight",)),
        Slot("q_a_layernorm", ("q_a_layernorm.weight",), init="norm"),
        Slot("q_b_proj", ("q_b_proj.weight",)),
        Slot("q", ("q_proj.weight",)),
    ),
    variants=(
        Variant("q_low_rank", (*_CORE, "q_a_proj", "q_a_layernorm", "q_b_proj")),
        Variant("q_full_rank", (*_CORE, "q")),
    ),
)

INPUT_NORM = "input_layernorm.weight"


def facts(c: Component) -> dict[str, bool]:
    return {}


def kind(c: Component) -> str:
    return "mla"


def describe(c: Component) -> str:
    return "MLA (" + ("q low-rank" if c.key("q_a_proj") else "q full-rank") + ")"


def shapes(c: Component, d: Dims) -> ShapePairs:
    if d.mla is None:
        return [(c.key(s), None) for s in ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o")]
    q_rank, kv_rank, nope, rope, v_dim = d.mla
    q_rows = d.heads * (nope + rope)
    return [
        (c.key("q_a_proj"), (q_rank, d.hidden) if q_rank else None),
        (c.key("q_a_layernorm"), (q_rank,) if q_rank else None),
        (c.key("q_b_proj"), (q_rows, q_rank) if q_rank else None),
        (c.key("q"), (q_rows, d.hidden)),
        (c.key("kv_a_proj_with_mqa"), (kv_rank + rope, d.hidden)),
        (c.key("kv_a_layernorm"), (kv_rank,)),
        (c.key("kv_b_proj"), (d.heads * (nope + v_dim), kv_rank)),
        (c.key("o"), (d.hidden, d.heads * v_dim)),
    ]


def plan(c: Component, p: Planner, mroot: str, hroot: str, domain: str, name: str) -> None:
    p.unsupported("mla attention", hroot + str(c.key("o")))
