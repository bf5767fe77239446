"""mapgen.runtime.megatron: building, names, parallel layouts, forward and dist checkpoints on CPU."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch

from mapgen.contract.spec import ModelSpec
from mapgen.runtime import megatron as M

warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

DENSE = ModelSpec(
    num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
    ffn_hidden_size=64, vocab_size=96, qk_layernorm=True, norm_epsilon=1e-6,
)
MOE = ModelSpec(
    num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
    ffn_hidden_size=64, vocab_size=96, qk_layernorm=True, mlp_kinds=("dense", "moe"),
    num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
    moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True, moe_router_enable_expert_bias=True,
)
HYBRID = ModelSpec(
    num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
    ffn_hidden_size=64, vocab_size=96, qk_layernorm=True, attention_output_gate=True,
    layer_kinds=("gated_delta_net", "gated_delta_net", "gated_delta_net", "attention"),
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_conv_kernel_dim=4, layernorm_zero_centered_gamma=True,
    num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
    moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=True,
    mtp_num_layers=1, mtp_layer_kind="attention", mtp_mlp_kind="moe",
)
MTP_DENSE_IN_MOE = MOE.replace(mlp_kinds=("moe", "moe"), mtp_num_layers=2, mtp_mlp_kind="dense")
QWEN3_30B_A3B = ModelSpec(
    num_layers=48, hidden_size=2048, num_attention_heads=32, num_query_groups=4, kv_channels=128,
    ffn_hidden_size=6144, vocab_size=151936, qk_layernorm=True, num_moe_experts=128, moe_router_topk=8,
    moe_ffn_hidden_size=768, mtp_num_layers=1, mtp_mlp_kind="moe", max_position_embeddings=40960,
)

ATTN = {
    "input_layernorm.weight": (32,),
    "self_attention.linear_qkv.weight": (64, 32),
    "self_attention.linear_proj.weight": (32, 32),
    "self_attention.q_layernorm.weight": (8,),
    "self_attention.k_layernorm.weight": (8,),
    "pre_mlp_layernorm.weight": (32,),
}
DENSE_MLP = {"mlp.linear_fc1.weight": (128, 32), "mlp.linear_fc2.weight": (32, 64)}


def _moe_mlp(e: int, ffn: int, shared: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"mlp.router.weight": (e, 32)}
    for i in range(e):
        out[f"mlp.experts.local_experts.{i}.linear_fc1.weight"] = (2 * ffn, 32)
        out[f"mlp.experts.local_experts.{i}.linear_fc2.weight"] = (32, ffn)
    out["mlp.shared_experts.gate_weight"] = (1, 32)
    out["mlp.shared_experts.linear_fc1.weight"] = (2 * shared, 32)
    out["mlp.shared_experts.linear_fc2.weight"] = (32, shared)
    return out


def _prefixed(prefix: str, d: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": v for k, v in d.items()}


# -- building and name sets ------------------------------------------------------------------------------


def test_dense_qwen3_like_names():
    got = M.enumerate_parameters(DENSE)
    want = {"embedding.word_embeddings.weight": (96, 32), "decoder.final_layernorm.weight": (32,),
            "output_layer.weight": (96, 32)}
    for i in range(2):
        want |= _prefixed(f"decoder.layers.{i}", ATTN | DENSE_MLP)
    assert got == want


def test_tied_embeddings_have_no_output_layer():
    got = M.enumerate_parameters(DENSE.replace(untie_embeddings_and_output_weights=False))
    assert "output_layer.weight" not in got
    assert "embedding.word_embeddings.weight" in got


def test_moe_shared_expert_gate_and_expert_bias_names():
    got = M.enumerate_parameters(MOE)
    want = {"embedding.word_embeddings.weight": (96, 32), "decoder.final_layernorm.weight": (32,),
            "output_layer.weight": (96, 32)}
    want |= _prefixed("decoder.layers.0", ATTN | DENSE_MLP)
    want |= _prefixed("decoder.layers.1", ATTN | _moe_mlp(4, 16, 32) | {"mlp.router.expert_bias": (4,)})
    assert got == want


def test_hybrid_gdn_attention_gate_names():
    got = M.enumerate_parameters(HYBRID)
    gdn = {
        "self_attention.in_proj.weight": (2 * 16 + 2 * 32 + 2 * 4, 32),
        "self_attention.in_proj.layer_norm_weight": (32,),
        "self_attention.conv1d.weight": (2 * 16 + 32, 1, 4),
        "self_attention.A_log": (4,),
        "self_attention.dt_bias": (4,),
        "self_attention.out_norm.weight": (8,),
        "self_attention.out_proj.weight": (32, 32),
        "pre_mlp_layernorm.weight": (32,),
    }
    gated_attn = ATTN | {"self_attention.linear_qkv.weight": (96, 32)}  # q, gate, k, v
    moe = _moe_mlp(4, 16, 16)
    for i in range(3):
        assert {k: v for k, v in got.items() if k.startswith(f"decoder.layers.{i}.")} == _prefixed(
            f"decoder.layers.{i}", gdn | moe)
    assert {k: v for k, v in got.items() if k.startswith("decoder.layers.3.")} == _prefixed(
        "decoder.layers.3", gated_attn | moe)
    mtp = {k: v for k, v in got.items() if k.startswith("mtp.")}
    assert mtp == _prefixed("mtp.layers.0", {"enorm.weight": (32,), "hnorm.weight": (32,),
                                             "eh_proj.weight": (32, 64), "final_layernorm.weight": (32,)}
                            | _prefixed("transformer_layer", gated_attn | moe))


def test_mtp_depth2_dense_inner_layer_under_moe_decoder():
    got = M.enumerate_parameters(MTP_DENSE_IN_MOE)
    for d in range(2):
        inner = {k[len(f"mtp.layers.{d}.transformer_layer."):]: v for k, v in got.items()
                 if k.startswith(f"mtp.layers.{d}.transformer_layer.")}
        assert inner == ATTN | DENSE_MLP
    assert {"decoder.layers.0.mlp.router.weight", "decoder.layers.1.mlp.router.weight"} <= got.keys()
    assert "mtp.layers.2.enorm.weight" not in got


def test_meta_and_cpu_builds_agree_and_dtypes():
    names = M.enumerate_parameters(HYBRID)
    with M.parallel():
        model = M.build_model(HYBRID, device="cpu", params_dtype=torch.bfloat16)
        sd = M._checkpoint_entries(model)
    assert {k: tuple(v.shape) for k, v in sd.items()} == names
    assert all(v.device.type == "cpu" for v in sd.values())
    assert sd["decoder.layers.0.mlp.router.weight"].dtype == torch.bfloat16  # cast to params_dtype
    assert sd["decoder.layers.0.mlp.shared_experts.gate_weight"].dtype == torch.bfloat16
    assert sd["decoder.layers.0.self_attention.A_log"].dtype == torch.bfloat16
    assert torch.count_nonzero(sd["decoder.final_layernorm.weight"].float()) == 0  # zero-centred gamma
    with M.parallel():
        sd = M._checkpoint_entries(M.build_model(MOE, device="meta", params_dtype=torch.bfloat16))
    assert sd["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.float32  # fp32 buffer


def test_enumerate_big_spec_is_fast():
    t = time.perf_counter()
    got = M.enumerate_parameters(QWEN3_30B_A3B)
    elapsed = time.perf_counter() - t
    total = sum(torch.Size(s).numel() for s in got.values())
    assert 30e9 < total < 32e9
    assert got["decoder.layers.47.mlp.experts.local_experts.127.linear_fc1.weight"] == (1536, 2048)
    assert elapsed < 15, elapsed


def test_enumerate_restores_state():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    M.enumerate_parameters(DENSE)
    assert not dist.is_initialized()
    assert not ps.model_parallel_is_initialized()
    assert torch.cuda.current_device is torch.cuda.__dict__["current_device"]
    with M.parallel():
        M.enumerate_parameters(DENSE)  # reuses the TP=1 state
        assert ps.model_parallel_is_initialized()


def test_one_parallel_layout_type_and_its_two_contexts():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mapgen.runtime import api, layout
    from mapgen.runtime.engine import Coords

    Parallel = layout.Parallel
    assert api.Parallel is Parallel  # the public name
    assert (Parallel(tp=2).etp_size, Parallel(tp=2, ep=2).etp_size, Parallel(tp=2, ep=2, etp=2).etp_size) == (2, 1, 2)
    assert (Parallel(tp=2, ep=4, etp=1, pp=2).minimal_world, Parallel(tp=2, ep=3, etp=1).minimal_world) == (8, 6)
    assert Parallel(tp=2, ep=2, pp=2).describe() == "TP=2 EP=2 ETP=1 PP=2"
    assert not dist.is_initialized()
    assert Parallel.current() == Parallel(etp=1)  # no state: all 1, etp resolved
    try:
        with M.parallel() as resolved:
            assert resolved == Parallel.current() == Parallel(etp=1)
            assert Coords.current() == Coords()
        assert not dist.is_initialized()  # megatron.parallel drops the group init_parallel created
        with api.parallel_context(Parallel()) as coords:
            assert coords == Coords()
            assert Parallel.current() == Parallel(etp=1)
        assert dist.is_initialized()  # parallel_context keeps the group for the next layout
        assert not ps.model_parallel_is_initialized()
    finally:
        M.destroy_parallel()
    assert not dist.is_initialized()


def test_cpu_shims_nest_and_restore():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    orig = torch.cuda.current_device
    with M.cpu_shims():
        assert torch.cuda.current_device() == "cpu"
        with M.cpu_shims(), torch.device("meta"):
            assert torch.cuda.current_device() == "meta"
        assert torch.cuda.current_device() == "cpu"
        torch.cuda.synchronize()
        with get_cuda_rng_tracker().fork():
            pass
    assert torch.cuda.current_device is orig


def test_mtp_inner_name_probe():
    assert M.mtp_inner_name() == "transformer_layer"


# -- divisibility ----------------------------------------------------------------------------------------


def test_divisibility_lists_every_violation():
    spec = HYBRID.replace(num_layers=3, layer_kinds=("gated_delta_net",) * 2 + ("attention",),
                          num_attention_heads=6, num_query_groups=3, linear_num_key_heads=3,
                          linear_num_value_heads=6, num_moe_experts=6, moe_ffn_hidden_size=18,
                          moe_shared_expert_intermediate_size=18, ffn_hidden_size=66, vocab_size=97)
    errors = M.check_divisibility(spec, tp=4, ep=4, etp=4, pp=2, world_size=12)
    text = "\n".join(errors)
    for field in ("num_attention_heads", "num_query_groups", "linear_num_key_heads", "linear_num_value_heads",
                  "num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                  "ffn_hidden_size", "num_layers", "tp*pp", "etp*ep*pp"):
        assert field in text, field
    assert "vocab" not in text
    assert M.check_divisibility(HYBRID, tp=2, ep=2, etp=1, pp=2, world_size=4) == []
    assert M.padded_vocab_size(97, 4) == 100
    with pytest.raises(ValueError, match="num_layers=3 is not divisible by pp=2"):
        M.init_parallel(pp=2, spec=spec)


# -- name translation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["transformer_layer", "mtp_model_layer"])
def test_te_local_translation(inner):
    d, m = "decoder.layers.3", f"mtp.layers.1.{inner}"
    pairs = [
        (f"{d}.input_layernorm.weight", f"{d}.self_attention.linear_qkv.layer_norm_weight"),
        (f"{d}.pre_mlp_layernorm.weight", f"{d}.mlp.linear_fc1.layer_norm_weight"),
        (f"{d}.mlp.experts.local_experts.7.linear_fc1.weight", f"{d}.mlp.experts.linear_fc1.weight7"),
        (f"{d}.mlp.experts.local_experts.12.linear_fc2.weight", f"{d}.mlp.experts.linear_fc2.weight12"),
        (f"{m}.input_layernorm.weight", f"{m}.self_attention.linear_qkv.layer_norm_weight"),
        (f"{m}.pre_mlp_layernorm.weight", f"{m}.mlp.linear_fc1.layer_norm_weight"),
        (f"{m}.mlp.experts.local_experts.0.linear_fc2.weight", f"{m}.mlp.experts.linear_fc2.weight0"),
        (f"{m}.mlp.experts.local_experts.0.linear_fc1.bias", f"{m}.mlp.experts.linear_fc1.bias0"),
        (f"{d}.self_attention.in_proj.layer_norm_weight", f"{d}.self_attention.in_proj.layer_norm_weight"),
        ("mtp.layers.0.enorm.weight", "mtp.layers.0.enorm.weight"),
        ("decoder.final_layernorm.weight", "decoder.final_layernorm.weight"),
    ]
    for local, te in pairs:
        assert M.local_to_te_name(local) == te
        assert M.te_to_local_name(te) == local
    # MoE layers keep pre_mlp_layernorm in TE builds: decided from the name set.
    moe_layer = [f"mtp.layers.0.{inner}.pre_mlp_layernorm.weight", f"mtp.layers.0.{inner}.mlp.router.weight",
                 "decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.1.mlp.linear_fc1.weight"]
    te = M.local_to_te_names(moe_layer)
    assert te[moe_layer[0]] == moe_layer[0]
    assert te[moe_layer[2]] == "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"
    assert M.local_to_te_name(moe_layer[0], dense_mlp=False) == moe_layer[0]
    assert M.te_to_local_names(te.values()) == {v: k for k, v in te.items()}
    # MTP inner spellings.
    names = [f"mtp.layers.0.{inner}.mlp.linear_fc1.weight", "mtp.layers.0.eh_proj.weight",
             "decoder.layers.0.mlp.linear_fc1.weight"]
    assert M.detect_mtp_inner_name(names) == inner
    other = "mtp_model_layer" if inner == "transformer_layer" else "transformer_layer"
    assert M.rename_mtp_inner(names[0], other) == f"mtp.layers.0.{other}.mlp.linear_fc1.weight"
    assert M.rename_mtp_inner(names[1], other) == names[1]


def test_detect_mtp_inner_name_edge_cases():
    assert M.detect_mtp_inner_name(["decoder.layers.0.mlp.linear_fc1.weight"]) is None
    with pytest.raises(ValueError, match="ambiguous"):
        M.detect_mtp_inner_name(["mtp.layers.0.transformer_layer.a.w", "mtp.layers.0.mtp_model_layer.a.w"])


def test_local_translation_round_trips_a_real_name_set():
    names = list(M.enumerate_parameters(MTP_DENSE_IN_MOE))
    te = M.local_to_te_names(names)
    assert len(set(te.values())) == len(names)
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in te.values()  # MoE layer
    assert "mtp.layers.0.transformer_layer.mlp.linear_fc1.layer_norm_weight" in te.values()  # dense inner
    assert M.te_to_local_names(te.values()) == {v: k for k, v in te.items()}


# -- forward ---------------------------------------------------------------------------------------------


def test_cpu_forward_tp1_all_families():
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with M.parallel():
        for spec in (DENSE, MOE, HYBRID, MTP_DENSE_IN_MOE):
            model = M.build_model(spec, device="cpu")
            out = M.logits(model, ids)
            assert out.shape == (2, 9, 96)
            assert out.dtype == torch.float32
            assert torch.isfinite(out).all()
            assert model.config.mtp_num_layers == (spec.mtp_num_layers or None)  # restored
            # causal: changing the last token leaves earlier positions alone
            ids2 = ids.clone()
            ids2[:, -1] = (ids2[:, -1] + 1) % 96
            assert torch.allclose(M.logits(model, ids2)[:, :-1], out[:, :-1], atol=1e-6)


# -- two processes ---------------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    warnings.filterwarnings("ignore")
    import faulthandler

    import torch.distributed as dist

    faulthandler.dump_traceback_later(120, exit=True)  # a hung collective fails the test instead of hanging

    out = Path(out_dir)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    result: dict[str, object] = {}
    # TP=2, EP=2, ETP=1: names, forward, dist checkpoint.
    M.init_parallel(tp=2, ep=2, etp=1, spec=HYBRID)
    for tag, spec in (("hybrid", HYBRID), ("moe", MTP_DENSE_IN_MOE)):
        model = M.build_model(spec, device="meta")
        names = M.local_to_global(model)
        entries = M._checkpoint_entries(model)
        shapes = {g: tuple(entries[k].shape) for k, g in names.items()}
        result[f"{tag}_tp2ep2"] = {"globals": sorted(names.values()), "local_shapes": shapes,
                                   "n_local": len(names)}
    model = M.build_model(HYBRID, device="cpu")
    result["logits_tp2"] = M.logits(model, ids).tolist()
    M.save_dist_checkpoint(model, out / "ckpt")
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
               out / f"shard{rank}.pt")
    # PP=2 (tied embeddings; MTP on the last stage); replaces the model-parallel state, keeps the group.
    M.init_parallel(pp=2)
    tied = MTP_DENSE_IN_MOE.replace(untie_embeddings_and_output_weights=False)
    model = M.build_model(tied, device="meta")
    result["pp2"] = sorted(M.local_to_global(model).items())
    model = M.build_model(tied, device="cpu")  # the last stage's embedding copies are synced from stage 0
    shared = model.shared_embedding_or_output_weight()
    torch.save(shared.detach().clone(), out / f"pp_shared{rank}.pt")
    M.destroy_parallel()
    assert not dist.is_initialized()
    (out / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.distributed
def test_two_processes_tp2_ep2_pp2_forward_and_dist_checkpoint(tmp_path):
    import torch.multiprocessing as mp

    port = M.free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    # local_to_global covers the global name set exactly, unioned over ranks
    for tag, spec in (("hybrid", HYBRID), ("moe", MTP_DENSE_IN_MOE)):
        want = M.enumerate_parameters(spec)
        union = set(ranks[0][f"{tag}_tp2ep2"]["globals"]) | set(ranks[1][f"{tag}_tp2ep2"]["globals"])
        assert union == set(want), tag
        for r in ranks:
            assert r[f"{tag}_tp2ep2"]["n_local"] == len(set(r[f"{tag}_tp2ep2"]["globals"]))
        # EP=2: each rank holds 2 of the 4 experts, under their global ids
        e0 = {g for g in ranks[0][f"{tag}_tp2ep2"]["globals"] if "local_experts" in g}
        e1 = {g for g in ranks[1][f"{tag}_tp2ep2"]["globals"] if "local_experts" in g}
        assert e0.isdisjoint(e1)
    shapes = ranks[0]["hybrid_tp2ep2"]["local_shapes"]
    assert shapes["decoder.layers.0.self_attention.in_proj.weight"] == [52, 32]
    assert shapes["decoder.layers.0.self_attention.A_log"] == [2]
    assert shapes["mtp.layers.0.eh_proj.weight"] == [16, 64]  # column-parallel
    assert shapes["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"] == [32, 32]  # ETP=1
    pp_names = [dict(r["pp2"]) for r in ranks]
    assert set(pp_names[0].values()) | set(pp_names[1].values()) == set(
        M.enumerate_parameters(MTP_DENSE_IN_MOE.replace(untie_embeddings_and_output_weights=False)))
    assert pp_names[1]["decoder.layers.0.input_layernorm.weight"] == "decoder.layers.1.input_layernorm.weight"
    assert pp_names[1]["output_layer.weight"] == "embedding.word_embeddings.weight"
    assert pp_names[1]["embedding.word_embeddings.weight"] == "embedding.word_embeddings.weight"  # for MTP
    pp_shared = [torch.load(tmp_path / f"pp_shared{r}.pt") for r in range(2)]
    assert torch.equal(pp_shared[0], pp_shared[1])
    assert pp_shared[0].abs().sum() > 0

    # TP=2/EP=2 checkpoint resharded into TP=1 in this process: same logits, GDN layout as documented
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with M.parallel():
        model = M.build_model(HYBRID, device="cpu")
        M.load_dist_checkpoint(model, tmp_path / "ckpt")
        ref = M.logits(model, ids)
        full = model.state_dict()
    assert torch.allclose(ref, torch.tensor(ranks[0]["logits_tp2"]), atol=1e-5, rtol=0)
    assert torch.allclose(ref, torch.tensor(ranks[1]["logits_tp2"]), atol=1e-5, rtol=0)
    w = full["decoder.layers.0.self_attention.in_proj.weight"]
    blocks = torch.split(w, [16, 16, 32, 32, 4, 4])  # q, k, v, z, b, a
    conv = torch.split(full["decoder.layers.0.self_attention.conv1d.weight"], [16, 16, 32])
    for r in range(2):
        shard = torch.load(tmp_path / f"shard{r}.pt")
        want = torch.cat([b.chunk(2)[r] for b in blocks])
        assert torch.equal(shard["decoder.layers.0.self_attention.in_proj.weight"], want)
        assert torch.equal(shard["decoder.layers.0.self_attention.conv1d.weight"],
                           torch.cat([c.chunk(2)[r] for c in conv]))
        assert torch.equal(shard["decoder.layers.0.self_attention.A_log"],
                           full["decoder.layers.0.self_attention.A_log"].chunk(2)[r])
        assert torch.equal(shard["mtp.layers.0.eh_proj.weight"], full["mtp.layers.0.eh_proj.weight"].chunk(2)[r])
        # gated fc1 under TP: rank r holds [gate_r; up_r]; qkv (grouped per query group) and vocab: row chunks
        fc1 = "decoder.layers.1.mlp.shared_experts.linear_fc1.weight"
        gate, up = full[fc1].chunk(2)
        assert torch.equal(shard[fc1], torch.cat([gate.chunk(2)[r], up.chunk(2)[r]]))
        for name, dim in (("decoder.layers.3.self_attention.linear_qkv.weight", 0),
                          ("decoder.layers.3.self_attention.linear_proj.weight", 1),
                          ("decoder.layers.0.self_attention.out_proj.weight", 1),
                          ("output_layer.weight", 0), ("embedding.word_embeddings.weight", 0)):
            assert torch.equal(shard[name], full[name].chunk(2, dim=dim)[r]), name
        for name in ("decoder.layers.0.self_attention.in_proj.layer_norm_weight",
                     "decoder.layers.0.self_attention.out_norm.weight", "decoder.layers.0.mlp.router.weight",
                     "decoder.layers.0.mlp.shared_experts.gate_weight"):
            assert torch.equal(shard[name], full[name]), name  # replicated
        # EP=2, ETP=1: rank r holds experts 2r, 2r+1 whole, under local indices 0, 1
        for j in range(2):
            e = "decoder.layers.2.mlp.experts.local_experts.{}.linear_fc2.weight"
            assert torch.equal(shard[e.format(j)], full[e.format(2 * r + j)])
