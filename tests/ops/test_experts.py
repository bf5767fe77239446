"""The ``expert_fc1`` and ``expert_fc2`` ops (mapgen/ops/experts.py): per-expert and packed layouts (both
orientations, interleaved gpt-oss), bytes read per rank, preconditions, and parity with HF Qwen3-MoE and gpt-oss
experts run as megatron-core MLPs.
"""

from __future__ import annotations

import pytest
import torch

from mapgen.ops import DictReader, Fragment, PrimitiveError, Shard, load, save

from .support import MOE_I, SEQ, E, H, arange, assign, close, hf_reader, mcore_mlp, randomise, roundtrip, rule, spec


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


@pytest.mark.usefixtures("model_parallel")
@pytest.mark.parametrize("etp", [1, 2])
def test_packed_experts_match_hf_qwen3_moe_experts(etp: int) -> None:
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    hf = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=MOE_I, num_experts=E))
    randomise(hf, 5)
    reader = hf_reader(hf)
    x = torch.randn(SEQ, H, generator=torch.Generator().manual_seed(6))
    for expert in (0, 3):
        with torch.no_grad():
            expected = hf(x, torch.full((SEQ, 1), expert), torch.ones(SEQ, 1))
        total = torch.zeros_like(expected)
        for rank in range(etp):
            mlp = mcore_mlp(MOE_I // etp)
            shard = Shard(rank, etp)
            fc1 = rule("expert_fc1", "expert_gated_column", experts=True, layout="packed")
            fc2 = rule("expert_fc2", "expert_row", experts=True, layout="packed")
            assign(
                mlp,
                {
                    "linear_fc1.weight": load(fc1, ["gate_up_proj"], spec(), shard, reader, expert),
                    "linear_fc2.weight": load(fc2, ["down_proj"], spec(), shard, reader, expert),
                },
            )
            with torch.no_grad():
                total += mlp(x)[0]
        close(total, expected)


@pytest.mark.usefixtures("model_parallel")
@pytest.mark.parametrize("etp", [1, 2])
def test_interleaved_in_out_experts_match_hf_gpt_oss(etp: int) -> None:
    """gpt-oss: gate_up_proj [E, H, 2I] with alternating gate/up columns, biases, clamped swiglu —
    megatron's MLP with quick_gelu, activation_func_clamp_value and glu_linear_offset=1."""
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(hidden_size=H, intermediate_size=MOE_I, num_local_experts=E)
    hf = GptOssExperts(cfg)
    randomise(hf, 7)
    reader = hf_reader(hf)
    x = torch.randn(SEQ, H, generator=torch.Generator().manual_seed(8))
    opts = {"layout": "packed", "orientation": "in_out"}
    expert = 2
    with torch.no_grad():
        expected = hf(x, torch.full((SEQ, 1), expert), torch.ones(SEQ, 1))
    total = torch.zeros_like(expected)
    for rank in range(etp):
        mlp = mcore_mlp(
            MOE_I // etp,
            add_bias_linear=True,
            activation_func=quick_gelu,
            activation_func_clamp_value=cfg.swiglu_limit,
            glu_linear_offset=1.0,
        )
        shard = Shard(rank, etp)
        fc1 = rule("expert_fc1", "expert_gated_column", experts=True, interleave=True, **opts)
        fc1_bias = rule("expert_fc1", "expert_gated_column", experts=True, interleave=True, part="bias", **opts)
        down_bias = load(
            rule("copy", "replicated", experts=True, layout="packed"), ["down_proj_bias"], spec(), shard, reader, expert
        )
        assign(
            mlp,
            {
                "linear_fc1.weight": load(fc1, ["gate_up_proj"], spec(), shard, reader, expert),
                "linear_fc1.bias": load(fc1_bias, ["gate_up_proj_bias"], spec(), shard, reader, expert),
                "linear_fc2.weight": load(
                    rule("expert_fc2", "expert_row", experts=True, **opts), ["down_proj"], spec(), shard, reader, expert
                ),
                # RowParallelLinear adds its (replicated) bias once, after the reduction
                "linear_fc2.bias": down_bias if rank == 0 else torch.zeros_like(down_bias),
            },
        )
        with torch.no_grad():
            out, bias = mlp(x)
        total += out if bias is None else out + bias
    close(total, expected)
