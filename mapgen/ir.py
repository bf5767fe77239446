"""The typed intermediate representation of a checkpoint's layout (schema version 2).

Frozen dataclasses, a ``SCHEMA_VERSION``, and a lossless round trip through sorted JSON. Repeated structure
stays symbolic: a :class:`LayerGroup` names an :class:`IndexSet` of layers (``0-2,4-6,...``) and key
*patterns* with ``{layer}``/``{expert}`` placeholders, never thousands of expanded keys.

Every family instance is one generic :class:`Component` (family, variant, slots, flags, counts, children) whose
fields have typed roles; what a family's slots and flags mean is declared in :mod:`mapgen.families`. A
:class:`LayerGroup` is a block-norms component, a mixer and an MLP. Schema-1 layouts (one dataclass per family,
written by mapgen 0.1) are upgraded on load (:func:`upgrade_v1`).

Key conventions
---------------
* A component's slots are key suffixes relative to the root of the layer that owns it
  (``self_attn.q_proj.weight``). A suffix under a per-expert family contains ``{expert}``.
* A :class:`LayerGroup` has a ``root`` such as ``model.language_model.layers.{layer}.``; the full key of a
  tensor is ``root.format(layer=i) + suffix``. MTP inner layers use roots such as ``mtp.layers.{layer}.``
  where ``layer`` runs over MTP depths (plus ``index_offset`` for DeepSeek-style extra decoder layers, whose
  HF index is ``num_hidden_layers + depth``).
* Top-level keys (embedding, final norm, lm_head, MTP shared tensors) are stored as full key names.

This module imports nothing but the standard library: scanning must stay fast, and every stage imports it.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

SCHEMA_VERSION = 2

ExpertLayout = Literal["packed", "per_expert", "none"]
MtpScheme = Literal["none", "mtp_block", "extra_layers", "mtp_layers"]


# ---------------------------------------------------------------------------------------------------------
# Index sets
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexSet:
    """A sorted set of non-negative integers stored as inclusive ranges; JSON form ``"0-2,4-6,8"``."""

    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, values: Iterable[int]) -> IndexSet:
        ordered = sorted(set(values))
        ranges: list[tuple[int, int]] = []
        for v in ordered:
            if ranges and ranges[-1][1] == v - 1:
                ranges[-1] = (ranges[-1][0], v)
            else:
                ranges.append((v, v))
        return cls(tuple(ranges))

    @classmethod
    def parse(cls, text: str) -> IndexSet:
        if not text:
            return cls(())
        values: list[int] = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            values.extend(range(int(lo), int(hi or lo) + 1))
        return cls.of(values)

    def __iter__(self) -> Iterator[int]:
        for lo, hi in self.ranges:
            yield from range(lo, hi + 1)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges)

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and any(lo <= value <= hi for lo, hi in self.ranges)

    def __str__(self) -> str:
        return ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)

    def braces(self) -> str:
        """Human form used in listings: ``{0..2,4..6}``."""
        return "{" + ",".join(f"{lo}" if lo == hi else f"{lo}..{hi}" for lo, hi in self.ranges) + "}"


# ---------------------------------------------------------------------------------------------------------
# Components: one generic, typed node for every family (declared in :mod:`mapgen.families`)
# ---------------------------------------------------------------------------------------------------------
Flag = bool | str
"""A layout fact (part of the layout fingerprint): ``output_gate``, ``orientation``, ``quant`` ..."""
Count = int | str
"""A dimension-like or provenance value (not in the fingerprint): ``num_experts``, ``orientation_source``."""


def _pairs(values: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, v) for k, v in (values or {}).items() if v is not None))


@dataclass(frozen=True)
class Component:
    """One matched family instance. Its fields have typed roles, so no consumer keeps a deny-list:

    * ``slots``: slot name -> checkpoint key (a suffix relative to the owner's root; ``{expert}`` inside a
      per-expert family) — the only strings that are keys;
    * ``flags``: layout facts that select rules and are part of the fingerprint;
    * ``counts``: dimensions and provenance that are neither keys nor part of the fingerprint;
    * ``children``: nested components (a MoE block's experts and shared expert).
    """

    family: str
    variant: str
    slots: tuple[tuple[str, str], ...] = ()
    flags: tuple[tuple[str, Flag], ...] = ()
    counts: tuple[tuple[str, Count], ...] = ()
    children: tuple[tuple[str, Component], ...] = ()

    @classmethod
    def make(
        cls,
        family: str,
        variant: str,
        slots: Mapping[str, str | None] | None = None,
        flags: Mapping[str, Flag | None] | None = None,
        counts: Mapping[str, Count | None] | None = None,
        children: Mapping[str, Component | None] | None = None,
    ) -> Component:
        """Build a component from mappings; ``None`` values (absent optional slots) are dropped."""
        return cls(family, variant, _pairs(slots), _pairs(flags), _pairs(counts), _pairs(children))

    def with_slots(self, **changes: str | None) -> Component:
        """A copy with slots replaced (``None`` removes one)."""
        slots = dict(self.slots) | changes
        return dataclasses.replace(self, slots=_pairs(slots))

    def key(self, slot: str) -> str | None:
        return next((v for k, v in self.slots if k == slot), None)

    def flag(self, name: str, default: Flag = False) -> Flag:
        return next((v for k, v in self.flags if k == name), default)

    def count(self, name: str, default: Count = 0) -> Count:
        return next((v for k, v in self.counts if k == name), default)

    def child(self, name: str) -> Component | None:
        return next((v for k, v in self.children if k == name), None)

    def own_keys(self) -> list[str]:
        return [v for _, v in self.slots]

    def all_keys(self) -> Iterator[str]:
        """Every key suffix of this component and its children."""
        yield from self.own_keys()
        for _, child in self.children:
            yield from child.all_keys()


@dataclass(frozen=True)
class LayerGroup:
    """Decoder layers sharing one signature: the block's norms, a mixer and an MLP (families, variants, key
    names, storage)."""

    name: str
    root: str
    layers: IndexSet
    block: Component
    mixer: Component
    mlp: Component

    @property
    def components(self) -> tuple[Component, Component, Component]:
        return (self.block, self.mixer, self.mlp)


@dataclass(frozen=True)
class MTP:
    """Multi-token prediction (schemes in :mod:`mapgen.families.mtp`).

    ``parts`` holds the MTP-level tensors (slots ``enorm``, ``hnorm``, ``eh_proj``, ``final_norm`` and the
    ``embed_copy``/``head_copy`` duplicates; flags ``shared`` and ``eh_proj_order``). Its slots are suffixes
    relative to ``root`` unless ``shared``, in which case they are full keys stored once for all depths.
    ``inner`` are the inner layers, their ``{layer}`` running over depths (+ ``index_offset`` for
    DeepSeek-style extra decoder layers, whose HF index is ``num_hidden_layers + depth``).
    """

    scheme: MtpScheme
    depth: int
    root: str
    parts: Component
    inner: tuple[LayerGroup, ...]
    index_offset: int = 0

    @property
    def shared(self) -> bool:
        return bool(self.parts.flag("shared"))


@dataclass(frozen=True)
class Tower:
    """A non-language component (vision, audio): reported, carried through exports unchanged."""

    name: str
    prefix: str
    num_keys: int
    patterns: tuple[str, ...]


@dataclass(frozen=True)
class LanguageModel:
    """The language model under ``prefix``: ``top`` holds the full keys of the embedding, the final norm and
    the output layer (absent when tied)."""

    prefix: str
    top: Component
    groups: tuple[LayerGroup, ...]
    num_layers: int
    mtp: MTP | None = None

    @property
    def embedding(self) -> str:
        return self.top.key("embedding") or ""

    @property
    def final_norm(self) -> str:
        return self.top.key("final_norm") or ""

    @property
    def lm_head(self) -> str | None:
        return self.top.key("lm_head")

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head is None


@dataclass(frozen=True)
class Dims:
    """Dimensions read from the config (never part of the layout fingerprint)."""

    hidden_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    vocab_size: int = 0
    num_experts_per_tok: int = 0


@dataclass(frozen=True)
class UnclassifiedGroup:
    pattern: str
    count: int


@dataclass(frozen=True)
class Summary:
    """The stable contract that scripts rely on (``mapgen scan --json``)."""

    model_type: str
    num_layers: int
    attention: tuple[tuple[str, int], ...]
    moe_layers: int
    num_experts: int
    expert_layout: ExpertLayout
    shared_experts: bool
    mtp_depth: int
    mtp_scheme: MtpScheme
    mtp_expert_layout: ExpertLayout
    tied_embeddings: bool
    unclassified_keys: int
    towers: tuple[str, ...] = ()
    layer_pattern: str = ""
    mtp_declared: int = 0


@dataclass(frozen=True)
class DiagnosticRecord:
    severity: str
    code: str
    message: str
    key: str = ""


@dataclass(frozen=True)
class Layout:
    """The whole IR of one checkpoint."""

    model_type: str
    text_model_type: str
    architectures: tuple[str, ...]
    language_model: LanguageModel
    dims: Dims
    summary: Summary
    towers: tuple[Tower, ...] = ()
    unclassified: tuple[UnclassifiedGroup, ...] = ()
    diagnostics: tuple[DiagnosticRecord, ...] = ()
    quantization: str = "none"
    # The parsed config.json (canonical: compared and hashed as sorted JSON). Dimensions live here; it is
    # excluded from the layout fingerprint. It makes a stored layout self-contained for offline proofs.
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # The config catalog's verdict per config key (``mapgen.catalog``); set by ``mapgen scan``, omitted from the
    # JSON when None, never part of the fingerprint.
    config_fields: dict[str, Any] | None = field(default=None, compare=False, hash=False,
                                                 metadata={"omit_if_none": True})
    schema_version: int = SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------------------
# JSON round trip
# ---------------------------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """An IR value as plain JSON data. A component's slots, flags, counts and children become objects."""
    if isinstance(obj, IndexSet):
        return str(obj)
    if isinstance(obj, Component):
        return {
            "family": obj.family,
            "variant": obj.variant,
            "slots": dict(obj.slots),
            "flags": dict(obj.flags),
            "counts": dict(obj.counts),
            "children": {k: to_jsonable(v) for k, v in obj.children},
        }
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_if_none") and getattr(obj, f.name) is None)}
    if isinstance(obj, tuple | list):
        return [to_jsonable(v) for v in obj]
    return obj


