"""``Op.spans``: where an op declares its rank's tensor a concatenation of stored blocks (the streaming
convert then copies those bytes file to file without reading them), the blocks, read and concatenated, are
bitwise :func:`mapgen.ops.load`'s result -- for every example of ``test_inverse``, every TP size and rank.
And the ops that only copy do declare it (the fast path is not silently off)."""

from __future__ import annotations

import pytest
import torch

from mapgen.ops import DictReader, Shard, load, spans

from .support import arange, rule, spec
from .test_inverse import EXAMPLES, Example


@pytest.mark.parametrize(("ex", "tp"), [pytest.param(e, tp, id=f"{e.id}-tp{tp}") for e in EXAMPLES for tp in e.tps])
def test_spans_are_what_load_reads(ex: Example, tp: int) -> None:
    r = rule(ex.op, ex.sharding, experts=ex.expert is not None, **ex.options)
    sp = spec(**ex.spec)
    keys = list(ex.hf)
    tensors = {key: arange(*shape) for key, shape in ex.hf.items()}
    for rank in range(tp):
        reader = DictReader(tensors)
        blocks = spans(r, keys, sp, Shard(rank, tp), reader, ex.expert)
        if blocks is None:
            continue
        want = load(r, keys, sp, Shard(rank, tp), reader, ex.expert)
        got = torch.cat([reader.read(key, index) for key, index in blocks])
        assert got.dtype == want.dtype
        assert torch.equal(got, want), (rank, blocks)


def _declared(ex: Example, tp: int) -> bool:
    r = rule(ex.op, ex.sharding, experts=ex.expert is not None, **ex.options)
    keys = list(ex.hf)
    tensors = {key: arange(*shape) for key, shape in ex.hf.items()}
    return spans(r, keys, spec(**ex.spec), Shard(0, tp), DictReader(tensors), ex.expert) is not None


def test_plain_copies_declare_their_spans() -> None:
    at_tp1 = {(e.op, e.sharding) for e in EXAMPLES if _declared(e, 1)}
    assert at_tp1 >= {("copy", "replicated"), ("copy", "column"), ("copy", "row"), ("copy", "expert_column"),
                      ("copy", "expert_row"), ("duplicate", "column"), ("qkv", "qkv_groups"),
                      ("gated_fc1", "gated_column"), ("expert_fc1", "expert_gated_column"),
                      ("expert_fc2", "expert_row")}
    assert not {op for op, _ in at_tp1} & {"gdn_in_proj", "gdn_conv1d", "mtp_eh_proj"}
    # under TP, column chunks of a row-parallel matrix are no block of the storage
    at_tp2 = {(e.op, e.sharding) for e in EXAMPLES if 2 in e.tps and _declared(e, 2)}
    assert ("copy", "row") not in at_tp2
    assert {("copy", "column"), ("qkv", "qkv_groups"), ("gated_fc1", "gated_column")} <= at_tp2
