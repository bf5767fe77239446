"""The config catalog: every ``config.json`` key is mapped (to the Megatron ``ModelSpec`` field it feeds), inert,
or refused with a reason; unknown keys, invalid values and out-of-scope checkpoints are errors.

``check_config(config, assume_inert=..., accept_gaps=...) -> ConfigReport`` is pure (no torch, no transformers:
``mapgen scan`` stays fast). The rows live in :mod:`mapgen.catalog.fields`, model-type facts and scope in
:mod:`mapgen.catalog.model_types`, transformers' defaults for absent keys in ``defaults.json``
(regenerate with ``.venv/bin/python -m tests.regen_catalog_defaults``).
"""

from __future__ import annotations

from mapgen.catalog.check import (
    ConfigReport,
    FieldVerdict,
    catalog_size,
    check_config,
    defaults_for,
    transformers_defaults,
)
from mapgen.catalog.fields import BRIDGE_READS, NESTED, TOP, bridge_value
from mapgen.catalog.model_types import FACTS, scope_problem

__all__ = [
    "BRIDGE_READS",
    "FACTS",
    "NESTED",
    "TOP",
    "ConfigReport",
    "FieldVerdict",
    "bridge_value",
    "catalog_size",
    "check_config",
    "defaults_for",
    "scope_problem",
    "transformers_defaults",
]
