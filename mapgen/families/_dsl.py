"""The declaration language of layer families: small, typed, data first.

A :class:`Family` declares what mapgen knows about one kind of layer component in one place:

* ``roots``: the module prefixes it lives under inside a decoder layer (``self_attn.``, ``mlp.``), aliases in
  order of preference;
* ``slots``: every HF tensor it may consume, each with its spellings (aliases; the first is canonical),
  relative to the root. A slot's name is the field of the IR node that stores the key it matched;
* ``variants``: which slot sets form a complete component (required slots, optional slots);
* ``excludes``: spellings whose presence means the keys belong to another family (MLA's
  ``kv_a_proj_with_mqa`` keeps the attention family away);
* ``flags``: the names of the IR node's *layout facts* (decided by shapes, config or model-type facts;
  part of the layout fingerprint, never checkpoint keys), and ``counts``: the node's dimension-like fields
  (expert counts: not in the fingerprint, not keys).

The typed roles replace the private deny-lists each consumer used to keep: a field of a family's IR node is a
slot, a flag, a count or a child component, and :func:`field_roles` says which.

Behaviour that data cannot express (how a node's flags follow from shapes, the rules a node plans into, its
shapes) is written as plain functions *in the family's module*, next to its declaration, and reached through
:mod:`mapgen.families` — never through an ``isinstance`` switch elsewhere.

Declaration errors are raised at import time as :class:`DeclarationError` naming the family's file and slot.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

Init = Literal["normal", "norm", "a_log", "dt_bias"]

_IDENT = re.compile(r"[a-z_][a-z0-9_]*\Z")
_SPELLING = re.compile(r"[A-Za-z0-9_.{}]+\Z")


class DeclarationError(ValueError):
    """A family declaration is inconsistent (raised when the declaring module is imported)."""


@dataclass(frozen=True)
class Slot:
    """One HF tensor of a family. ``spellings`` are key suffixes relative to the family root; the first one
    is canonical (synth writes it), the others are aliases accepted by scan. ``init`` says how ``mapgen synth``
    fills it: ``normal`` (small Gaussian), ``norm`` (near 1), ``a_log``/``dt_bias`` (the gated delta-net's decay
    parameters, in their valid ranges)."""

    name: str
    spellings: tuple[str, ...]
    init: Init = "normal"

    def __post_init__(self) -> None:
        if not self.spellings:
            raise DeclarationError(f"slot {self.name!r} has no spelling")
        for s in self.spellings:
            if not _SPELLING.match(s) or s.startswith(".") or s.endswith("."):
                raise DeclarationError(f"slot {self.name!r}: spelling {s!r} is not a dotted key suffix")
        if len(set(self.spellings)) != len(self.spellings):
            raise DeclarationError(f"slot {self.name!r} lists a spelling twice")


@dataclass(frozen=True)
class Variant:
    """A complete component: every ``required`` slot present (under any spelling); ``optional`` slots are
    taken when present. Variants are tried in declaration order."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    """One layer family's declaration. ``role`` places it in a decoder layer (``mixer``, ``mlp``, ``block``,
    ``top``, ``mtp``, ``part`` for components that only occur inside another family)."""

    name: str
    role: str
    description: str
    file: str
    roots: tuple[str, ...] = ("",)
    slots: tuple[Slot, ...] = ()
    variants: tuple[Variant, ...] = ()
    excludes: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    counts: tuple[str, ...] = ()
    children: tuple[str, ...] = ()
    _by_name: dict[str, Slot] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"{self.file}: family {self.name!r}"
        if not _IDENT.match(self.name):
            raise DeclarationError(f"{where}: the name must be a lower-case identifier")
        for slot in self.slots:
            if not _IDENT.match(slot.name):
                raise DeclarationError(f"{where}: slot {slot.name!r} is not a lower-case identifier")
            if slot.name in self._by_name:
                raise DeclarationError(f"{where}: slot {slot.name!r} is declared twice")
            self._by_name[slot.name] = slot
        for variant in self.variants:
            for name in (*variant.required, *variant.optional):
                if name not in self._by_name:
                    raise DeclarationError(f"{where}: variant {variant.name!r} names unknown slot {name!r}")
        overlap = set(self.flags) & set(self._by_name) | set(self.counts) & set(self._by_name)
        if overlap:
            raise DeclarationError(f"{where}: {sorted(overlap)} declared both as slots and as flags/counts")
        for root in self.roots:
            if root and not root.endswith("."):
                raise DeclarationError(f"{where}: root {root!r} must end with '.'")

    def init_of(self, slot: str) -> Init:
        """How synth initialises ``slot`` (``normal`` for slots the family does not declare)."""
        found = self._by_name.get(slot)
        return found.init if found is not None else "normal"

    def slot(self, name: str) -> Slot:
        try:
            return self._by_name[name]
        except KeyError:
            raise DeclarationError(f"{self.file}: family {self.name!r} has no slot {name!r}") from None

    @property
    def slot_names(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def spellings(self) -> Iterator[tuple[str, str]]:
        """(slot name, full suffix under each root) for every accepted spelling."""
        for root in self.roots:
            for slot in self.slots:
                for s in slot.spellings:
                    yield slot.name, root + s


@dataclass(frozen=True)
class Match:
    """What :func:`mapgen.infer.match.match_family` found: the root, the variant and slot -> matched suffix."""

    family: Family
    root: str
    variant: Variant
    keys: dict[str, str]

    def get(self, slot: str) -> str | None:
        return self.keys.get(slot)


# ---------------------------------------------------------------------------------------------------------
# What a family module's behaviour hooks receive
# ---------------------------------------------------------------------------------------------------------
Shape = tuple[int, ...]
ShapePairs = list[tuple[str | None, Shape | None]]
"""(key suffix, shape) pairs a family's ``shapes`` hook returns; ``None`` suffixes/shapes are skipped."""


