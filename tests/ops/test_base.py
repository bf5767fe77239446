"""Shared machinery of mapgen.ops: vocab padding, shards, the in-memory reader, shard_dim, rule and option
validation, and the generic split/gather component checks.
"""

from __future__ import annotations

import pytest
import torch

from mapgen.contract.rules import Rule
from mapgen.ops import DictReader, PrimitiveError, Shard, gather, load, padded_vocab, shard_dim, split

from .support import FFN, H, arange, rule, spec


def test_padded_vocab_matches_megatron_rule() -> None:
    assert padded_vocab(100, 1) == 128
    assert padded_vocab(128, 1) == 128
    assert padded_vocab(129, 2) == 256
    assert padded_vocab(151936, 4, 128) == 152064
    assert padded_vocab(100, 3, 8) == 120
    with pytest.raises(PrimitiveError, match="positive sizes"):
        padded_vocab(100, 0)


def test_shard_validation() -> None:
    with pytest.raises(PrimitiveError, match="invalid shard"):
        Shard(2, 2)
    with pytest.raises(PrimitiveError, match="invalid shard"):
        Shard(0, 0)


def test_dict_reader_rejects_what_safetensors_cannot_do_and_counts() -> None:
    reader = DictReader({"w": arange(4, 6)})
    with pytest.raises(IndexError, match="strided"):
        reader.read("w", (slice(0, 4, 2),))
    assert reader.read("w", (slice(1, 3), slice(2, 5))).shape == (2, 3)
    assert reader.read("w", (1,)).shape == (6,)
    assert reader.elements_read["w"] == 12
    assert reader.bytes_read == 48
    assert reader.shape("w") == (4, 6)
    assert reader.dtype("w") == torch.float32


def test_shard_dim() -> None:
    assert shard_dim(rule("copy", "replicated")) is None
    assert shard_dim(rule("copy", "row")) == 1
    assert shard_dim(rule("expert_fc2", "expert_row", experts=True)) == 1
    for op, sharding in [("copy", "column"), ("copy", "vocab"), ("qkv", "qkv_groups"), ("gdn_in_proj", "gdn_heads")]:
        assert shard_dim(rule(op, sharding)) == 0


@pytest.mark.parametrize(
    ("r", "message"),
    [
        (rule("qkv", "column"), r"op qkv supports shardings \['qkv_groups'\]"),
        (rule("copy", "column", transform="square"), r"option transform='square' is not one of"),
        (rule("copy", "column", bogus=1), "unknown option 'bogus'"),
        (rule("copy", "vocab", divisible_by=0), "divisible_by must be a positive int"),
        (rule("copy", "column", experts=True), "an expert id is required"),
        (rule("mtp_eh_proj", "column", order="sideways"), "option order='sideways'"),
    ],
)
def test_rule_validation(r: Rule, message: str) -> None:
    with pytest.raises(PrimitiveError, match=message):
        load(r, ["w"], spec(), Shard(0, 1), DictReader({"w": arange(FFN, H)}))


def test_gather_checks_component_sizes() -> None:
    with pytest.raises(PrimitiveError, match=r"a full length of 20 does not split into components \[16, 16, 24"):
        gather(rule("gdn_in_proj", "gdn_heads"), spec(), [torch.zeros(10, H)] * 2)
    with pytest.raises(PrimitiveError, match="even number of rows"):
        split(rule("gated_fc1", "gated_column"), spec(), torch.zeros(7, H), Shard(0, 1))
