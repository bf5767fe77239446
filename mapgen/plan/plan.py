"""The output of planning: everything a generated bridge module contains, as data.

``plan(layout) -> BridgePlan`` (``mapgen.plan.planner``) turns a scanned :class:`~mapgen.infer.ir.Layout` into
the Megatron model config recipe and the ordered mapping rules; ``mapgen.emit`` renders a BridgePlan to
Python source; the runtime executes the rendered module. The plan holds no dimensions: checkpoints with
the same layout fingerprint share one plan and one module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mapgen.contract.rules import Rule

ConfigExpr = Literal[
    "const",  # value: a Python literal (bool/int/float/str/None)
    "config",  # names: HF config keys tried in order (``text_config`` is searched first); default optional
    "rope_scaling",  # whether the config asks for Llama-3 RoPE scaling (other scalings are refused)
    "rope_scaling_factor",  # its factor (8.0 when absent)
    "head_dim",  # ``head_dim`` from the config, else hidden_size // num_attention_heads
    "layer_kinds",  # per-layer mixer kinds from the scanned layout's decoder groups
    "mlp_kinds",  # per-layer MLP kinds from the scanned layout's decoder groups
    "mtp_depth",  # MTP depth from the scanned layout (0 -> None)
    "mtp_layer_kind",  # the MTP inner layer's mixer kind from the scanned layout
    "mtp_mlp_kind",  # the MTP inner layer's MLP kind from the scanned layout
]


@dataclass(frozen=True)
class ConfigField:
    """One ``ModelSpec`` field and how the bridge computes it from the HF config / scanned layout.

    ``expr == "config"``: ``names`` are tried in order; if none is present, ``default`` is used when
    ``has_default`` (else the runtime reports the missing key). ``expr == "const"``: ``default`` is the value.
    """

    field: str
    expr: ConfigExpr
    names: tuple[str, ...] = ()
    default: bool | int | float | str | None = None
    has_default: bool = False
    comment: str = ""


@dataclass(frozen=True)
class BridgePlan:
    """A bridge: identity (fingerprint), provenance, config recipe and rules."""

    fingerprint: str  # short hex digest of the layout with dimensions removed
    module_name: str  # validated Python identifier, e.g. ``qwen3_5_moe_3f2a9c1d``
    model_type: str
    description: tuple[str, ...]  # human lines for the module docstring (already plain text)
    config: tuple[ConfigField, ...]
    rules: tuple[Rule, ...]
