"""The ``gated_fc1`` op (mapgen/ops/gated_fc1.py): layout, round trips, preconditions, and parity with
megatron-core's ``MLP`` forward and ``apply_swiglu_sharded_factory``.
"""

from __future__ import annotations

import pytest
import torch

from mapgen.ops import DictReader, PrimitiveError, Shard, gather, load

from .support import BATCH, FFN, SEQ, H, arange, assemble, assign, close, mcore_mlp, randomise, roundtrip, rule, spec


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


@pytest.mark.usefixtures("model_parallel")
@pytest.mark.parametrize(("fused", "tp"), [(False, 1), (False, 2), (True, 2)])
def test_gated_fc1_matches_megatron_mlp(fused: bool, tp: int) -> None:
    from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    hf = Qwen3MLP(Qwen3Config(hidden_size=H, intermediate_size=FFN))
    randomise(hf, 3)
    x = torch.randn(SEQ, BATCH, H, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf(x)
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if fused:
        sd = {
            "gate_up": torch.cat([sd["gate_proj.weight"], sd["up_proj.weight"]]),
            "down_proj.weight": sd["down_proj.weight"],
        }
    reader = DictReader(sd)
    keys = ["gate_up"] if fused else ["gate_proj.weight", "up_proj.weight"]
    total = torch.zeros_like(expected)
    for rank in range(tp):  # row-parallel linear_fc2: the rank outputs are summed (all-reduce)
        mlp = mcore_mlp(FFN // tp)
        shard = Shard(rank, tp)
        assign(
            mlp,
            {
                "linear_fc1.weight": load(rule("gated_fc1", "gated_column", fused=fused), keys, spec(), shard, reader),
                "linear_fc2.weight": load(rule("copy", "row"), ["down_proj.weight"], spec(), shard, reader),
            },
        )
        with torch.no_grad():
            total += mlp(x)[0]
    close(total, expected)


@pytest.mark.usefixtures("model_parallel")
@pytest.mark.parametrize("tp", [2, 4])
def test_gated_fc1_shards_match_megatron_swiglu_sharded_factory(tp: int) -> None:
    """mlp.py apply_swiglu_sharded_factory: rank r's [gate_r; up_r] is declared as global rows
    fragments r and r + tp of [gate; up]."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    gate, up = torch.arange(FFN * H).reshape(FFN, H).float(), -torch.arange(FFN * H).reshape(FFN, H).float()
    reader = DictReader({"g": gate, "u": up})
    r = rule("gated_fc1", "gated_column")
    shards = [load(r, ["g", "u"], spec(), Shard(rank, tp), reader) for rank in range(tp)]
    pieces = []
    for rank, local in enumerate(shards):
        sh = ShardedTensor.from_rank_offsets("fc1", local, (0, rank, tp))
        pieces += apply_swiglu_sharded_factory(sh, ()).build()
    declared = assemble(pieces)["fc1"]
    assert torch.equal(declared, torch.cat([gate, up]))
    assert torch.equal(declared, gather(r, spec(), shards))
