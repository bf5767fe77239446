"""The ``mtp_eh_proj`` op (mapgen/ops/eh_proj.py): both input orders, and parity with megatron-core's
``MultiTokenPredictionLayer._concat_embeddings``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mapgen.ops import DictReader, PrimitiveError, Shard, load

from .support import BATCH, SEQ, H, arange, assign, close, mcore_config, numel, randomise, roundtrip, rule, spec


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


@pytest.mark.usefixtures("model_parallel")
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
