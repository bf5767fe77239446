"""The ``qkv`` op (mapgen/ops/qkv.py): layout, round trips, preconditions, and parity with megatron-core's
``SelfAttention.get_query_key_value_tensors`` on HF Qwen3 / Qwen3.5 (output gate) attention.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mapgen.ops import DictReader, PrimitiveError, Shard, gather, load

from .support import (
    BATCH,
    FFN,
    HEADS,
    HN,
    SEQ,
    H,
    arange,
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


def hf_attention(gate: bool, groups: int) -> torch.nn.Module:
    if gate:
        from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Attention

        cfg = Qwen3_5TextConfig(
            hidden_size=H,
            num_attention_heads=HEADS,
            num_key_value_heads=groups,
            head_dim=HN,
            intermediate_size=FFN,
            num_hidden_layers=1,
            layer_types=["full_attention"],
        )
        cfg._attn_implementation = "eager"
        module: torch.nn.Module = Qwen3_5Attention(cfg, 0)
    else:
        from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

        cfg = Qwen3Config(
            hidden_size=H,
            num_attention_heads=HEADS,
            num_key_value_heads=groups,
            head_dim=HN,
            intermediate_size=FFN,
            num_hidden_layers=1,
            attention_bias=True,
        )
        cfg._attn_implementation = "eager"
        module = Qwen3Attention(cfg, 0)
    randomise(module, 1)
    return module


def hf_qkv_gate(module: Any, x: torch.Tensor, gate: bool) -> dict[str, torch.Tensor]:
    """q, k (captured at the inputs of q_norm/k_norm, i.e. after HF's own split), v and the gate."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        module.q_norm.register_forward_pre_hook(lambda _m, args: seen.__setitem__("q", args[0])),
        module.k_norm.register_forward_pre_hook(lambda _m, args: seen.__setitem__("k", args[0])),
        module.v_proj.register_forward_hook(lambda _m, _a, out: seen.__setitem__("v", out)),
    ]
    cos = torch.ones(BATCH, SEQ, HN)
    sin = torch.zeros(BATCH, SEQ, HN)
    with torch.no_grad():
        module(x, position_embeddings=(cos, sin), attention_mask=None)
    for h in hooks:
        h.remove()
    out = {"q": seen["q"], "k": seen["k"], "v": seen["v"].view(BATCH, SEQ, -1, HN)}
    if gate:  # the other half of modeling_qwen3_5.py's torch.chunk(q_proj(x).view(..., -1, 2 * hn), 2, -1)
        out["gate"] = torch.chunk(module.q_proj(x).view(BATCH, SEQ, -1, 2 * HN), 2, dim=-1)[1].detach()
    return out


@pytest.mark.usefixtures("model_parallel")
@pytest.mark.parametrize(
    ("gate", "groups", "tp"), [(False, 2, 1), (False, 6, 2), (True, 2, 1), (True, 2, 2), (True, 3, 3)]
)
def test_qkv_matches_megatron_get_query_key_value_tensors(gate: bool, groups: int, tp: int) -> None:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    hf = hf_attention(gate, groups)
    x = torch.randn(BATCH, SEQ, H, generator=torch.Generator().manual_seed(2))
    expected = hf_qkv_gate(hf, x, gate)
    reader = hf_reader(hf)
    sp = spec(num_query_groups=groups)
    layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    heads_per_rank = HEADS // tp
    for rank in range(tp):
        cfg = mcore_config(
            num_attention_heads=heads_per_rank,
            num_query_groups=groups // tp,
            attention_output_gate=gate,
            add_qkv_bias=not gate,
        )
        attn = build_module(layer_spec.submodules.self_attention, config=cfg, layer_number=1)
        shard = Shard(rank, tp)
        tensors = {
            "linear_qkv.weight": load(
                rule("qkv", "qkv_groups", output_gate=gate),
                ["q_proj.weight", "k_proj.weight", "v_proj.weight"],
                sp,
                shard,
                reader,
            ),
            "linear_proj.weight": load(rule("copy", "row"), ["o_proj.weight"], sp, shard, reader),
        }
        if not gate:
            tensors["linear_qkv.bias"] = load(
                rule("qkv", "qkv_groups", part="bias"), ["q_proj.bias", "k_proj.bias", "v_proj.bias"], sp, shard, reader
            )
        assign(attn, tensors)
        with torch.no_grad():
            got = attn.get_query_key_value_tensors(x.transpose(0, 1), None, output_gate=gate)
        heads = slice(rank * heads_per_rank, (rank + 1) * heads_per_rank)
        kv = slice(rank * groups // tp, (rank + 1) * groups // tp)
        close(got[0].transpose(0, 1), expected["q"][:, :, heads])
        close(got[1].transpose(0, 1), expected["k"][:, :, kv])
        close(got[2].transpose(0, 1), expected["v"][:, :, kv])
        if gate:
            close(got[3].transpose(0, 1), expected["gate"][:, :, heads])
