"""Every op is its own inverse pair, for every sharding it declares and every option value it accepts.

For each example (an op, a sharding, options and HF tensor shapes) and each TP size it allows:

* HF side: ``gather(load(rank) for rank) == load(TP=1)``, ``split(gather(...)) == load(rank)`` and
  ``save(gather(...))`` gives back the HF tensors (``support.roundtrip``);
* Megatron side: for a fresh full tensor ``M``, ``load(save(M)) == M`` at TP=1, ``load(save(M), rank) ==
  split(M, rank)`` and ``gather(split(M, rank) for rank) == M``.

``test_examples_cover_every_declared_sharding_and_option_value`` makes a new op (or sharding, or option value)
come with an example here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from mapgen.ops import OPS, DictReader, Shard, gather, load, padded_vocab, save, split

from .support import DK, DV, FFN, HEADS, HN, KERNEL, MOE_I, NK, NV, VOCAB, E, H, arange, roundtrip, rule, spec

QKVZ = NK * (2 * DK + 2 * (NV // NK) * DV)
CONV = 2 * NK * DK + NV * DV


@dataclass(frozen=True)
class Example:
    op: str
    sharding: str
    hf: dict[str, tuple[int, ...]]  # HF key -> shape, in the rule's key order
    options: dict[str, Any] = field(default_factory=dict)
    expert: int | None = None  # set: an expert rule for this global expert id
    tps: tuple[int, ...] = (1, 2, 4)
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.op}/{self.sharding}[{opts}]" + ("" if self.expert is None else f"@e{self.expert}")


_COPY = [
    Example("copy", "replicated", {"n": (H,)}),
    Example("copy", "replicated", {"n": (H,)}, {"transform": "zero_centered", "dtype": "fp32"}),
    Example("copy", "replicated", {"n": (H,)}, {"shared": True}),
    Example("copy", "replicated", {"pos": (VOCAB, H)}, {"roll": 2}),  # OPT's position table, offset 2
    Example("copy", "replicated", {"bias": (1, E)}, {"leading_unit": True, "dtype": "fp32"}),  # ERNIE [1, E]
    Example("copy", "replicated", {"n": (H,)}, {"leading_unit": False}),
    Example("copy", "column", {"w": (FFN, H)}),
    Example("copy", "column", {"w": (FFN,)}, {"transform": "none", "dtype": "native"}),
    Example("copy", "row", {"w": (H, FFN)}),
    Example("copy", "column", {"w": (H, FFN)}, {"orientation": "in_out"}),  # GPT-2 Conv1D c_fc: [in, out]
    Example("copy", "row", {"w": (FFN, H)}, {"orientation": "in_out"}),  # GPT-2 Conv1D c_proj
    Example("copy", "vocab", {"emb": (VOCAB, H)}, {"divisible_by": 8}),
    Example("copy", "vocab", {"emb": (VOCAB, H)}, tps=(1, 2)),  # divisible_by 128: rank 1 holds padding only
    Example("copy", "replicated", {"bias": (E, H)}, {"layout": "packed"}, expert=2, tps=(1,)),
    Example("copy", "expert_column", {"w": (MOE_I, H)}, {"layout": "per_expert"}, expert=1),
    Example("copy", "expert_column", {"w": (E, MOE_I, H)}, {"layout": "packed"}, expert=3),
    Example("copy", "expert_column", {"w": (E, H, MOE_I)}, {"layout": "packed", "orientation": "in_out"}, expert=0),
    Example("copy", "expert_row", {"w": (H, MOE_I)}, expert=2),
    Example("copy", "expert_row", {"w": (E, MOE_I, H)}, {"layout": "packed", "orientation": "in_out"}, expert=1),
]

EXAMPLES = [
    *_COPY,
    *(Example("duplicate", e.sharding, e.hf, e.options, e.expert, e.tps, e.spec) for e in _COPY),
    Example("qkv", "qkv_groups", {"q": (HEADS * HN, H), "k": (2 * HN, H), "v": (2 * HN, H)}, tps=(1, 2)),
    Example("qkv", "qkv_groups", {"q": (HEADS * HN,), "k": (2 * HN,), "v": (2 * HN,)}, {"part": "bias"}, tps=(1, 2)),
    Example(
        "qkv",
        "qkv_groups",
        {"q": (2 * HEADS * HN, H), "k": (3 * HN, H), "v": (3 * HN, H)},
        {"output_gate": True, "part": "weight"},
        tps=(1, 3),
        spec={"num_query_groups": 3},
    ),
    Example(
        "qkv",
        "qkv_groups",
        {"q": (HEADS * HN, H), "k": (6 * HN, H), "v": (6 * HN, H)},
        {"output_gate": False},
        tps=(1, 2, 3, 6),
        spec={"num_query_groups": 6},
    ),
    Example("qkv", "qkv_groups", {"qkv": ((HEADS + 4) * HN, H)}, {"layout": "blocks"}, tps=(1, 2)),
    Example("qkv", "qkv_groups", {"qkv": ((HEADS + 4) * HN,)}, {"layout": "blocks", "part": "bias"}, tps=(1, 2)),
    Example("qkv", "qkv_groups", {"qkv": ((HEADS + 4) * HN, H)}, {"layout": "per_group"}, tps=(1, 2)),
    Example("qkv", "qkv_groups", {"qkv": (H, (HEADS + 4) * HN)}, {"layout": "blocks", "orientation": "in_out"},
            tps=(1, 2)),  # GPT-2 Conv1D c_attn: [hidden, q + k + v]
    Example("qkv", "qkv_groups", {"q": (HEADS * HN, H), "k": (2 * HN, H), "v": (2 * HN, H)}, {"layout": "separate"},
            tps=(1, 2)),
    Example("gated_fc1", "gated_column", {"g": (FFN, H), "u": (FFN, H)}, {"fused": False}),
    Example("gated_fc1", "gated_column", {"g": (FFN,), "u": (FFN,)}, {"part": "bias"}),
    Example("gated_fc1", "gated_column", {"gu": (2 * FFN, H)}, {"fused": True, "part": "weight"}),
    Example("gated_fc1", "gated_column", {"gu": (2 * FFN, H)}, {"fused": True, "interleave": True}),
    Example("gated_fc1", "gated_column", {"g": (FFN, H), "u": (FFN, H)}, {"interleave": False}),
    Example("expert_fc1", "expert_gated_column", {"g": (MOE_I, H), "u": (MOE_I, H)}, {"layout": "per_expert"}, 1),
    Example("expert_fc1", "expert_gated_column", {"gu": (E, 2 * MOE_I, H)}, {"layout": "packed"}, 3),
    Example(
        "expert_fc1",
        "expert_gated_column",
        {"g": (E, MOE_I, H), "u": (E, MOE_I, H)},
        {"layout": "packed", "fused": False, "orientation": "out_in"},
        0,
    ),
    Example(
        "expert_fc1",
        "expert_gated_column",
        {"gu": (E, H, 2 * MOE_I)},
        {"layout": "packed", "orientation": "in_out", "interleave": True, "fused": True},
        2,
    ),
    Example(
        "expert_fc1",
        "expert_gated_column",
        {"b": (E, 2 * MOE_I)},
        {"layout": "packed", "interleave": True, "part": "bias"},
        1,
    ),
    Example("expert_fc1", "expert_gated_column", {"g": (MOE_I, H), "u": (MOE_I, H)}, {"interleave": False}, 0),
    Example("expert_fc2", "expert_row", {"d": (H, MOE_I)}, {"part": "weight"}, 2),
    Example("expert_fc2", "expert_row", {"d": (E, H, MOE_I)}, {"layout": "packed", "orientation": "out_in"}, 1),
    Example("expert_fc2", "expert_row", {"d": (E, MOE_I, H)}, {"layout": "packed", "orientation": "in_out"}, 3),
    Example(
        "gdn_in_proj",
        "gdn_heads",
        {"qkv": (CONV, H), "z": (NV * DV, H), "b": (NV, H), "a": (NV, H)},
        {"variant": "qkv_z_b_a"},
        tps=(1, 2),
    ),
    Example("gdn_in_proj", "gdn_heads", {"qkvz": (QKVZ, H), "ba": (2 * NV, H)}, {"variant": "qkvz_ba"}, tps=(1, 2)),
    Example("gdn_in_proj", "gdn_heads", {"in_proj": (CONV + NV * DV + 2 * NV, H)}, {"variant": "blocks"},
            tps=(1, 2)),  # Lara-mini: [q|k|v|z|b|a] whole blocks
    Example("gdn_conv1d", "gdn_heads", {"conv": (CONV, 1, KERNEL)}, {"part": "weight"}, tps=(1, 2)),
    Example("gdn_conv1d", "gdn_heads", {"conv": (CONV,)}, {"part": "bias"}, tps=(1, 2)),
    Example("mtp_eh_proj", "column", {"eh": (H, 2 * H)}, {"order": "embedding_hidden"}),
    Example("mtp_eh_proj", "column", {"eh": (H, 2 * H)}, {"order": "hidden_embedding", "shared": True}),
    Example("mtp_eh_proj", "column", {"eh": (H, 2 * H)}, {"shared": False}),
]


def test_examples_cover_every_declared_sharding_and_option_value() -> None:
    declared = {(name, sharding) for name, op in OPS.items() for sharding in op.shardings}
    assert {(e.op, e.sharding) for e in EXAMPLES} == declared
    for name, op in OPS.items():
        seen = [op.options_type.parse(rule(e.op, e.sharding, **e.options)) for e in EXAMPLES if e.op == name]
        for option, allowed in op.options_type.schema().items():
            values = {getattr(o, option) for o in seen}
            if allowed is None:  # a positive int: the default and another value
                assert len(values) > 1, f"{name}: add an example with a non-default {option}"
            else:
                missing = [v for v in allowed if v not in values]
                assert not missing, f"{name}: add an example with {option} in {missing}"


def _with_fragments(tensors: dict[str, torch.Tensor], frags: list[Any]) -> dict[str, torch.Tensor]:
    """The HF tensors with ``save``'s fragments written in (a packed fragment replaces one slot)."""
    out = {k: v.clone() for k, v in tensors.items()}
    for frag in frags:
        if frag.index is None:
            out[frag.key] = frag.tensor
        else:
            out[frag.key][frag.index] = frag.tensor
    return out


