"""The output of planning: everything a generated bridge contains, as data.

``plan(layout) -> BridgePlan`` (``mapgen.plan.planner``) turns a scanned :class:`~mapgen.ir.Layout` into
the facts the layout decides about the Megatron model and the ordered mapping rules; ``mapgen.emit`` renders
BridgePlans to Python source; the runtime executes the rendered bridges. The plan holds no dimensions:
checkpoints with the same layout fingerprint share one plan and one bridge. The Megatron config itself is the
contract's table (:mod:`mapgen.contract.config`) evaluated on a checkpoint's config.json and these facts.
"""

from __future__ import annotations

from dataclasses import dataclass

from mapgen.contract.config import Facts
from mapgen.contract.rules import Rule


@dataclass(frozen=True)
class BridgePlan:
    """A bridge: identity (fingerprint), provenance, layout-decided facts and rules."""

    fingerprint: str  # short hex digest of the layout with dimensions removed
    module_name: str  # the model type's module, a validated Python identifier, e.g. ``qwen3_5_moe``
    model_type: str
    description: tuple[str, ...]  # human lines for the module docstring (already plain text)
    facts: Facts
    rules: tuple[Rule, ...]
