"""``mapgen verify``: what a conversion is proven to do on one checkpoint.

1. HF -> Megatron (at the requested parallel layout) -> HF, compared bitwise with the source: same key set,
   dtypes, tensors and shard assignment.
2. Logits parity with transformers (fp32) on a fixed batch where transformers implements the architecture
   as a causal LM: a round trip cannot catch a layout bug that is symmetric in both directions (e.g. a
   fused projection permuted the same way on import and export), a forward pass can.
"""

from __future__ import annotations

import json
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
    bridge_for,
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
    """Logits from transformers' own causal-LM implementation of this config, or ``(None, reason)``.

    ``AutoModelForCausalLM`` picks the text model for wrapper configs it knows (e.g. ``qwen3_5_moe_text``).
    Every weight the model expects must come from the checkpoint (keys it does not use, such as ``mtp.*`` or a
    vision tower, are fine): a model with randomly initialised parts would prove nothing.
    """
    from mapgen.runtime._cpu import quiet_transformers

    try:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        quiet_transformers()

        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
        model_type = config.get("model_type") if isinstance(config, dict) else None
        if model_type not in CONFIG_MAPPING:  # remote code is never run, and never asked about
            return None, f"no reference model: transformers {transformers.__version__} has no class for model_type " \
                         f"{model_type!r} (checkpoint code is never executed)"
        loaded: Any = _auto_class(transformers, str(model_type)).from_pretrained(
            str(root), dtype=torch.float32, attn_implementation="eager", output_loading_info=True,
            trust_remote_code=False)
        model, info = loaded
    except Exception as exc:
        return None, f"transformers cannot run it as a causal LM: {type(exc).__name__}: {str(exc)[:200]}"
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        return None, f"transformers expects weights the checkpoint lacks: {missing[:3]}"
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, use_cache=False)
    except Exception as exc:  # transformers' own forward fails on this config: no reference, not a mapgen error
        return None, f"transformers cannot run this config: {type(exc).__name__}: {str(exc)[:200]}"
    return out.logits.float(), ""


