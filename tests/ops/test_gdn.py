"""The ``gdn_in_proj`` and ``gdn_conv1d`` ops (mapgen/ops/gdn.py): layouts of both HF variants, preconditions, and
parity with megatron-core's ``GatedDeltaNet`` forward (on CPU) and its ``_split_tensor_factory``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mapgen.ops import DictReader, PrimitiveError, Shard, gather, load

from .support import (
    BATCH,
    DK,
    DV,
    KERNEL,
    NK,
    NV,
    SEQ,
    H,
    arange,
    assemble,
    assign,
    close,
    hf_reader,
    mcore_config,
    numel,
    randomise,
    roundtrip,
    rule,
    spec,
)


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


@pytest.fixture
def cpu_gdn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let megatron-core's GatedDeltaNet build and run on CPU: it refuses to build without
    flash-linear-attention and allocates on torch.cuda.current_device(). With deterministic_mode it runs
    its own torch_chunk_gated_delta_rule; l2norm is fla's formula x * rsqrt(sum(x^2) + 1e-6)."""
    import megatron.core.ssm.gated_delta_net as gdn

    monkeypatch.setattr(gdn, "HAVE_FLA", True)
    monkeypatch.setattr(
        gdn,
        "l2norm",
        lambda x, dim=-1, eps=1e-6: x * torch.rsqrt((x * x).sum(dim, keepdim=True) + eps),
        raising=False,  # only defined when fla imports
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")


def mcore_gdn(tp: int) -> Any:
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cfg = mcore_config(
        deterministic_mode=True,
        linear_num_key_heads=NK // tp,
        linear_num_value_heads=NV // tp,
        linear_key_head_dim=DK,
        linear_value_head_dim=DV,
        linear_conv_kernel_dim=KERNEL,
    )
    # get_gated_delta_net_module_spec with the local backend: column-parallel in_proj, RMSNorm, row out_proj
    submodules = GatedDeltaNetSubmodules(
        in_proj=ColumnParallelLinear, out_norm=WrappedTorchNorm, out_proj=RowParallelLinear
    )
    return GatedDeltaNet(cfg, submodules, layer_number=1, pg_collection=ProcessGroupCollection.use_mpu_process_groups())


def hf_gdn(variant: str) -> torch.nn.Module:
    common = {
        "hidden_size": H,
        "num_hidden_layers": 1,
        "layer_types": ["linear_attention"],
        "linear_num_key_heads": NK,
        "linear_num_value_heads": NV,
        "linear_key_head_dim": DK,
        "linear_value_head_dim": DV,
        "linear_conv_kernel_dim": KERNEL,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
    }
    module: torch.nn.Module
    if variant == "qkvz_ba":
        from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

        module = Qwen3NextGatedDeltaNet(Qwen3NextConfig(**common), 0)
    else:
        from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

        module = Qwen3_5GatedDeltaNet(Qwen3_5TextConfig(**common), 0)
    randomise(module, 9)
    with torch.no_grad():
        module.norm.weight.add_(1.0)
    return module


@pytest.mark.usefixtures("model_parallel", "cpu_gdn")
@pytest.mark.parametrize(("variant", "tp"), [("qkv_z_b_a", 1), ("qkv_z_b_a", 2), ("qkvz_ba", 1), ("qkvz_ba", 2)])
def test_gdn_matches_hf_forward(variant: str, tp: int) -> None:
    hf = hf_gdn(variant)
    reader = hf_reader(hf)
    x = torch.randn(BATCH, SEQ, H, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = hf(x)
    keys = (
        ["in_proj_qkvz.weight", "in_proj_ba.weight"]
        if variant == "qkvz_ba"
        else [
            "in_proj_qkv.weight",
            "in_proj_z.weight",
            "in_proj_b.weight",
            "in_proj_a.weight",
        ]
    )
    total = torch.zeros_like(expected)
    for rank in range(tp):
        shard = Shard(rank, tp)
        gdn = mcore_gdn(tp)
        assign(
            gdn,
            {
                "in_proj.weight": load(rule("gdn_in_proj", "gdn_heads", variant=variant), keys, spec(), shard, reader),
                "conv1d.weight": load(rule("gdn_conv1d", "gdn_heads"), ["conv1d.weight"], spec(), shard, reader),
                "A_log": load(rule("copy", "column"), ["A_log"], spec(), shard, reader),
                "dt_bias": load(rule("copy", "column"), ["dt_bias"], spec(), shard, reader),
                "out_norm.weight": load(rule("copy", "replicated"), ["norm.weight"], spec(), shard, reader),
                "out_proj.weight": load(rule("copy", "row"), ["out_proj.weight"], spec(), shard, reader),
            },
        )
        with torch.no_grad():
            total += gdn(x.transpose(0, 1), None)[0].transpose(0, 1)
    close(total, expected)


@pytest.mark.usefixtures("model_parallel")
@pytest.mark.parametrize("op", ["gdn_in_proj", "gdn_conv1d"])
def test_gdn_shards_match_megatron_split_tensor_factory(op: str) -> None:
    """gated_delta_net.py sharded_state_dict: in_proj / conv1d rank tensors split into per-component
    ShardedTensors (query, key, value[, z, beta, alpha]) each sharded over TP along dim 0."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.ssm.gated_delta_net import _split_tensor_factory

    tp = 2
    qk, v = NK * DK, NV * DV
    if op == "gdn_in_proj":
        tensors = {k: torch.randn(n, H) for k, n in [("qkv", 2 * qk + v), ("z", v), ("b", NV), ("a", NV)]}
        sizes, names = [qk, qk, v, v, NV, NV], ["query", "key", "value", "z", "beta", "alpha"]
    else:
        tensors = {"conv": torch.randn(2 * qk + v, 1, KERNEL)}
        sizes, names = [qk, qk, v], ["query", "key", "value"]
    r = rule(op, "gdn_heads")
    reader = DictReader(tensors)
    shards = [load(r, list(tensors), spec(), Shard(rank, tp), reader) for rank in range(tp)]
    pieces = []
    for rank, local in enumerate(shards):
        sh = ShardedTensor.from_rank_offsets("w", local, (0, rank, tp))
        pieces += _split_tensor_factory(sh, [s // tp for s in sizes], names, 0).build()
    declared = assemble(pieces)
    full = torch.cat([declared[f"w.{name}"] for name in names])
    assert torch.equal(full, gather(r, spec(), shards))
    assert torch.equal(full, load(r, list(tensors), spec(), Shard(0, 1), reader))
