"""Evaluating a plan's config recipe in Python.

A generated module's ``megatron_config`` is a rendering of the same :class:`ConfigField` list; the proof
runs before the module exists, so it evaluates the recipe here. A test checks that every generated module
and this evaluator agree on every stored input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mapgen.contract.bridge import layer_kinds, mlp_kinds, mtp_depth, mtp_layer_kind, mtp_mlp_kind
from mapgen.contract.hf_config import HFConfig, head_dim, rope_scaling, rope_scaling_factor
from mapgen.contract.spec import ModelSpec
from mapgen.infer.ir import Layout
from mapgen.plan.plan import BridgePlan, ConfigField


def evaluate_field(field: ConfigField, hf: HFConfig, layout: Layout) -> Any:
    if field.expr == "const":
        return field.default
    if field.expr == "config":
        if field.has_default:
            return hf.get(*field.names, default=field.default)
        return hf.get(*field.names)
    derived: dict[str, Callable[[], Any]] = {
        "head_dim": lambda: head_dim(hf),
        "rope_scaling": lambda: rope_scaling(hf),
        "rope_scaling_factor": lambda: rope_scaling_factor(hf),
        "layer_kinds": lambda: layer_kinds(layout),
        "mlp_kinds": lambda: mlp_kinds(layout),
        "mtp_depth": lambda: mtp_depth(layout),
        "mtp_layer_kind": lambda: mtp_layer_kind(layout),
        "mtp_mlp_kind": lambda: mtp_mlp_kind(layout),
    }
    return derived[field.expr]()


def model_spec_for_plan(plan: BridgePlan, hf: HFConfig, layout: Layout) -> ModelSpec:
    return ModelSpec(**{f.field: evaluate_field(f, hf, layout) for f in plan.config})
