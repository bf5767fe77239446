"""What the planner, the runtime and the generated bridges share; imports nothing above it.

Only :mod:`mapgen.ir` (the IR, a leaf) and :mod:`mapgen.errors` are imported from the rest of mapgen,
and nothing here imports torch or megatron-core. Generated bridge modules import only this package.

* :mod:`~mapgen.contract.rules`       ``Rule`` (one Megatron parameter pattern <- HF key patterns, op, sharding)
* :mod:`~mapgen.contract.table`       what bridges are written in: typed op constructors, rows, ``Group``
* :mod:`~mapgen.contract.spec`        ``ModelSpec`` (the Megatron model a bridge targets, as plain data)
* :mod:`~mapgen.contract.hf_config`   ``HFConfig`` (a read-only ``config.json`` view) and derived values
* :mod:`~mapgen.contract.config`      the HF config -> ``ModelSpec`` table and the layout-decided ``Facts``
* :mod:`~mapgen.contract.bridge`      ``Bridge``
* :mod:`~mapgen.contract.expand`      rule instances (what the proof checks is what the runtime runs)
* :mod:`~mapgen.contract.fingerprint` the layout fingerprint that selects a bridge
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mapgen.contract.bridge import Bridge
    from mapgen.contract.config import Facts
    from mapgen.contract.hf_config import HFConfig
    from mapgen.contract.rules import Rule
    from mapgen.contract.spec import ModelSpec
    from mapgen.contract.table import (
        Group,
        OpSpec,
        copy,
        duplicate,
        experts_fc1,
        experts_fc2,
        gated_fc1,
        gdn_conv1d,
        gdn_in_proj,
        mtp_eh_proj,
        op,
        qkv,
    )
    from mapgen.ir import Layout

__all__ = [
    "Bridge",
    "Facts",
    "Group",
    "HFConfig",
    "Layout",
    "ModelSpec",
    "OpSpec",
    "Rule",
    "copy",
    "duplicate",
    "experts_fc1",
    "experts_fc2",
    "gated_fc1",
    "gdn_conv1d",
    "gdn_in_proj",
    "mtp_eh_proj",
    "op",
    "qkv",
]

# Where each name above lives. Imported on first use (PEP 562), so a module that needs one submodule (scan's
# config catalog reads hf_config and routing) does not build the ModelSpec, rule and table dataclasses too.
_HOME = {
    "Bridge": "mapgen.contract.bridge",
    "Facts": "mapgen.contract.config",
    "HFConfig": "mapgen.contract.hf_config",
    "Rule": "mapgen.contract.rules",
    "ModelSpec": "mapgen.contract.spec",
    "Layout": "mapgen.ir",
    **dict.fromkeys(("Group", "OpSpec", "copy", "duplicate", "experts_fc1", "experts_fc2", "gated_fc1", "gdn_conv1d",
                     "gdn_in_proj", "mtp_eh_proj", "op", "qkv"), "mapgen.contract.table"),
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value
