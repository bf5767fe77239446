"""The ``copy`` and ``duplicate`` ops (mapgen/ops/copy.py): layouts, bytes read per rank, transforms, preconditions."""

from __future__ import annotations

import pytest
import torch

from mapgen.ops import DictReader, PrimitiveError, Shard, load, padded_vocab, save

from .support import FFN, VOCAB, E, H, arange, numel, roundtrip, rule, spec


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize(("sharding", "shape"), [("column", (FFN, H)), ("row", (H, FFN)), ("column", (FFN,))])
def test_copy_column_row(tp: int, sharding: str, shape: tuple[int, ...]) -> None:
    tensors = {"w": arange(*shape)}
    shards, reads = roundtrip(rule("copy", sharding), ["w"], spec(), tensors, tp)
    dim = 0 if sharding == "column" else 1
    for rank, s in enumerate(shards):
        assert torch.equal(s, tensors["w"].chunk(tp, dim=dim)[rank])
    assert reads == [numel(tensors) // tp] * tp


def test_copy_replicated_reads_everything_on_every_rank() -> None:
    tensors = {"n": arange(H)}
    shards, reads = roundtrip(rule("copy", "replicated"), ["n"], spec(), tensors, 2)
    assert all(torch.equal(s, tensors["n"]) for s in shards)
    assert reads == [H, H]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_copy_vocab_pads_with_zeros_and_truncates(tp: int) -> None:
    tensors = {"emb": arange(VOCAB, H)}
    r = rule("copy", "vocab", divisible_by=8)
    shards, reads = roundtrip(r, ["emb"], spec(), tensors, tp)
    padded = padded_vocab(VOCAB, tp, 8)
    assert all(s.shape == (padded // tp, H) for s in shards)
    full = torch.cat(shards)
    assert torch.equal(full[:VOCAB], tensors["emb"])
    assert not full[VOCAB:].any()
    assert sum(reads) == VOCAB * H  # padding rows are never read
    assert max(reads) <= padded // tp * H


def test_copy_vocab_rank_of_padding_only_reads_nothing() -> None:
    tensors = {"emb": arange(10, H)}
    shards, reads = roundtrip(rule("copy", "vocab", divisible_by=8), ["emb"], spec(vocab_size=10), tensors, 4)
    assert reads == [8 * H, 2 * H, 0, 0]
    assert not shards[3].any()


def test_copy_vocab_default_divisible_by_128() -> None:
    shards = [
        load(rule("copy", "vocab"), ["emb"], spec(), Shard(r, 2), DictReader({"emb": arange(VOCAB, H)}))
        for r in range(2)
    ]
    assert [s.shape[0] for s in shards] == [128, 128]
    assert not shards[1].any()


def test_copy_zero_centered_fp32_exact() -> None:
    w = arange(H) / 64
    r = rule("copy", "replicated", transform="zero_centered")
    out = load(r, ["n"], spec(), Shard(0, 1), DictReader({"n": w}))
    assert torch.equal(out, w - 1)
    assert torch.equal(save(r, ["n"], spec(), out)[0].tensor, w)


def test_copy_zero_centered_is_not_bitwise_in_bf16() -> None:
    """Documented: Megatron -> HF rounds w + 1 in the storage precision (bf16 has 8 mantissa bits)."""
    r = rule("copy", "replicated", transform="zero_centered")
    megatron = torch.tensor([1e-3, -1e-3], dtype=torch.bfloat16)
    hf = save(r, ["n"], spec(), megatron)[0].tensor
    assert hf.dtype == torch.bfloat16
    back = load(r, ["n"], spec(), Shard(0, 1), DictReader({"n": hf}))
    assert not torch.equal(back, megatron)
    # HF -> Megatron -> HF is exact for values within [0.5, 2] (Sterbenz), the usual range of norm weights.
    hf_w = torch.linspace(0.5, 2.0, 97, dtype=torch.bfloat16)
    m = load(r, ["n"], spec(), Shard(0, 1), DictReader({"n": hf_w}))
    assert torch.equal(save(r, ["n"], spec(), m)[0].tensor, hf_w)


def test_copy_dtype_fp32() -> None:
    bias = arange(E).to(torch.bfloat16)
    r = rule("copy", "replicated", dtype="fp32")
    out = load(r, ["b"], spec(), Shard(0, 1), DictReader({"b": bias}))
    assert out.dtype == torch.float32
    assert torch.equal(out, bias.float())
    assert save(r, ["b"], spec(), out)[0].tensor.dtype == torch.float32
    native = load(rule("copy", "replicated"), ["b"], spec(), Shard(0, 1), DictReader({"b": bias}))
    assert native.dtype == torch.bfloat16


def test_copy_packed_expert_vector() -> None:
    """gpt-oss down_proj_bias [E, H]: a replicated per-expert copy out of a packed tensor."""
    tensors = {"down_bias": arange(E, H)}
    r = rule("copy", "replicated", experts=True, layout="packed")
    shards, reads = roundtrip(r, ["down_bias"], spec(), tensors, 1, expert=2)
    assert torch.equal(shards[0], tensors["down_bias"][2])
    assert reads == [H]


def test_duplicate_behaves_like_copy() -> None:
    tensors = {"mtp.embed": arange(VOCAB, H)}
    shards, _ = roundtrip(rule("duplicate", "vocab", divisible_by=8), ["mtp.embed"], spec(), tensors, 2)
    assert torch.equal(torch.cat(shards)[:VOCAB], tensors["mtp.embed"])


def test_copy_column_not_divisible() -> None:
    with pytest.raises(PrimitiveError, match=r"dim 0 of w \(40\) is not divisible by the TP size 3"):
        load(rule("copy", "column"), ["w"], spec(), Shard(0, 3), DictReader({"w": arange(FFN, H)}))


def test_copy_vocab_rows_must_match_spec() -> None:
    with pytest.raises(PrimitiveError, match="has 99 rows, the spec's vocab_size is 100"):
        load(rule("copy", "vocab"), ["emb"], spec(), Shard(0, 1), DictReader({"emb": arange(99, H)}))