def _auto_class(transformers: Any, model_type: str) -> Any:
    """``AutoModelForCausalLM``; for a vision-language wrapper transformers has no causal-LM class for (Qwen2-VL),
    its image-text-to-text model: on a text-only batch that is its language model (text positions, no vision
    input) with the checkpoint's own weights."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def verify(source_path: str, par: Parallel, *, logits: bool = True, atol: float = 1e-4,
           dtype: str = "auto") -> dict[str, Any]:
    """SPMD entry point. Every rank returns its own read statistics; rank 0 also the findings. The Megatron
    model is built in the source's dtypes (or ``dtype``); the logits are compared in fp32 (the model is cast
    to fp32 after the round trip: every bf16/fp16 value is exact in fp32)."""
    from mapgen.runtime.megatron import logits as megatron_logits

    source = HFSource.open(source_path)
    if source.quant is not None and dtype == "auto":
        # block-scaled FP8: dequantized exactly (fp32), as transformers dequantizes it for an fp32 model
        dtype = "float32"
    bridge = bridge_for(source.layout)
    binding = bind(source.layout, bridge)
    check_parallel(binding.spec, par, world_from_env())
    with parallel_context(par) as coords:
        model, binding, stats = load_hf(source, par, dtype=dtype)
        tmp = Path(tempfile.mkdtemp(prefix="mapgen-verify-")) if coords.rank == 0 else Path()
        out = tmp / "hf"
        # a block-scaled FP8 source round-trips through --quantize (its tiles and scales), byte for byte
        export_hf(model, binding, out, target=source.to_meta(quantized=True), source_root=source.root)
        result: dict[str, Any] = {"rank": coords.rank, "bytes_read": stats.bytes_read, "tensors": stats.tensors,
                                  "bridge_numerics": bridge.numerics,
                                  "dtypes": stats.extra["dtypes"].to_json(),
                                  "param_dtypes": sorted({str(p.dtype) for p in model.state_dict().values()
                                                          if isinstance(p, torch.Tensor)})}
        if coords.rank == 0:
            rt = compare_checkpoints(source.root, out)
            result.update(keys=rt.keys, mismatches=rt.mismatches)
            shutil.rmtree(tmp, ignore_errors=True)
            result["rope_buffers"] = rope_buffer_check(source, binding.spec)
        if logits:
            result["logits"] = _logits_parity(source, binding, model, par, coords.rank, atol, megatron_logits)
        _barrier()
    return result


def expected_inv_freq(spec: Any) -> torch.Tensor:
    """RoPE's inverse frequencies as megatron-core's ``RotaryEmbedding`` computes them from the spec (and
    transformers' default RoPE from the config): ``1 / base ** (arange(0, d, 2) / d)`` over the rotated dims."""
    dim = int(spec.kv_channels * spec.rotary_percent)
    return 1.0 / (float(spec.rotary_base) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def rope_buffer_check(source: HFSource, spec: Any, ulps: int = 4) -> dict[str, Any] | None:
    """The stored ``rotary_emb.inv_freq`` buffers (a derived group scan carries through) against the config's
    RoPE: they are dropped on import (the Megatron model computes its own), so they must say the same, to within
    ``ulps`` units of the stored dtype's precision (fp16/bf16 exports round them). ``None`` when the checkpoint has
    none; skipped (with the reason) under a RoPE scaling."""
    from mapgen.contract.expand import expand_braces
    from mapgen.runtime.hfio import SafetensorsReader

    keys = sorted(k for t in source.layout.towers for p in t.patterns for k in expand_braces(p)
                  if k.endswith(".rotary_emb.inv_freq"))
    if not keys:
        return None
    if spec.rope_scaling:
        return {"checked": 0, "skipped": "a RoPE scaling changes the frequencies; not compared"}
    want = expected_inv_freq(spec)
    reader = SafetensorsReader(source.root, source.weight_map)
    worst, ok = 0.0, True
    for key in keys:
        stored = reader.read(key, ())
        got = stored.double()
        if got.shape != want.shape:
            return {"checked": len(keys), "ok": False, "detail": f"{key} has shape {tuple(got.shape)}, the config's "
                    f"RoPE has {tuple(want.shape)} frequencies"}
        rel = float(((got - want).abs() / want.abs()).max())
        worst = max(worst, rel)
        ok = ok and rel <= ulps * torch.finfo(stored.dtype).eps
    return {"checked": len(keys), "max_rel": worst, "ok": ok}


def _to_fp32(model: torch.nn.Module) -> None:
    """Cast every floating parameter and buffer to fp32 in place, and the config with them (the logits
    check runs the same values in fp32, as transformers does)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        for mod in model.modules():
            for flag in ("input_in_fp16", "input_in_bf16", "input_in_float16"):  # FusedScaleMaskSoftmax
                if getattr(mod, flag, False):
                    setattr(mod, flag, False)
            for name, buf in list(mod._buffers.items()):
                if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                    mod._buffers[name] = buf.float()
    config = getattr(model, "config", None)
    if config is not None:
        config.params_dtype = config.pipeline_dtype = torch.float32
        config.bf16 = config.fp16 = False


def _logits_parity(source: HFSource, binding: Any, model: torch.nn.Module, par: Parallel, rank: int, atol: float,
                   megatron_logits: Any) -> dict[str, Any] | None:
    vocab = int(binding.spec.vocab_size)
    ids = fixed_batch(vocab)
    _to_fp32(model)
    got = megatron_logits(model, ids)
    if rank != 0:
        return None
    want, reason = transformers_logits(source.root, ids)
    if want is None:
        return {"skipped": reason}
    got = got[..., :vocab].float()
    diff = float((got - want[..., :vocab]).abs().max())
    return {"max_abs": diff, "ok": diff <= atol}