@dataclass(frozen=True)
class Dims:
    """The sizes the config gives (read by :func:`mapgen.plan.shapes.config_dims`)."""

    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int | None
    moe_intermediate: int | None
    shared_intermediate: int | None
    gdn: tuple[int, int, int, int, int] | None  # nk, nv, dk, dv, conv kernel
    mla: tuple[int | None, int, int, int, int] | None  # q_lora_rank, kv_lora_rank, nope, rope, v_head_dim
    positions: int | None = None  # max_position_embeddings / n_positions (learned position tables)


def conv1d_shapes(pairs: ShapePairs, conv1d: bool) -> ShapePairs:
    """``pairs`` as a GPT-2 ``Conv1D`` stores them: matrices ``[in, out]`` (vectors unchanged)."""
    if not conv1d:
        return pairs
    matrix = 2
    return [(key, shape[::-1] if shape is not None and len(shape) == matrix else shape) for key, shape in pairs]


Options = tuple[tuple[str, str | int | bool], ...]


def opts(**kw: str | int | bool) -> Options:
    """Rule options as sorted pairs."""
    return tuple(sorted(kw.items()))


class Planner(Protocol):
    """What a family's ``plan`` hook may call: add a rule (Megatron pattern, HF key patterns, op, declared
    sharding), refuse a feature by name (``unsupported``: mapgen has no rule yet; ``unbuildable``: megatron-core
    cannot build it)."""

    zero_centered: bool
    layernorm: bool
    plain_up_down: bool
    qk_norm_after_rope: bool
    router: str  # the model type's router scheme (mapgen.contract.routing), "" when not known

    def add(self, family: str, megatron: str, hf: tuple[str, ...], op: str, sharding: str, *, domain: str,
            experts: bool = False, options: Options = (), comment: str = "") -> None: ...

    def unsupported(self, what: str, key: str) -> None: ...

    def unbuildable(self, what: str, key: str) -> None: ...
