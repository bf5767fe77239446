"""``mapgen verify``: what a conversion is proven to do on one checkpoint.

1. HF -> Megatron (at the requested parallel layout) -> HF, compared bitwise with the source: same key set,
   dtypes, tensors and shard assignment.
2. Logits parity with transformers (fp32) on a fixed batch where transformers implements the architecture
   as a causal LM: a round trip cannot catch a layout bug that is symmetric in both directions (e.g. a
   fused projection permuted the same way on import and export), a forward pass can.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mapgen.runtime.api import (
    HFSource,
    Parallel,
    _barrier,
    bind,
    check_parallel,
    compare_checkpoints,
    export_hf,
    load_hf,
    parallel_context,
    world_from_env,
)


def fixed_batch(vocab: int, *, batch: int = 2, seq: int = 11, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def transformers_logits(root: Path, input_ids: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """Logits from transformers' own implementation, or ``(None, reason)`` when it cannot run it."""
    import json

    config = json.loads((root / "config.json").read_text())
    archs = config.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in archs):
        return None, f"architectures {archs} is not a causal LM class transformers can run on its own"
    try:
        import transformers

        cls = getattr(transformers, archs[0], None)
        if cls is None:
            return None, f"transformers {transformers.__version__} has no {archs[0]}"
        model = cls.from_pretrained(str(root), dtype=torch.float32, attn_implementation="eager")
    except Exception as exc:  # noqa: BLE001 - report any failure to instantiate as a skip reason
        return None, f"transformers could not load it: {type(exc).__name__}: {exc}"
    model.eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=False)
    return out.logits.float(), ""


def verify(source_path: str, par: Parallel, *, logits: bool = True, atol: float = 1e-4) -> dict[str, Any]:
    """SPMD entry point. Every rank returns its own read statistics; rank 0 also the findings."""
    from mapgen.runtime.megatron import logits as megatron_logits

    source = HFSource.open(source_path)
    binding = bind(source.layout)
    check_parallel(binding.spec, par, world_from_env())
    with parallel_context(par) as coords:
        model, binding, stats = load_hf(source, par)
        tmp = Path(tempfile.mkdtemp(prefix="mapgen-verify-")) if coords.rank == 0 else Path()
        out = tmp / "hf"
        export_hf(model, binding, out, target=source.to_meta(), source_root=source.root)
        result: dict[str, Any] = {"rank": coords.rank, "bytes_read": stats.bytes_read, "tensors": stats.tensors}
        if coords.rank == 0:
            rt = compare_checkpoints(source.root, out)
            result.update(keys=rt.keys, mismatches=rt.mismatches)
            shutil.rmtree(tmp, ignore_errors=True)
        if logits:
            result["logits"] = _logits_parity(source, binding, model, par, coords.rank, atol, megatron_logits)
        _barrier()
    return result


def _logits_parity(source: HFSource, binding: Any, model: torch.nn.Module, par: Parallel, rank: int, atol: float,
                   megatron_logits: Any) -> dict[str, Any] | None:
    kinds = set(binding.spec.kinds)
    if par.pp > 1:
        return {"skipped": "logits are checked at PP=1 (the round trip covers PP)"}
    if "gated_delta_net" in kinds:
        return {"skipped": "megatron-core 0.16.1 runs gated delta-net only with its Triton kernels; these "
                "layers are proven by the bitwise round trip and the name/shape proof"}
    vocab = int(binding.spec.vocab_size)
    ids = fixed_batch(vocab)
    got = megatron_logits(model, ids)
    if rank != 0:
        return None
    want, reason = transformers_logits(source.root, ids)
    if want is None:
        return {"skipped": reason}
    got = got[..., :vocab].float()
    diff = float((got - want[..., :vocab]).abs().max())
    return {"max_abs": diff, "ok": diff <= atol}
