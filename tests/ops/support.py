"""Shared helpers of the op tests: dimensions, rules and specs, distinct tensors, the round-trip check, and the
megatron-core / transformers helpers of the parity tests (megatron-core is imported lazily).

Tensors are ``torch.arange`` so that every element is distinct and comparisons are exact (``torch.equal``).
Dimensions are deliberately non-square: hidden 48, 6 heads in 2 or 3 groups, head_dim 8, ffn 40.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mapgen.contract.rules import Rule
from mapgen.contract.spec import ModelSpec
from mapgen.ops import DictReader, Shard, gather, load, save, split

H, HEADS, HN, FFN, VOCAB = 48, 6, 8, 40, 100
NK, NV, DK, DV, KERNEL = 2, 4, 8, 6, 4  # GDN key heads, value heads, key/value head dims, conv kernel
E, MOE_I = 4, 20  # experts, expert intermediate size
SEQ, BATCH = 5, 2


def spec(**changes: Any) -> ModelSpec:
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


# -- megatron-core / transformers parity helpers ---------------------------------------------------------


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


def mcore_mlp(ffn: int, **changes: Any) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    cfg = mcore_config(ffn_hidden_size=ffn, **changes)
    return build_module(get_gpt_layer_local_spec(normalization="RMSNorm").submodules.mlp, config=cfg)


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