@pytest.mark.parametrize(("ex", "tp"), [pytest.param(e, tp, id=f"{e.id}-tp{tp}") for e in EXAMPLES for tp in e.tps])
def test_load_save_split_gather_are_mutually_inverse(ex: Example, tp: int) -> None:
    r = rule(ex.op, ex.sharding, experts=ex.expert is not None, **ex.options)
    sp = spec(**ex.spec)
    keys = list(ex.hf)
    tensors = {key: arange(*shape) for key, shape in ex.hf.items()}
    roundtrip(r, keys, sp, tensors, tp, ex.expert)  # the HF side

    # the Megatron side, on a fresh full tensor (zero vocab padding: save drops it, load restores zeros)
    shape = load(r, keys, sp, Shard(0, 1), DictReader(tensors), ex.expert).shape
    full = arange(*shape)
    if ex.sharding == "vocab":
        full[sp.vocab_size :] = 0
    hf = _with_fragments(tensors, save(r, keys, sp, full, ex.expert))
    assert torch.equal(load(r, keys, sp, Shard(0, 1), DictReader(hf), ex.expert), full)
    if ex.sharding == "vocab":  # the padded length depends on TP: the same rows, padded for this TP
        padded = padded_vocab(sp.vocab_size, tp, int(ex.options.get("divisible_by", 128)))
        full = torch.cat([full[: sp.vocab_size], full.new_zeros(padded - sp.vocab_size, *full.shape[1:])])
    ranks = [split(r, sp, full, Shard(rank, tp)) for rank in range(tp)]
    for rank in range(tp):
        assert torch.equal(load(r, keys, sp, Shard(rank, tp), DictReader(hf), ex.expert), ranks[rank])
    assert torch.equal(gather(r, sp, ranks), full)
