"""Layer families: THE extension point. One module per family, data first (see :mod:`mapgen.families._dsl`).

``FAMILIES`` is the ordered registry, and the only list of families: scan tries mixers and MLPs in this order
(the gated delta-net and MLA before plain attention, MoE before a dense MLP under the same root).
``MODEL_TYPES`` holds the facts config.json does not state; ``SCHEMES`` the MTP storage schemes.

Adding a spelling of a known tensor is one string in its family's ``Slot``; adding a family is one module here
(+ an op in :mod:`mapgen.ops` when no existing op fits) + one registry line + one golden case.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Protocol

from mapgen.families import attention, dense_mlp, gated_delta_net, mamba, mla, moe
from mapgen.families._dsl import DeclarationError, Dims, Family, Match, Planner, ShapePairs, Slot, Variant
from mapgen.families.attention import ATTENTION
from mapgen.families.dense_mlp import DENSE_MLP
from mapgen.families.embedding import EMBEDDING
from mapgen.families.gated_delta_net import GATED_DELTA_NET
from mapgen.families.mamba import MAMBA
from mapgen.families.mla import MLA
from mapgen.families.model_types import MODEL_TYPES, Facts, facts_for
from mapgen.families.moe import EXPERTS, MOE, SHARED_EXPERT
from mapgen.families.mtp import SCHEMES, MtpScheme
from mapgen.families.norms import NORMS
from mapgen.ir import Component

__all__ = [
    "FAMILIES",
    "MODEL_TYPES",
    "SCHEMES",
    "DeclarationError",
    "Dims",
    "Facts",
    "Family",
    "LayerFamily",
    "Match",
    "MtpScheme",
    "Slot",
    "Variant",
    "behaviour",
    "by_name",
    "facts_for",
    "input_norm_target",
    "of_role",
    "spelling_table",
    "suggest",
]

FAMILIES: tuple[Family, ...] = (
    EMBEDDING,
    NORMS,
    GATED_DELTA_NET,
    MAMBA,
    MLA,
    ATTENTION,
    MOE,
    EXPERTS,
    SHARED_EXPERT,
    DENSE_MLP,
)

_BY_NAME = {f.name: f for f in FAMILIES}
if len(_BY_NAME) != len(FAMILIES):
    raise DeclarationError("mapgen.families: two families share a name")


def by_name(name: str) -> Family:
    return _BY_NAME[name]


def of_role(role: str) -> tuple[Family, ...]:
    return tuple(f for f in FAMILIES if f.role == role)


def spelling_table() -> Iterator[tuple[str, str, str, str]]:
    """(family, root, slot, spelling) for every spelling scan accepts, in registry order."""
    for family in FAMILIES:
        for root in family.roots:
            for slot in family.slots:
                for spelling in slot.spellings:
                    yield family.name, root, slot.name, spelling
    for scheme in SCHEMES:
        for name in ("enorm", "hnorm", "eh_proj", "final_norm"):
            yield f"mtp:{scheme.name}", "", name, str(getattr(scheme, name))
        for copy in scheme.copies:
            yield f"mtp:{scheme.name}", "", "copy", copy


def suggest(suffix: str, limit: int = 3) -> list[str]:
    """Known spellings (root + slot spelling) closest to an unclassified key suffix: scan's "did you mean"."""
    known = sorted({root + spelling for _, root, _, spelling in spelling_table()})
    return difflib.get_close_matches(suffix, known, n=limit, cutoff=0.75)


class LayerFamily(Protocol):
    """The behaviour a mixer or MLP family module defines beside its declaration."""

    def kind(self, c: Component) -> str: ...

    def facts(self, c: Component) -> dict[str, bool]: ...

    def describe(self, c: Component) -> str: ...

    def shapes(self, c: Component, d: Dims) -> ShapePairs: ...

    def plan(self, c: Component, p: Planner, mroot: str, hroot: str, domain: str, name: str) -> None: ...


_BEHAVIOUR: dict[str, LayerFamily] = {
    "gated_delta_net": gated_delta_net,
    "mamba": mamba,
    "mla": mla,
    "attention": attention,
    "moe": moe,
    "dense_mlp": dense_mlp,
}
_INPUT_NORM = {"gated_delta_net": gated_delta_net.INPUT_NORM, "mla": mla.INPUT_NORM, "attention": attention.INPUT_NORM,
               "mamba": mamba.INPUT_NORM}


def behaviour(c: Component) -> LayerFamily:
    """The module that implements a layer component's family."""
    try:
        return _BEHAVIOUR[c.family]
    except KeyError:
        raise DeclarationError(f"no family module implements {c.family!r} (mapgen.families)") from None


def input_norm_target(mixer: Component) -> str:
    """Megatron's name for the block's pre-mixer norm with this mixer."""
    return _INPUT_NORM[mixer.family]
