"""Mapping rules: the contract between the planner, the generated bridges and the runtime.

A :class:`Rule` maps one Megatron parameter *pattern* to the HF key pattern(s) it is made from, through one
runtime primitive (``op``) whose sharding is declared (``sharding``), never guessed from shapes.

Placeholders
------------
``{layer}``  a decoder layer (HF index == Megatron global index) or, for ``domain`` ``mtp:*``, an MTP depth.
``{hf_layer}`` the HF index of that layer when it differs (DeepSeek extra-layer MTP: ``num_layers + depth``).
``{expert}`` a *global* expert id. The runtime maps it to/from Megatron's rank-local expert index.
``{mtp_inner}`` Megatron's name for the MTP block's inner transformer layer; its spelling depends on the
             megatron-core version (``transformer_layer`` in 0.16, ``mtp_model_layer`` later) and is
             resolved by the runtime from the installed megatron-core.

Megatron names are written in the *global, unsharded* namespace of the local (non Transformer Engine)
layer spec: the names of a model built at TP=EP=PP=1, which is exactly what the bijection proof enumerates.
The runtime translates rank-local names (pipeline layer offsets, expert-parallel local indices) and the
Transformer Engine spellings (``linear_qkv.layer_norm_weight``, grouped ``experts.linear_fc1.weight<e>``)
to and from this namespace.

Domains
-------
``global``            one instance (embedding, final norm, output layer).
``decoder:<group>``   ``{layer}`` ranges over the layer group's index set (from the scanned layout).
``mtp``               ``{layer}`` ranges over MTP depths (MTP-level tensors).
``mtp:<group>``       ``{layer}`` ranges over the depths of that MTP inner layer group.
``experts`` is true when ``{expert}`` ranges over the experts of the layer's MoE block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Op = Literal[
    "copy",  # 1:1 tensor (with optional transform)
    "qkv",  # q/k/v (+ output gate in q) <-> linear_qkv grouped per query group
    "gated_fc1",  # gate + up (or fused gate_up) <-> linear_fc1 as [gate_r; up_r] per TP rank
    "expert_fc1",  # per-expert or packed gate/up <-> local expert linear_fc1
    "expert_fc2",  # per-expert or packed down <-> local expert linear_fc2
    "gdn_in_proj",  # in_proj_qkv/z/b/a <-> fused in_proj, per-TP-rank [q_r k_r v_r z_r b_r a_r]
    "gdn_conv1d",  # conv1d over [q k v] channels <-> per-TP-rank [q_r k_r v_r]
    "mtp_eh_proj",  # eh_proj with declared input order
    "duplicate",  # an HF tensor stored twice: consumed on import (checked equal), re-emitted on export
]

Sharding = Literal[
    "replicated",
    "column",  # split dim 0 across TP
    "row",  # split dim 1 across TP
    "vocab",  # split dim 0 across TP with Megatron's vocab padding
    "qkv_groups",  # whole query groups per TP rank
    "gated_column",  # gate and up halves each split dim 0 across TP
    "expert_column",  # per expert, dim 0 across ETP
    "expert_gated_column",  # per expert, gate and up halves split across ETP
    "expert_row",  # per expert, dim 1 across ETP
    "gdn_heads",  # GDN components split by key/value heads across TP
]


@dataclass(frozen=True)
class Rule:
    """One mapping rule. ``options`` are primitive parameters as sorted ``(name, value)`` pairs.

    ``family`` and ``comment`` are the planner's labels for reports (``SUPPORTED.md``, diagnostics); they are
    not part of what a rule means, so rules compare without them and generated bridges do not carry them.
    """

    family: str = field(compare=False)
    megatron: str
    hf: tuple[str, ...]
    op: Op
    sharding: Sharding
    domain: str = "global"
    experts: bool = False
    options: tuple[tuple[str, str | int | bool], ...] = ()
    comment: str = field(default="", compare=False)

    def option(self, name: str, default: str | int | bool | None = None) -> str | int | bool | None:
        for key, value in self.options:
            if key == name:
                return value
        return default
