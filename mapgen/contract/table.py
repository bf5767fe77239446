"""The table language generated bridges are written in: typed op constructors, rows and groups.

A bridge lists its rules as rows ``(megatron suffix, hf suffix or tuple of suffixes, op)`` under a
:class:`Group` that names the rule domain and the Megatron and HF roots the suffixes hang off. A block of
rows that several groups share (a MoE block, an attention layer reused as the MTP inner layer) is a module
constant written once. :func:`flatten` turns groups back into flat :class:`~mapgen.contract.rules.Rule`
objects, which is all the proof and the runtime consume: ``root + suffix`` for every name, the op's name,
sharding, expert range and options.

The constructors below are the reviewed spellings of the ops (defaults are the planner's usual values);
:func:`op` is the general form for a combination no constructor spells.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from mapgen.contract.rules import Op, Rule, Sharding

__all__ = [
    "CONSTRUCTORS",
    "Group",
    "OpSpec",
    "Row",
    "copy",
    "duplicate",
    "experts_fc1",
    "experts_fc2",
    "flatten",
    "gated_fc1",
    "gdn_conv1d",
    "gdn_in_proj",
    "mtp_eh_proj",
    "op",
    "qkv",
]

Option = tuple[str, str | int | bool]


@dataclass(frozen=True)
class OpSpec:
    """An op with its declared sharding, expert range and options (sorted by name): a Rule minus names."""

    op: Op
    sharding: Sharding
    experts: bool = False
    options: tuple[Option, ...] = ()


Row = tuple[str, str | tuple[str, ...], OpSpec]


def _spec(name: Op, sharding: Sharding, experts: bool = False, **options: str | int | bool | None) -> OpSpec:
    return OpSpec(name, sharding, experts, tuple(sorted((k, v) for k, v in options.items() if v is not None)))


def op(name: Op, sharding: Sharding, *, experts: bool = False, options: tuple[Option, ...] = ()) -> OpSpec:
    """Any op, sharding and options, spelled out."""
    return OpSpec(name, sharding, experts, options)


def copy(  # noqa: PLR0913 -- one keyword per CopyOptions field
    sharding: Sharding = "replicated", *, transform: Literal["none", "zero_centered"] | None = None,
    dtype: Literal["fp32"] | None = None, shared: bool | None = None, orientation: Literal["in_out"] | None = None,
    layout: Literal["packed"] | None = None, roll: int | None = None,
) -> OpSpec:
    """One tensor as is (``transform``: zero-centred norm weights; ``dtype``: kept in fp32; ``shared``: one HF
    tensor serves every MTP depth; ``orientation='in_out'``: a GPT-2 Conv1D weight stored [in, out];
    ``layout='packed'``: each routed expert's slot of a packed [E, ...] tensor, e.g. gpt-oss's down_proj_bias;
    ``roll``: rows rotated, HF row ``i + roll`` is Megatron row ``i``, OPT's position table)."""
    return _spec("copy", sharding, layout is not None, transform=transform, dtype=dtype, shared=shared,
                 orientation=orientation, layout=layout, roll=roll)


def qkv(*, output_gate: bool = False, part: Literal["weight", "bias"] = "weight",
        layout: Literal["blocks", "per_group"] | None = None, orientation: Literal["in_out"] | None = None) -> OpSpec:
    """q, k, v (``output_gate``: q carries the gate; ``layout``: one fused HF tensor stored as ``blocks``
    [q; k; v] or ``per_group`` [q_g; k_g; v_g]; ``orientation='in_out'``: a Conv1D weight) -> linear_qkv,
    grouped per query group."""
    return _spec("qkv", "qkv_groups", output_gate=output_gate, part=part, layout=layout, orientation=orientation)


def gated_fc1(*, fused: bool = False) -> OpSpec:
    """gate + up (``fused``: one gate_up tensor) -> linear_fc1 as [gate_r; up_r] per TP rank."""
    return _spec("gated_fc1", "gated_column", fused=fused)


def experts_fc1(layout: Literal["per_expert", "packed"] = "per_expert", *,
                orientation: Literal["out_in", "in_out"] | None = None, interleave: bool | None = None,
                part: Literal["bias"] | None = None) -> OpSpec:
    """Routed experts' gate + up -> each local expert's linear_fc1 (packed: one [E, ...] tensor; ``interleave``:
    gate/up columns alternate; ``part='bias'``: the gate/up bias)."""
    return _spec("expert_fc1", "expert_gated_column", True, layout=layout, orientation=orientation,
                 interleave=interleave, part=part)


def experts_fc2(layout: Literal["per_expert", "packed"] = "per_expert", *,
                orientation: Literal["out_in", "in_out"] | None = None) -> OpSpec:
    """Routed experts' down -> each local expert's linear_fc2."""
    return _spec("expert_fc2", "expert_row", True, layout=layout, orientation=orientation)


def gdn_in_proj(variant: Literal["qkv_z_b_a", "qkvz_ba"] = "qkv_z_b_a") -> OpSpec:
    """in_proj_qkv/z/b/a (Qwen3.5) or in_proj_qkvz/ba grouped per key head (Qwen3-Next) -> the gated
    delta-net's fused in_proj, per TP rank [q k v z b a]."""
    return _spec("gdn_in_proj", "gdn_heads", variant=None if variant == "qkv_z_b_a" else variant)


def gdn_conv1d() -> OpSpec:
    """The depthwise conv over [q k v] channels, split per TP rank."""
    return _spec("gdn_conv1d", "gdn_heads")


def mtp_eh_proj(*, order: Literal["embedding_hidden", "hidden_embedding"] = "embedding_hidden",
                shared: bool | None = None) -> OpSpec:
    """The MTP projection of [embedding; hidden] with the HF input order."""
    return _spec("mtp_eh_proj", "column", order=order, shared=shared)


def duplicate() -> OpSpec:
    """An HF copy of a tensor another rule produces (checked equal on import, re-emitted on export)."""
    return _spec("duplicate", "vocab")


# The reviewed spelling of each op (what the renderer writes when it reproduces the rule exactly).
CONSTRUCTORS: dict[str, Callable[..., OpSpec]] = {
    "copy": copy,
    "qkv": qkv,
    "gated_fc1": gated_fc1,
    "expert_fc1": experts_fc1,
    "expert_fc2": experts_fc2,
    "gdn_in_proj": gdn_in_proj,
    "gdn_conv1d": gdn_conv1d,
    "mtp_eh_proj": mtp_eh_proj,
    "duplicate": duplicate,
}


@dataclass(frozen=True)
class Group:
    """Rows under one rule domain (``global``, ``decoder:<group>``, ``mtp``, ``mtp:<group>``) and the roots
    their Megatron and HF suffixes hang off."""

    domain: str
    megatron: str
    hf: str
    rows: tuple[Row, ...]


def flatten(groups: tuple[Group, ...]) -> tuple[Rule, ...]:
    """The flat rules the groups stand for, in order."""
    rules = []
    for group in groups:
        for megatron, hf, spec in group.rows:
            keys = (hf,) if isinstance(hf, str) else hf
            rules.append(Rule(family="", megatron=group.megatron + megatron, hf=tuple(group.hf + k for k in keys),
                              op=spec.op, sharding=spec.sharding, domain=group.domain, experts=spec.experts,
                              options=spec.options))
    return tuple(rules)
