"""Conversion ops: pure tensor code that turns HF tensors into one rank's Megatron tensor and back.

Each ``Rule.op`` is one :class:`Op` subclass in one file of this package, holding everything about it: its
option schema (a frozen dataclass), the shardings it implements (the sharding a rule *declares*, never
guessed from shapes), how many HF keys it takes, ``load`` and beside it its inverse ``save``, and the
component sizes along the sharded dimension from which ``split``/``gather`` follow. :data:`OPS` is the
only list of ops. No ``torch.distributed``, no file I/O, no megatron-core (see :mod:`mapgen.ops._base`).

========================  ==================================================================================
``copy``, ``duplicate``   :mod:`mapgen.ops.copy`: one tensor, column/row/vocab/replicated (+ expert) sharding
``qkv``                   :mod:`mapgen.ops.qkv`: q/k/v (+ output gate) <-> ``linear_qkv`` per query group
``gated_fc1``             :mod:`mapgen.ops.gated_fc1`: gate + up (or fused) <-> ``linear_fc1`` ``[gate_r; up_r]``
``expert_fc1/2``          :mod:`mapgen.ops.experts`: per-expert or packed expert MLPs
``gdn_in_proj/conv1d``    :mod:`mapgen.ops.gdn`: gated delta net in_proj and conv1d, by key heads
``mtp_eh_proj``           :mod:`mapgen.ops.eh_proj`: MTP ``eh_proj`` with its declared input order
========================  ==================================================================================

Public API
----------
``load(rule, keys, spec, shard, reader, expert=None) -> Tensor``
    This rank's local Megatron tensor. Reads only what ``shard`` owns (rows for column-parallel, columns
    for row-parallel, whole query groups / key heads, ``packed[expert]`` for packed experts).
``save(rule, keys, spec, full, expert=None) -> list[Fragment]``
    The *full* Megatron tensor back to HF tensors. ``full`` is the parameter as a TP=1 model holds it
    (which is also the global tensor megatron-core's ``sharded_state_dict`` declares); :func:`gather`
    builds it from the per-rank tensors.
``shard_dim(rule) -> int | None``, ``gather(rule, spec, shards) -> Tensor``, ``split(rule, spec, full,
shard) -> Tensor``
    The dimension ranks are concatenated along (``None``: replicated), rank tensors -> full tensor, and
    its inverse. ``split(full, shard) == load(..., shard)`` and ``gather([load(r) for r]) == load(TP=1)``.
``padded_vocab(vocab, tp, divisible_by=128) -> int``
    Megatron's padded vocabulary size.

``keys`` are the concrete HF keys in the rule's declared order; ``shard`` is the TP coordinate for dense
rules and the expert-TP (ETP) coordinate for expert rules; ``expert`` is the *global* expert id, required
exactly when ``rule.experts``. Violated preconditions raise :class:`PrimitiveError` (a ``ValueError``)
naming the Megatron parameter.

Adding an op
------------
One new file here with an :class:`Op` subclass (its options dataclass, shardings, ``key_count``, ``load``
beside ``save``, ``components`` if the sharded dimension has several components) and one line in
:data:`OPS`. While ``Rule.op`` (:mod:`mapgen.contract.rules`) is a ``Literal``, the name goes there too;
``tests/ops/test_registry.py`` checks that the two agree and ``tests/ops/test_inverse.py`` asks for an example
of every (op, sharding) to check that load/save/split/gather are mutually inverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mapgen.contract.rules import Rule
from mapgen.contract.spec import ModelSpec
from mapgen.ops._base import (
    DictReader,
    Fragment,
    Op,
    PrimitiveError,
    Reader,
    Shard,
    Span,
    fail,
    padded_vocab,
    shard_dim,
)
from mapgen.ops.copy import Copy, Duplicate
from mapgen.ops.eh_proj import MtpEhProj
from mapgen.ops.experts import ExpertFc1, ExpertFc2
from mapgen.ops.gated_fc1 import GatedFc1
from mapgen.ops.gdn import GdnConv1d, GdnInProj
from mapgen.ops.qkv import Qkv

__all__ = [
    "OPS",
    "DictReader",
    "Fragment",
    "Op",
    "PrimitiveError",
    "Reader",
    "Shard",
    "Span",
    "gather",
    "load",
    "padded_vocab",
    "save",
    "shard_dim",
    "spans",
    "split",
]

#: Every op by ``Rule.op`` name, in the order of ``Rule.op``'s declaration.
OPS: dict[str, Op[Any]] = {
    op.name: op
    for op in (
        Copy(),
        Qkv(),
        GatedFc1(),
        ExpertFc1(),
        ExpertFc2(),
        GdnInProj(),
        GdnConv1d(),
        MtpEhProj(),
        Duplicate(),
    )
}


def _op(rule: Rule) -> Op[Any]:
    op = OPS.get(rule.op)
    if op is None:
        raise fail(rule, f"unknown op {rule.op!r}")
    return op


def load(
    rule: Rule,
    keys: Sequence[str],
    spec: ModelSpec,
    shard: Shard,
    reader: Reader,
    expert: int | None = None,
) -> torch.Tensor:
    """This rank's local Megatron tensor for ``rule``, reading only the slices ``shard`` owns."""
    op = _op(rule)
    return op.load(op.context(rule, keys, spec, expert), shard, reader).contiguous()


def spans(
    rule: Rule,
    keys: Sequence[str],
    spec: ModelSpec,
    shard: Shard,
    reader: Reader,
    expert: int | None = None,
) -> list[Span] | None:
    """The HF blocks whose dim-0 concatenation is exactly :func:`load`'s result when the op only copies
    them (:meth:`Op.spans`), else ``None``."""
    op = _op(rule)
    return op.spans(op.context(rule, keys, spec, expert), shard, reader)


def save(
    rule: Rule,
    keys: Sequence[str],
    spec: ModelSpec,
    full: torch.Tensor,
    expert: int | None = None,
) -> list[Fragment]:
    """The HF tensors of the full (gathered, TP=1-layout) Megatron tensor ``full``, in ``keys`` order."""
    op = _op(rule)
    return op.save(op.context(rule, keys, spec, expert), full)


def gather(rule: Rule, spec: ModelSpec, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reassemble the full Megatron tensor from the per-rank tensors (rank order) of ``rule``."""
    if not shards:
        raise fail(rule, "gather needs at least one shard")
    op = _op(rule)
    return op.gather(op.bind(rule, spec), shards)


def split(rule: Rule, spec: ModelSpec, full: torch.Tensor, shard: Shard) -> torch.Tensor:
    """This rank's slice of the full Megatron tensor (the inverse of :func:`gather`)."""
    op = _op(rule)
    return op.split(op.bind(rule, spec), full, shard)
