"""Round trips, explicit layouts, bytes read per rank and preconditions of mapgen.runtime.primitives.

Tensors are ``torch.arange`` so that every element is distinct and comparisons are exact (``torch.equal``).
Dimensions are deliberately non-square: hidden 48, 6 heads in 2 or 3 groups, head_dim 8, ffn 40.
"""

from __future__ import annotations

import pytest
import torch

from mapgen.contract.rules import Rule
from mapgen.contract.spec import ModelSpec
from mapgen.runtime.primitives import (
    DictReader,
    Fragment,
    PrimitiveError,
    Shard,
    gather,
    load,
    padded_vocab,
    save,
    shard_dim,
    split,
)

H, HEADS, HN, FFN, VOCAB = 48, 6, 8, 40, 100
NK, NV, DK, DV = 2, 4, 8, 6  # GDN key heads, value heads, key/value head dims
E, MOE_I = 4, 20  # experts, expert intermediate size


def spec(**changes: object) -> ModelSpec:
    base = ModelSpec(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=HEADS,
        num_query_groups=2,
        kv_channels=HN,
        ffn_hidden_size=FFN,
        vocab_size=VOCAB,
        linear_num_key_heads=NK,
        linear_num_value_heads=NV,
        linear_key_head_dim=DK,
        linear_value_head_dim=DV,
    )
    return base.replace(**changes)


def rule(op: str, sharding: str, *, experts: bool = False, **options: object) -> Rule:
    return Rule(
        family="test",
        megatron="decoder.layers.{layer}.m.weight",
        hf=(),
        op=op,  # type: ignore[arg-type]
        sharding=sharding,  # type: ignore[arg-type]
        experts=experts,
        options=tuple(sorted(options.items())),  # type: ignore[arg-type]
    )


_counter = [0]


def arange(*shape: int) -> torch.Tensor:
    """Distinct values across all tensors of a test (offset by a running counter)."""
    n = 1
    for s in shape:
        n *= s
    start = _counter[0]
    _counter[0] += n
    return torch.arange(start, start + n, dtype=torch.float32).reshape(shape)


def roundtrip(
    r: Rule,
    keys: list[str],
    sp: ModelSpec,
    tensors: dict[str, torch.Tensor],
    tp: int,
    expert: int | None = None,
) -> tuple[list[torch.Tensor], list[int]]:
    """Load every rank, check gather/split/TP=1 agreement and that save restores the HF tensors.

    Returns the rank tensors and the number of elements each rank read."""
    reader = DictReader(tensors)
    shards, reads = [], []
    for rank in range(tp):
        reader.reset()
        shards.append(load(r, keys, sp, Shard(rank, tp), reader, expert))
        reads.append(reader.total_read)
    full = gather(r, sp, shards)
    tp1 = load(r, keys, sp, Shard(0, 1), DictReader(tensors), expert)
    if r.sharding == "vocab":  # the padding depends on TP; the real rows do not
        full, tp1 = full[: sp.vocab_size], tp1[: sp.vocab_size]
    assert torch.equal(full, tp1)
    for rank in range(tp):
        assert torch.equal(split(r, sp, gather(r, sp, shards), Shard(rank, tp)), shards[rank])
    frags = save(r, keys, sp, gather(r, sp, shards), expert)
    assert [f.key for f in frags] == keys
    for frag in frags:
        original = tensors[frag.key] if frag.index is None else tensors[frag.key][frag.index]
        assert frag.tensor.is_contiguous()
        assert torch.equal(frag.tensor, original), frag.key
    return shards, reads


