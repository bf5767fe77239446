"""What a generated bridge is, at run time.

Importing it must stay cheap (no torch, no megatron-core): registry look-ups and ``mapgen scan`` never pay
for a framework import.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from mapgen.contract.config import Facts, model_spec
from mapgen.contract.hf_config import HFConfig
from mapgen.contract.rules import Rule
from mapgen.contract.spec import ModelSpec
from mapgen.contract.table import Group, flatten, op
from mapgen.ir import Layout

__all__ = ["NO_REFERENCE", "PARITY", "Bridge"]

# The two kinds of numerical-proof line ``mapgen emit`` records for an input (proofs.json, module headers,
# ``Bridge.numerics``): parity with transformers on the input's tiny twin, or why there is none.
PARITY = "logits parity vs transformers"
NO_REFERENCE = "no reference model: names and shapes proven, numerics not"


@dataclass(frozen=True)
class Bridge:
    """A generated bridge: the layout fingerprint it serves, the facts its layout decides about the Megatron
    model, and its rules as tables (:class:`~mapgen.contract.table.Group`). ``numerics`` is the numerical
    proof ``mapgen emit`` recorded for it (:data:`PARITY` ... or :data:`NO_REFERENCE` ...; empty for a
    bridge emitted before numerical proofs existed)."""

    fingerprint: str
    model_type: str
    facts: Facts
    groups: tuple[Group, ...]
    numerics: str = ""

    @classmethod
    def from_rules(cls, fingerprint: str, model_type: str, facts: Facts, rules: tuple[Rule, ...]) -> Bridge:
        """The bridge a plan renders to, built in memory (one group per rule: ``rules`` come back unchanged)."""
        groups = tuple(
            Group(r.domain, "", "", ((r.megatron, r.hf[0] if len(r.hf) == 1 else r.hf,
                                      op(r.op, r.sharding, experts=r.experts, options=r.options)),))
            for r in rules
        )
        return cls(fingerprint, model_type, facts, groups)

    @property
    def numerically_proven(self) -> bool:
        """True when emit proved logits parity with transformers on a twin of this layout."""
        return self.numerics.startswith(PARITY)

    @cached_property
    def rules(self) -> tuple[Rule, ...]:
        """The flat rules, in order: what the proof checked and what the runtime executes."""
        return flatten(self.groups)

    def megatron_config(self, hf: HFConfig, layout: Layout) -> ModelSpec:
        """The Megatron model for a checkpoint with this layout: the config table
        (:data:`mapgen.contract.config.CONFIG`) evaluated on its config.json and this bridge's facts."""
        return model_spec(hf, layout, self.facts)
