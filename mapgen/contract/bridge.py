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
from mapgen.contract.table import Group, flatten
from mapgen.ir import Layout

__all__ = ["Bridge"]


@dataclass(frozen=True)
class Bridge:
    """A generated bridge: the layout fingerprint it serves, the facts its layout decides about the Megatron
    model, and its rules as tables (:class:`~mapgen.contract.table.Group`)."""

    fingerprint: str
    model_type: str
    facts: Facts
    groups: tuple[Group, ...]

    @cached_property
    def rules(self) -> tuple[Rule, ...]:
        """The flat rules, in order: what the proof checked and what the runtime executes."""
        return flatten(self.groups)

    def megatron_config(self, hf: HFConfig, layout: Layout) -> ModelSpec:
        """The Megatron model for a checkpoint with this layout: the config table
        (:data:`mapgen.contract.config.CONFIG`) evaluated on its config.json and this bridge's facts."""
        return model_spec(hf, layout, self.facts)
