"""The primitives' layouts checked against megatron-core's own forward code and sharded_state_dict.

HF modules from transformers and megatron-core modules are built on CPU, the HF weights are converted with
:mod:`mapgen.runtime.primitives` and both sides must compute the same projections. TP=2 is emulated without
a second process: a rank of a TP=t megatron module holds exactly the tensors of a TP=1 module built with
``1/t`` of the heads / groups / ffn (that is how megatron sizes its ``*_per_partition`` attributes), so rank
``r``'s shard is loaded into such a module and its output compared with HF's heads of rank ``r`` (column
parallel) or summed over ranks (row parallel). The declared global layout of TP shards is checked by
running megatron's ``sharded_state_dict`` factories on the per-rank tensors.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mapgen.contract.rules import Rule
from mapgen.contract.spec import ModelSpec
from mapgen.runtime.primitives import DictReader, Shard, gather, load

H, HEADS, HN, FFN = 48, 6, 8, 40
NK, NV, DK, DV, KERNEL = 2, 4, 8, 6, 4
E, MOE_I = 4, 20
SEQ, BATCH = 5, 2


@pytest.fixture(scope="module", autouse=True)
def _model_parallel() -> Iterator[None]:
    """A one-process gloo group and megatron's model-parallel state at TP=PP=1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    initialised = not parallel_state.model_parallel_is_initialized()
    if initialised:
        parallel_state.initialize_model_parallel(1, 1)
    yield
    if initialised:
        parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def rule(op: str, sharding: str, *, experts: bool = False, **options: object) -> Rule:
    return Rule("test", "m", (), op, sharding, experts=experts, options=tuple(sorted(options.items())))  # type: ignore[arg-type]


def spec(**changes: Any) -> ModelSpec:
    base = ModelSpec(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=HEADS,
        num_query_groups=2,
        kv_channels=HN,
        ffn_hidden_size=FFN,
        vocab_size=64,
        linear_num_key_heads=NK,
        linear_num_value_heads=NV,
        linear_key_head_dim=DK,
        linear_value_head_dim=DV,
    )
    return base.replace(**changes)


def mcore_config(**changes: Any) -> Any:
    from megatron.core.transformer import TransformerConfig

    kwargs: dict[str, Any] = {
        "num_layers": 1,
        "hidden_size": H,
        "num_attention_heads": HEADS,
        "num_query_groups": 2,
        "kv_channels": HN,
        "ffn_hidden_size": FFN,
        "use_cpu_initialization": True,
        "perform_initialization": False,
        "normalization": "RMSNorm",
        "layernorm_epsilon": 1e-6,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "bias_activation_fusion": False,
        "add_bias_linear": False,
    }
    kwargs.update(changes)
    return TransformerConfig(**kwargs)


def randomise(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def hf_reader(module: torch.nn.Module, prefix: str = "") -> DictReader:
    return DictReader({prefix + k: v.detach().clone() for k, v in module.state_dict().items()})


def assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    assert set(params) == set(tensors), (sorted(params), sorted(tensors))
    with torch.no_grad():
        for name, value in tensors.items():
            assert params[name].shape == value.shape, name
            params[name].copy_(value)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- attention -------------------------------------------------------------------------------------------


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


# -- dense MLP -------------------------------------------------------------------------------------------


def mcore_mlp(ffn: int, **changes: Any) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    cfg = mcore_config(ffn_hidden_size=ffn, **changes)
    return build_module(get_gpt_layer_local_spec(normalization="RMSNorm").submodules.mlp, config=cfg)


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


def assemble(pieces: list[Any]) -> dict[str, torch.Tensor]:
    """Place megatron ShardedTensors (from every rank) into their declared global tensors, per key."""
    out: dict[str, torch.Tensor] = {}
    for piece in pieces:
        full = out.setdefault(piece.key, torch.full(piece.global_shape, float("nan")))
        index = tuple(slice(o, o + s) for o, s in zip(piece.global_offset, piece.local_shape, strict=True))
        full[index] = piece.data
    for key, full in out.items():
        assert not full.isnan().any(), f"{key} is not covered by the shards"
    return out


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


# -- experts ---------------------------------------------------------------------------------------------


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


# -- gated delta net -------------------------------------------------------------------------------------


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


@pytest.mark.usefixtures("cpu_gdn")
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


# -- MTP -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["embedding_hidden", "hidden_embedding"])
def test_mtp_eh_proj_matches_megatron_concat_embeddings(order: str) -> None:
    """multi_token_prediction.py _concat_embeddings: eh_proj(cat(enorm(embedding), hnorm(hidden))).
    DeepSeek-V3 stores eh_proj in that order; MiMo's input_proj takes cat(hidden, embedding)
    (XiaomiMiMo/MiMo modeling_mimo.py MiMoMTPLayers)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer

    hf_proj = torch.nn.Linear(2 * H, H, bias=False)
    randomise(hf_proj, 11)
    hidden = torch.randn(SEQ, BATCH, H)
    embedding = torch.randn(SEQ, BATCH, H)
    with torch.no_grad():
        pair = (hidden, embedding) if order == "hidden_embedding" else (embedding, hidden)
        expected = hf_proj(torch.cat(pair, dim=-1))
    cfg = mcore_config()
    eh_proj = ColumnParallelLinear(2 * H, H, config=cfg, init_method=cfg.init_method, gather_output=False, bias=False)
    reader = DictReader({"eh": hf_proj.weight.detach().clone()})
    assign(eh_proj, {"weight": load(rule("mtp_eh_proj", "column", order=order), ["eh"], spec(), Shard(0, 1), reader)})
    fake = SimpleNamespace(
        enorm=torch.nn.Identity(), hnorm=torch.nn.Identity(), eh_proj=eh_proj, sequence_parallel=False
    )
    with torch.no_grad():
        got = MultiTokenPredictionLayer._concat_embeddings(fake, hidden, embedding)  # type: ignore[arg-type]
    close(got, expected)