def numel(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


# -- basics ----------------------------------------------------------------------------------------------


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


# -- copy ------------------------------------------------------------------------------------------------


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


# -- qkv -------------------------------------------------------------------------------------------------


def qkv_tensors(groups: int, gate: bool, part: str) -> dict[str, torch.Tensor]:
    rest = (H,) if part == "weight" else ()
    return {
        "q": arange(HEADS * HN * (2 if gate else 1), *rest),
        "k": arange(groups * HN, *rest),
        "v": arange(groups * HN, *rest),
    }


def expected_linear_qkv(t: dict[str, torch.Tensor], groups: int, gate: bool) -> torch.Tensor:
    """Megatron per query group: [q heads of the group; gate heads of the group; k; v] (attention.py)."""
    per_group = HEADS // groups
    rows = []
    for g in range(groups):
        heads = range(g * per_group, (g + 1) * per_group)
        if gate:  # HF q_proj per head: [q_h; gate_h]
            rows += [t["q"][h * 2 * HN : h * 2 * HN + HN] for h in heads]
            rows += [t["q"][h * 2 * HN + HN : (h + 1) * 2 * HN] for h in heads]
        else:
            rows += [t["q"][h * HN : (h + 1) * HN] for h in heads]
        rows += [t["k"][g * HN : (g + 1) * HN], t["v"][g * HN : (g + 1) * HN]]
    return torch.cat(rows)


@pytest.mark.parametrize("part", ["weight", "bias"])
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize(("groups", "tp"), [(2, 1), (2, 2), (3, 1), (3, 3), (6, 2), (6, 3)])
def test_qkv_layout_and_roundtrip(groups: int, tp: int, gate: bool, part: str) -> None:
    sp = spec(num_query_groups=groups)
    tensors = qkv_tensors(groups, gate, part)
    r = rule("qkv", "qkv_groups", output_gate=gate, part=part)
    shards, reads = roundtrip(r, ["q", "k", "v"], sp, tensors, tp)
    expected = expected_linear_qkv(tensors, groups, gate)
    assert torch.equal(torch.cat(shards), expected)  # whole groups per rank: plain concatenation
    assert reads == [numel(tensors) // tp] * tp


def test_qkv_requires_whole_groups_per_rank() -> None:
    sp = spec(num_query_groups=3)
    with pytest.raises(PrimitiveError, match=r"num_query_groups \(3\) is not divisible by the TP size 2"):
        load(rule("qkv", "qkv_groups"), ["q", "k", "v"], sp, Shard(0, 2), DictReader(qkv_tensors(3, False, "weight")))
    with pytest.raises(PrimitiveError, match="whole query groups"):
        gather(rule("qkv", "qkv_groups"), sp, [torch.zeros(60, H)] * 2)


def test_qkv_heads_multiple_of_groups() -> None:
    sp = spec(num_query_groups=4)
    with pytest.raises(PrimitiveError, match=r"num_attention_heads \(6\) is not a multiple of num_query_groups"):
        load(rule("qkv", "qkv_groups"), ["q", "k", "v"], sp, Shard(0, 1), DictReader(qkv_tensors(4, False, "weight")))


def test_qkv_shape_mismatch_names_the_key() -> None:
    tensors = qkv_tensors(2, False, "weight")  # q_proj without the gate rows
    with pytest.raises(PrimitiveError, match=r"q has shape \(48, 48\), the spec implies \(96, 48\)"):
        load(rule("qkv", "qkv_groups", output_gate=True), ["q", "k", "v"], spec(), Shard(0, 1), DictReader(tensors))


# -- gated fc1 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("fused", [False, True])
def test_gated_fc1(tp: int, fused: bool) -> None:
    gate, up = arange(FFN, H), arange(FFN, H)
    tensors = {"gate_up": torch.cat([gate, up])} if fused else {"gate": gate, "up": up}
    r = rule("gated_fc1", "gated_column", fused=fused)
    shards, reads = roundtrip(r, list(tensors), spec(), tensors, tp)
    for rank, s in enumerate(shards):
        assert torch.equal(s, torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]]))
    assert torch.equal(gather(r, spec(), shards), torch.cat([gate, up]))
    assert reads == [2 * FFN * H // tp] * tp


def test_gated_fc1_bias() -> None:
    tensors = {"gate": arange(FFN), "up": arange(FFN)}
    shards, _ = roundtrip(rule("gated_fc1", "gated_column", part="bias"), ["gate", "up"], spec(), tensors, 2)
    assert torch.equal(shards[1], torch.cat([tensors["gate"][20:], tensors["up"][20:]]))


def test_gated_fc1_preconditions() -> None:
    tensors = {"gate": arange(FFN, H), "up": arange(FFN, H)}
    with pytest.raises(PrimitiveError, match=r"the intermediate size \(40\) is not divisible by the TP size 3"):
        load(rule("gated_fc1", "gated_column"), ["gate", "up"], spec(), Shard(0, 3), DictReader(tensors))
    with pytest.raises(PrimitiveError, match=r"expected 1 HF key\(s\)"):
        load(rule("gated_fc1", "gated_column", fused=True), ["gate", "up"], spec(), Shard(0, 1), DictReader(tensors))
    with pytest.raises(PrimitiveError, match="odd number of rows"):
        load(rule("gated_fc1", "gated_column", fused=True), ["g"], spec(), Shard(0, 1), DictReader({"g": arange(7, H)}))
    tensors["up"] = arange(FFN - 1, H)
    with pytest.raises(PrimitiveError, match=r"up has shape \(39, 48\)"):
        load(rule("gated_fc1", "gated_column"), ["gate", "up"], spec(), Shard(0, 1), DictReader(tensors))


# -- experts ---------------------------------------------------------------------------------------------


def expert_weights() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert gate [E, I, H], up [E, I, H], down [E, H, I] in nn.Linear orientation."""
    return arange(E, MOE_I, H), arange(E, MOE_I, H), arange(E, H, MOE_I)


def expected_fc1(gate: torch.Tensor, up: torch.Tensor, e: int, etp: int, rank: int) -> torch.Tensor:
    return torch.cat([gate[e].chunk(etp)[rank], up[e].chunk(etp)[rank]])


@pytest.mark.parametrize("etp", [1, 2, 4])
@pytest.mark.parametrize(
    ("layout", "orientation", "interleave"),
    [
        ("per_expert", "out_in", False),
        ("packed", "out_in", False),
        ("packed", "in_out", False),
        ("packed", "in_out", True),
    ],
)
def test_expert_fc1(etp: int, layout: str, orientation: str, interleave: bool) -> None:
    gate, up = expert_weights()[:2]
    e = 3
    if layout == "per_expert":
        tensors, keys = {"g": gate[e].clone(), "u": up[e].clone()}, ["g", "u"]
        opts: dict[str, object] = {"layout": layout}
    else:
        fused = torch.stack([gate, up], dim=2).reshape(E, 2 * MOE_I, H) if interleave else torch.cat([gate, up], 1)
        if orientation == "in_out":
            fused = fused.transpose(1, 2).contiguous()  # gpt-oss gate_up_proj [E, H, 2I]
        tensors, keys = {"gate_up": fused}, ["gate_up"]
        opts = {"layout": layout, "orientation": orientation, "interleave": interleave}
    r = rule("expert_fc1", "expert_gated_column", experts=True, **opts)
    shards, reads = roundtrip(r, keys, spec(), tensors, etp, expert=e)
    for rank, s in enumerate(shards):
        assert torch.equal(s, expected_fc1(gate, up, e, etp, rank))
    assert reads == [2 * MOE_I * H // etp] * etp  # only packed[e], only this rank's rows


def test_expert_fc1_packed_separate_gate_and_up() -> None:
    gate, up = expert_weights()[:2]
    r = rule("expert_fc1", "expert_gated_column", experts=True, layout="packed", fused=False)
    shards, _ = roundtrip(r, ["g", "u"], spec(), {"g": gate, "u": up}, 2, expert=1)
    assert torch.equal(shards[1], expected_fc1(gate, up, 1, 2, 1))


def test_expert_fc1_bias_interleaved() -> None:
    """gpt-oss gate_up_proj_bias [E, 2I] with alternating gate/up entries."""
    gb, ub = arange(E, MOE_I), arange(E, MOE_I)
    packed = torch.stack([gb, ub], dim=2).reshape(E, 2 * MOE_I)
    r = rule("expert_fc1", "expert_gated_column", experts=True, layout="packed", interleave=True, part="bias")
    shards, _ = roundtrip(r, ["b"], spec(), {"b": packed}, 2, expert=0)
    assert torch.equal(shards[0], torch.cat([gb[0, :10], ub[0, :10]]))


@pytest.mark.parametrize("etp", [1, 2, 4])
@pytest.mark.parametrize(
    ("layout", "orientation"), [("per_expert", "out_in"), ("packed", "out_in"), ("packed", "in_out")]
)
def test_expert_fc2(etp: int, layout: str, orientation: str) -> None:
    down = expert_weights()[2]
    e = 2
    if layout == "per_expert":
        tensors = {"d": down[e].clone()}
        opts: dict[str, object] = {"layout": layout}
    else:
        tensors = {"d": down if orientation == "out_in" else down.transpose(1, 2).contiguous()}
        opts = {"layout": layout, "orientation": orientation}
    r = rule("expert_fc2", "expert_row", experts=True, **opts)
    shards, reads = roundtrip(r, ["d"], spec(), tensors, etp, expert=e)
    for rank, s in enumerate(shards):
        assert torch.equal(s, down[e].chunk(etp, dim=1)[rank])
    assert reads == [H * MOE_I // etp] * etp


def test_expert_fragment_index_is_the_expert_slot_for_packed_only() -> None:
    gate, up = expert_weights()[:2]
    packed = rule("expert_fc1", "expert_gated_column", experts=True, layout="packed")
    frags = save(packed, ["gu"], spec(), torch.cat([gate[1], up[1]]), expert=1)
    assert frags == [Fragment("gu", frags[0].tensor, 1)]
    per = rule("expert_fc1", "expert_gated_column", experts=True)
    assert [f.index for f in save(per, ["g", "u"], spec(), torch.cat([gate[1], up[1]]), expert=1)] == [None, None]


def test_expert_preconditions() -> None:
    gate, up = expert_weights()[:2]
    tensors = {"gu": torch.cat([gate, up], 1)}
    packed = rule("expert_fc1", "expert_gated_column", experts=True, layout="packed")
    with pytest.raises(PrimitiveError, match="an expert id is required"):
        load(packed, ["gu"], spec(), Shard(0, 1), DictReader(tensors))
    with pytest.raises(PrimitiveError, match="expert 4 is out of range for gu with 4 experts"):
        load(packed, ["gu"], spec(), Shard(0, 1), DictReader(tensors), expert=4)
    with pytest.raises(PrimitiveError, match=r"the intermediate size \(20\) is not divisible by the TP size 3"):
        load(packed, ["gu"], spec(), Shard(0, 3), DictReader(tensors), expert=0)
    bad = rule("expert_fc1", "expert_gated_column", experts=True, interleave=True, fused=False, layout="packed")
    with pytest.raises(PrimitiveError, match="interleave=True needs a fused gate_up tensor"):
        load(bad, ["g", "u"], spec(), Shard(0, 1), DictReader(tensors), expert=0)
    bad = rule("expert_fc1", "expert_gated_column", experts=True, orientation="in_out")
    with pytest.raises(PrimitiveError, match="orientation='in_out' applies only to layout='packed'"):
        load(bad, ["g", "u"], spec(), Shard(0, 1), DictReader(tensors), expert=0)
    with pytest.raises(PrimitiveError, match=r"dim 1 of d \(20\) is not divisible by the TP size 3"):
        load(
            rule("expert_fc2", "expert_row", experts=True),
            ["d"],
            spec(),
            Shard(0, 3),
            DictReader({"d": arange(H, 20)}),
            0,
        )


# -- gated delta net -------------------------------------------------------------------------------------


def gdn_separate() -> dict[str, torch.Tensor]:
    return {
        "qkv": arange(2 * NK * DK + NV * DV, H),
        "z": arange(NV * DV, H),
        "b": arange(NV, H),
        "a": arange(NV, H),
    }


def gdn_fused_from_separate(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen3-Next: per key head g, qkvz rows [q_g; k_g; v_g (ratio heads); z_g], ba rows [b_g; a_g]."""
    ratio = NV // NK
    q, k, v = torch.split(t["qkv"], [NK * DK, NK * DK, NV * DV])
    qkvz, ba = [], []
    for g in range(NK):
        vs = slice(g * ratio * DV, (g + 1) * ratio * DV)
        qkvz += [q[g * DK : (g + 1) * DK], k[g * DK : (g + 1) * DK], v[vs], t["z"][vs]]
        ba += [t["b"][g * ratio : (g + 1) * ratio], t["a"][g * ratio : (g + 1) * ratio]]
    return {"qkvz": torch.cat(qkvz), "ba": torch.cat(ba)}


@pytest.mark.parametrize("tp", [1, 2])
def test_gdn_in_proj_layout(tp: int) -> None:
    t = gdn_separate()
    r = rule("gdn_in_proj", "gdn_heads")
    shards, reads = roundtrip(r, ["qkv", "z", "b", "a"], spec(), t, tp)
    q, k, v = torch.split(t["qkv"], [NK * DK, NK * DK, NV * DV])
    for rank, s in enumerate(shards):
        parts = [q, k, v, t["z"], t["b"], t["a"]]
        assert torch.equal(s, torch.cat([p.chunk(tp)[rank] for p in parts]))
    assert torch.equal(gather(r, spec(), shards), torch.cat([q, k, v, t["z"], t["b"], t["a"]]))
    assert reads == [numel(t) // tp] * tp


@pytest.mark.parametrize("tp", [1, 2])
def test_gdn_in_proj_qkvz_ba_matches_separate(tp: int) -> None:
    t = gdn_separate()
    fused = gdn_fused_from_separate(t)
    fused_rule = rule("gdn_in_proj", "gdn_heads", variant="qkvz_ba")
    shards, reads = roundtrip(fused_rule, ["qkvz", "ba"], spec(), fused, tp)
    for rank, s in enumerate(shards):
        separate = load(
            rule("gdn_in_proj", "gdn_heads"), ["qkv", "z", "b", "a"], spec(), Shard(rank, tp), DictReader(t)
        )
        assert torch.equal(s, separate)
    assert reads == [numel(fused) // tp] * tp


@pytest.mark.parametrize("part", ["weight", "bias"])
@pytest.mark.parametrize("tp", [1, 2])
def test_gdn_conv1d(tp: int, part: str) -> None:
    shape = (2 * NK * DK + NV * DV, 1, 4) if part == "weight" else (2 * NK * DK + NV * DV,)
    t = {"conv": arange(*shape)}
    shards, reads = roundtrip(rule("gdn_conv1d", "gdn_heads", part=part), ["conv"], spec(), t, tp)
    q, k, v = torch.split(t["conv"], [NK * DK, NK * DK, NV * DV])
    for rank, s in enumerate(shards):
        assert torch.equal(s, torch.cat([q.chunk(tp)[rank], k.chunk(tp)[rank], v.chunk(tp)[rank]]))
    assert reads == [numel(t) // tp] * tp


def test_gdn_a_log_and_out_proj_are_plain_copies() -> None:
    t = {"A_log": arange(NV), "out": arange(H, NV * DV)}
    a_shards, _ = roundtrip(rule("copy", "column"), ["A_log"], spec(), {"A_log": t["A_log"]}, 2)
    assert torch.equal(a_shards[1], t["A_log"][2:])
    roundtrip(rule("copy", "row"), ["out"], spec(), {"out": t["out"]}, 2)


def test_gdn_preconditions() -> None:
    t = gdn_separate()
    keys = ["qkv", "z", "b", "a"]
    r = rule("gdn_in_proj", "gdn_heads")
    with pytest.raises(PrimitiveError, match=r"linear_num_key_heads \(2\) is not divisible by the TP size 4"):
        load(r, keys, spec(), Shard(0, 4), DictReader(t))
    with pytest.raises(PrimitiveError, match=r"linear_num_value_heads \(5\) is not a multiple of linear_num_key_heads"):
        load(r, keys, spec(linear_num_value_heads=5), Shard(0, 1), DictReader(t))
    with pytest.raises(PrimitiveError, match="the spec lacks linear_num_key_heads"):
        load(r, keys, spec(linear_key_head_dim=None), Shard(0, 1), DictReader(t))
    with pytest.raises(PrimitiveError, match=r"qkv has shape \(56, 48\), the spec implies \(64, 48\)"):
        load(r, keys, spec(linear_value_head_dim=8), Shard(0, 1), DictReader(t))
    with pytest.raises(PrimitiveError, match=r"expected 2 HF key\(s\)"):
        load(rule("gdn_in_proj", "gdn_heads", variant="qkvz_ba"), keys, spec(), Shard(0, 1), DictReader(t))


# -- MTP eh_proj -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("order", ["embedding_hidden", "hidden_embedding"])
def test_mtp_eh_proj(tp: int, order: str) -> None:
    t = {"eh": arange(H, 2 * H)}
    shards, reads = roundtrip(rule("mtp_eh_proj", "column", order=order), ["eh"], spec(), t, tp)
    w = t["eh"] if order == "embedding_hidden" else torch.cat([t["eh"][:, H:], t["eh"][:, :H]], dim=1)
    for rank, s in enumerate(shards):
        assert torch.equal(s, w.chunk(tp)[rank])
    assert reads == [numel(t) // tp] * tp


def test_mtp_eh_proj_shape() -> None:
    with pytest.raises(PrimitiveError, match=r"eh has shape \(48, 48\), the spec implies \(48, 96\)"):
        load(rule("mtp_eh_proj", "column"), ["eh"], spec(), Shard(0, 1), DictReader({"eh": arange(H, H)}))


# -- rule validation -------------------------------------------------------------------------------------


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


def test_copy_column_not_divisible() -> None:
    with pytest.raises(PrimitiveError, match=r"dim 0 of w \(40\) is not divisible by the TP size 3"):
        load(rule("copy", "column"), ["w"], spec(), Shard(0, 3), DictReader({"w": arange(FFN, H)}))


def test_copy_vocab_rows_must_match_spec() -> None:
    with pytest.raises(PrimitiveError, match="has 99 rows, the spec's vocab_size is 100"):
        load(rule("copy", "vocab"), ["emb"], spec(), Shard(0, 1), DictReader({"emb": arange(99, H)}))


def test_gather_checks_component_sizes() -> None:
    with pytest.raises(PrimitiveError, match=r"a full length of 20 does not split into components \[16, 16, 24"):
        gather(rule("gdn_in_proj", "gdn_heads"), spec(), [torch.zeros(10, H)] * 2)
    with pytest.raises(PrimitiveError, match="even number of rows"):
        split(rule("gated_fc1", "gated_column"), spec(), torch.zeros(7, H), Shard(0, 1))
