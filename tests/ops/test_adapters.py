"""LoRA adapters follow the base op: a property test per op, on every weight example of ``test_inverse``.

For random ``W`` (per HF key), a shared ``A`` and per-key ``B`` (and, for fused ops, per-key ``A_i`` in the
rank-expanded block form), with integer-valued float64 tensors so every sum and product is exact:

* merged: ``op(W + s * B @ A) == op(W) + s * rows(B) @ cols(A)`` (``rows``/``cols``: the op's adapter maps);
* sharded: at every TP size the example allows, Megatron-Bridge's per-rank merge (column-parallel bases:
  ``W_r + s * B_r @ gather(A)``; row-parallel: ``W_r + s * gather(B) @ A_r``) equals the rank's slice of the
  merged weight, and ``adapter_gather(adapter_split(...))`` restores the full adapter;
* round trip: ``rows_back(rows(B)) == B`` and ``cols_back(cols(A)) == A``, bitwise.
"""

from __future__ import annotations

import pytest
import torch

from mapgen.lora.plan import block_form
from mapgen.ops import OPS, DictReader, Shard, load, shard_dim

from .support import rule, spec
from .test_inverse import EXAMPLES, Example

R = 4
SCALE = 2.0


def _adapter_examples() -> list[Example]:
    out = []
    for e in EXAMPLES:
        op = OPS[e.op]
        if not op.adapters or e.sharding == "vocab" or e.options.get("part", "weight") != "weight":
            continue
        if e.options.get("orientation") == "in_out":  # refused by the planner: no PEFT convention for it
            continue
        if e.options.get("leading_unit"):  # a [1, E] router bias stored as a matrix: no linear module, no adapter
            continue
        if any(len(s) - (1 if e.expert is not None and e.options.get("layout") == "packed" else 0) != 2
               for s in e.hf.values()):
            continue
        out.append(e)
    return out


ADAPTER_EXAMPLES = _adapter_examples()


def _ints(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-4, 5, shape, generator=gen).to(torch.float64)


def _packed(e: Example) -> bool:
    return e.expert is not None and e.options.get("layout") == "packed"


def _delta_shape(e: Example, shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[-2], shape[-1])


def test_every_adapter_op_has_an_example() -> None:
    assert {e.op for e in ADAPTER_EXAMPLES} == {name for name, op in OPS.items() if op.adapters}


@pytest.mark.parametrize(("ex", "form"), [pytest.param(e, f, id=f"{e.id}-{f}") for e in ADAPTER_EXAMPLES
                                          for f in ("shared", "block") if f == "shared" or len(e.hf) > 1])
def test_adapter_follows_the_op(ex: Example, form: str) -> None:
    """``block``: separate HF modules with different A (fused ops only: one HF module has one A)."""
    gen = torch.Generator().manual_seed(7)
    r = rule(ex.op, ex.sharding, experts=ex.expert is not None, **ex.options)
    sp = spec(**ex.spec)
    op = OPS[ex.op]
    keys = list(ex.hf)
    ctx = op.context(r, keys, sp, ex.expert)
    weights = {k: _ints(*s, gen=gen) for k, s in ex.hf.items()}
    lead = (ex.expert,) if _packed(ex) else ()
    n_in = _delta_shape(ex, next(iter(ex.hf.values())))[1]
    shared_a = _ints(R, n_in, gen=gen)
    a_hf = {k: (shared_a if form == "shared" else _ints(R, n_in, gen=gen)) for k in keys}
    b_hf = {k: _ints(_delta_shape(ex, s)[0], R, gen=gen) for k, s in ex.hf.items()}

    merged = {k: w.clone() for k, w in weights.items()}
    for k in keys:
        merged[k][lead] += SCALE * b_hf[k] @ a_hf[k]

    def stack(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:  # B in a packed key's expert slot
        if not lead:
            return x
        out = torch.zeros((shape[0], *x.shape), dtype=x.dtype)
        out[lead] = x
        return out

    if form == "shared":
        b_list = [stack(b_hf[k], ex.hf[k]) for k in keys]
        a_src = shared_a
    else:
        blocks, a_cat = block_form([b_hf[k] for k in keys], [a_hf[k] for k in keys])
        b_list = [stack(b, ex.hf[k]) for b, k in zip(blocks, keys, strict=True)]
        a_src = a_cat
    a_meg = op.adapter_cols(ctx, a_src)
    b_meg = op.adapter_rows(ctx, b_list)

    want = load(r, keys, sp, Shard(0, 1), DictReader(merged), ex.expert)
    base = load(r, keys, sp, Shard(0, 1), DictReader(weights), ex.expert)
    assert torch.equal(base + SCALE * b_meg @ a_meg, want)

    # round trip, bitwise
    back = op.adapter_rows_back(ctx, b_meg)
    assert all(torch.equal(x, y[lead] if lead else y) for x, y in zip(back, b_list, strict=True))
    assert torch.equal(op.adapter_cols_back(ctx, a_meg), a_src)

    for tp in ex.tps:
        if a_meg.shape[0] % tp and shard_dim(r) == 0:
            continue
        shards = [Shard(rank, tp) for rank in range(tp)]
        pieces = [op.adapter_split(ctx, a_meg, b_meg, s) for s in shards]
        full_in, full_out = op.adapter_gather(ctx, [p[0] for p in pieces], [p[1] for p in pieces])
        assert torch.equal(full_in, a_meg)
        assert torch.equal(full_out, b_meg)
        for s, (lin, lout) in zip(shards, pieces, strict=True):
            w_r = load(r, keys, sp, s, DictReader(weights), ex.expert)
            if shard_dim(r) == 0:
                got = w_r + SCALE * lout @ full_in
            elif shard_dim(r) == 1:
                got = w_r + SCALE * full_out @ lin
            else:
                got = w_r + SCALE * lout @ lin
            assert torch.equal(got, load(r, keys, sp, s, DictReader(merged), ex.expert)), (tp, s.rank)