def _component(data: Mapping[str, Any]) -> Component:
    return Component(
        family=str(data["family"]),
        variant=str(data["variant"]),
        slots=_pairs({str(k): str(v) for k, v in data.get("slots", {}).items()}),
        flags=_pairs(data.get("flags")),
        counts=_pairs(data.get("counts")),
        children=_pairs({str(k): _component(v) for k, v in data.get("children", {}).items()}),
    )


def _from(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is IndexSet:
        return IndexSet.parse(data)
    if tp is Component:
        return _component(data)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if data is None else _from(args[0], data)
    if origin is tuple:
        targs = typing.get_args(tp)
        if len(targs) == 2 and targs[1] is Ellipsis:
            return tuple(_from(targs[0], v) for v in data)
        return tuple(_from(a, v) for a, v in zip(targs, data, strict=True))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in data:
                kwargs[f.name] = _from(hints[f.name], data[f.name])
        return tp(**kwargs)
    return data


# ---------------------------------------------------------------------------------------------------------
# Schema version 1 (one dataclass per family) -> 2 (generic components), so old ``scan --json`` files load
# ---------------------------------------------------------------------------------------------------------
_V1_FLAGS = {"output_gate", "sliding_window", "layout", "orientation", "gate_up_interleave", "quant"}
_V1_COUNTS = {"num_experts", "orientation_source"}
_V1_FAMILY = {"Attention": "attention", "GatedDeltaNet": "gated_delta_net", "MLA": "mla", "DenseMLP": "dense_mlp",
              "MoE": "moe"}


def _v1_variant(family: str, node: Mapping[str, Any]) -> str:
    if family == "attention":
        return "fused" if node.get("qkv") else "separate"
    if family == "gated_delta_net":
        return "fused" if node.get("in_proj_qkvz") else "split"
    if family == "mla":
        return "q_low_rank" if node.get("q_a_proj") else "q_full_rank"
    if family == "dense_mlp":
        return "fused" if node.get("gate_up") else "separate"
    return "routed"


def _v1_component(family: str, node: Mapping[str, Any]) -> dict[str, Any]:
    slots: dict[str, str] = {}
    flags: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    children: dict[str, Any] = {}
    for name, value in node.items():
        if name == "node" or value is None:
            continue
        if name == "experts":
            variant = value["layout"] if value.get("quant", "none") == "none" else "packed_mxfp4"
            children["experts"] = _v1_component("experts", value) | {"variant": variant}
        elif name == "shared":
            children["shared"] = _v1_component("shared_expert", {"gate": value.get("gate")}) | {"variant": "shared"}
            children["shared"]["children"] = {"mlp": _v1_component("dense_mlp", value["mlp"])}
        elif name in _V1_FLAGS:
            flags[name] = value
        elif name in _V1_COUNTS:
            counts[name] = value
        else:
            slots[name] = value
    if family == "experts" and flags.get("quant") == "mxfp4":  # v1 stored the blocks in the plain slots
        slots["gate_up_blocks"], slots["down_blocks"] = slots.pop("gate_up"), slots.pop("down")
    return {"family": family, "variant": _v1_variant(family, node), "slots": slots, "flags": flags,
            "counts": counts, "children": children}


def _v1_group(g: Mapping[str, Any]) -> dict[str, Any]:
    mixer, mlp = g["mixer"], g["mlp"]
    return {
        "name": g["name"], "root": g["root"], "layers": g["layers"],
        "block": {"family": "norms", "variant": "pre_norm", "flags": {}, "counts": {}, "children": {},
                  "slots": {"input_norm": g["input_norm"], "post_attention_norm": g["post_attention_norm"]}},
        "mixer": _v1_component(_V1_FAMILY[mixer["node"]], mixer),
        "mlp": _v1_component(_V1_FAMILY[mlp["node"]], mlp),
    }


def upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 layout (JSON data) as schema 2; every key, flag and count is kept."""
    lm = dict(data["language_model"])
    top_slots = {"embedding": lm.pop("embedding"), "final_norm": lm.pop("final_norm"), "lm_head": lm.pop("lm_head")}
    tied = lm.pop("tied_embeddings")
    lm["top"] = {"family": "embedding", "variant": "tied" if tied else "untied", "flags": {}, "counts": {},
                 "children": {}, "slots": {k: v for k, v in top_slots.items() if v is not None}}
    lm["groups"] = [_v1_group(g) for g in lm["groups"]]
    if lm.get("mtp") is not None:
        m = dict(lm["mtp"])
        slots = {k: m.pop(k) for k in ("enorm", "hnorm", "eh_proj", "final_norm", "embed_copy", "head_copy")}
        m["parts"] = {"family": "mtp", "variant": m["scheme"], "counts": {}, "children": {},
                      "slots": {k: v for k, v in slots.items() if v is not None},
                      "flags": {"shared": m.pop("shared"), "eh_proj_order": m.pop("eh_proj_order")}}
        m["inner"] = [_v1_group(g) for g in m["inner"]]
        lm["mtp"] = m
    return {**data, "language_model": lm, "schema_version": 2}


def layout_to_json(layout: Layout) -> str:
    """Sorted, indented JSON with a trailing newline: byte-for-byte deterministic."""
    return json.dumps(to_jsonable(layout), indent=2, sort_keys=True) + "\n"


def layout_from_json(text: str) -> Layout:
    data = json.loads(text)
    version = data.get("schema_version")
    if version == 1 and isinstance(data.get("language_model"), dict):
        data, version = upgrade_v1(data), 2
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"layout JSON has schema_version {version!r}; this mapgen reads {SCHEMA_VERSION}. "
            "Re-run `mapgen scan` with this version."
        )
    layout = _from(Layout, data)
    assert isinstance(layout, Layout)
    return layout
