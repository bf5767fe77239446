"""The numerical proof ``mapgen emit`` runs on every bridge before writing it (an isolated runtime helper).

For one input: transformers builds the tiny twin (:mod:`mapgen.twin`: the input's config shrunk, every
semantic field kept) with perturbed fp32 weights and writes it with ``save_pretrained`` into a temporary
directory (removed afterwards; nothing else is written). Keys transformers does not model (MTP layers,
vision towers) are added as ``mapgen synth`` makes them; a text model saved for a wrapper checkpoint is
re-rooted under the wrapper's language-model prefix. The twin is scanned: its layout fingerprint must be the
bridge's, else there is no twin (and the line says why). Then the twin runs through the *new* bridge into
megatron-core at TP=1 in fp32 (:func:`mapgen.runtime.api.load_hf`, :func:`mapgen.runtime.megatron.logits`)
and through the transformers model that wrote it, on a fixed batch: the proof holds when
max |logits diff| <= 1e-4. When it does not, the first decoder layer whose hidden states diverge is named
(transformers' ``output_hidden_states`` against forward hooks on Megatron's decoder layers).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from mapgen.contract.bridge import Bridge
from mapgen.contract.fingerprint import dequantized, fingerprint
from mapgen.diff import diff_layouts
from mapgen.errors import Diagnostic, MapgenError
from mapgen.ir import Layout
from mapgen.runtime._cpu import quiet_transformers
from mapgen.runtime.api import HFSource, Parallel, load_hf, parallel_context
from mapgen.runtime.megatron import logits as megatron_logits
from mapgen.runtime.verify import fixed_batch
from mapgen.synth import copy_sources, synthesize
from mapgen.twin import (
    ATOL,
    TWIN_OPTIONS,
    no_reference_line,
    parity_line,
    reconcile_keys,
    reference_config,
    twin_config,
)

__all__ = ["NumericsProof", "perturb", "prove_numerics"]

MAX_PARAMS = 5_000_000  # a twin larger than this keeps sizes the shrinking does not reach: no twin
SEED = 20261130
INDEX = "model.safetensors.index.json"
EXTRA_SHARD = "model-twin-extra.safetensors"


@dataclass(frozen=True)
class NumericsProof:
    """The outcome for one input: its record line; ``ok`` False with ``problems`` when the logits differ."""

    line: str
    ok: bool = True
    problems: tuple[Diagnostic, ...] = ()
    max_abs: float | None = None


def _has_causal_lm(model_type: str) -> bool:
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _has_image_text(model_type: str) -> bool:
    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _build_reference(config: dict[str, Any]) -> tuple[torch.nn.Module | None, str]:
    """transformers' causal LM for ``config`` (or the whole image-text-to-text wrapper where its language model
    has none; fp32, eager attention, perturbed weights), or the reason not."""
    tf: Any = transformers  # partly untyped
    quiet_transformers()
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = transformers.AutoConfig.for_model(str(config["model_type"]), **fields)
            causal = _has_causal_lm(str(config["model_type"]))
            auto = tf.AutoModelForCausalLM if causal else tf.AutoModelForImageTextToText
            with torch.device("meta"):
                probe = auto.from_config(cfg, dtype=torch.float32)
            count = sum(p.numel() for p in probe.parameters())
            del probe
            if count > MAX_PARAMS:
                return None, f"the shrunk config still builds {count:,} parameters (> {MAX_PARAMS:,})"
            model: torch.nn.Module = auto.from_config(
                cfg, dtype=torch.float32, attn_implementation="eager")
    except Exception as exc:
        return None, f"transformers cannot build the twin: {type(exc).__name__}: {str(exc)[:160]}"
    perturb(model, SEED)
    model.eval()
    return model, ""


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Seeded values, no two tensors equal: normal * 0.05, 1-D norm weights uniform in [0.5, 1.5]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _weight_map(root: Path) -> dict[str, str]:
    index = root / INDEX
    if index.is_file():
        return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    with safe_open(str(root / "model.safetensors"), framework="pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def _complete(root: Path, layout: Layout, config: dict[str, Any]) -> str:
    """Make transformers' saved checkpoint the twin of ``layout`` (in place, inside the temporary directory):
    re-root its keys, add the keys it does not model, write the input's shrunk config. Returns the reason
    there is no twin, or ``""``."""
    synth = synthesize(layout, TWIN_OPTIONS)
    made = {k: t for shard in synth.shards.values() for k, t in shard.items()}
    weight_map = _weight_map(root)
    keys = reconcile_keys(weight_map, made, layout, "model.")
    if keys.reason:
        return keys.reason
    if any(old != new for old, new in keys.rename.items()):
        for shard in sorted(set(weight_map.values())):
            tensors = load_file(str(root / shard))
            save_file({keys.rename[k]: t for k, t in tensors.items()}, str(root / shard), metadata={"format": "pt"})
        weight_map = {keys.rename[k]: shard for k, shard in weight_map.items()}
    if keys.extra:
        copies = copy_sources(layout)
        originals = {k: load_file(str(root / s))[k] for k, s in weight_map.items() if k in copies.values()}
        made.update({k: originals[src] for k, src in copies.items() if src in originals})
        save_file({k: made[k].contiguous() for k in keys.extra}, str(root / EXTRA_SHARD), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys.extra, EXTRA_SHARD))
    if keys.extra or (root / INDEX).is_file():
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (root / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    # The twin's config.json is the input's own, shrunk (the one transformers built the model from): the bridge
    # reads fields as the real checkpoint spells them (absent ones take transformers' defaults), not as
    # transformers re-serialises them, and a wrapper keeps its model_type and architectures.
    (root / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return ""


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Deterministic fp32 sums: the recorded max |diff| must not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _capture(layers: Any, out: list[torch.Tensor]) -> list[Any]:
    def hook(_module: Any, _args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        out.append(hidden.detach().float().transpose(0, 1))  # Megatron [s, b, h] -> [b, s, h]

    return [layer.register_forward_hook(hook) for layer in layers]


def _first_divergence(hf_hidden: tuple[torch.Tensor, ...], mg_hidden: list[torch.Tensor], layers: int) -> str:
    """Where the two models part. ``mg_hidden`` is Megatron's embedding output, then each decoder layer's;
    transformers' hidden states are ``[embeddings, layer 0, ..., final norm(last layer)]``: the first that
    differs is named, else the last layer or what follows it."""
    names = ["the embedding", *(f"decoder layer {i}" for i in range(layers - 1))]
    for name, got, want in zip(names, mg_hidden, hf_hidden, strict=False):
        diff = float((got - want.float()).abs().max())
        if diff > ATOL * max(1.0, float(want.abs().max())):
            return f"{name} (max |hidden-state diff| = {diff:.2g})"
    return f"decoder layer {layers - 1}, the final norm or the output layer (every earlier layer agrees)"


def _run(bridge: Bridge, root: Path, hf_model: torch.nn.Module, vocab: int) -> tuple[float, Callable[[], str]]:
    twin = HFSource.open(root)
    ids = fixed_batch(vocab)
    hidden: list[torch.Tensor] = []
    with parallel_context(Parallel()):
        model, _binding, _ = load_hf(twin, Parallel(), bridge=bridge, dtype="float32")
        decoder: Any = model.decoder
        handles = _capture([model.embedding, *decoder.layers], hidden)
        try:
            got = megatron_logits(model, ids)[..., :vocab]
        finally:
            for h in handles:
                h.remove()
        layers = len(decoder.layers)
    with torch.no_grad():
        out = hf_model(input_ids=ids, use_cache=False, output_hidden_states=True)
    want = out.logits.float()[..., :vocab]
    diff = float((got - want).abs().max())
    return diff, lambda: _first_divergence(tuple(out.hidden_states or ()), hidden, layers)


def _make_twin(bridge: Bridge, layout: Layout, tmp: Path) -> tuple[torch.nn.Module | None, Path, str]:
    """transformers' tiny model and the twin checkpoint it wrote under ``tmp``, or the reason there is none."""
    try:
        config, expected = twin_config(dequantized(layout))  # FP8 / MXFP4: the unquantized model they share
    except MapgenError as exc:
        return None, tmp, f"no tiny twin: {exc.diagnostics[0].message}"
    reference, reason = reference_config(config, _has_causal_lm, _has_image_text)
    hf_model, reason = _build_reference(reference) if not reason else (None, reason)
    if hf_model is None:
        return None, tmp, reason
    root = tmp / "twin"
    hf_model.save_pretrained(str(root), max_shard_size="100KB")  # type: ignore[operator]
    reason = _complete(root, expected, config)
    if reason:
        return None, root, f"no tiny twin: {reason}"
    twin = HFSource.open(root).layout
    if fingerprint(twin) != bridge.fingerprint:
        changes = "; ".join(c.render() for c in diff_layouts(layout, twin).structure[:3])
        return None, root, (f"no tiny twin: the checkpoint transformers {transformers.__version__} writes has "
                            f"another layout ({changes or fingerprint(twin)})")
    return hf_model, root, ""


def prove_numerics(bridge: Bridge, layout: Layout, *, where: str = "") -> NumericsProof:
    """The numerical proof of ``bridge`` (not yet written: built from its plan) on the tiny twin of ``layout``
    (see the module docstring)."""
    version = transformers.__version__
    with _one_thread(), tempfile.TemporaryDirectory(prefix="mapgen-twin-") as tmp:
        hf_model, root, reason = _make_twin(bridge, layout, Path(tmp))
        if hf_model is None:
            return NumericsProof(no_reference_line(reason))
        try:
            diff, locate = _run(bridge, root, hf_model, TWIN_OPTIONS.vocab)
        except MapgenError as exc:  # the twin does not load through the bridge: nothing is claimed
            failed = exc.diagnostics[0]
            return NumericsProof(no_reference_line(
                f"the twin does not run through the bridge: {failed.code}: {failed.message[:160]}"))
        except Exception as exc:  # megatron-core cannot run this model here (e.g. a kernel without a CPU path)
            return NumericsProof(no_reference_line(
                f"megatron-core cannot run the twin here: {type(exc).__name__}: {str(exc)[:160]}"))
    if diff <= ATOL:
        return NumericsProof(parity_line(version, diff), max_abs=diff)
    first = locate()
    line = f"logits differ from transformers {version}: max |diff| = {diff:.2g} > {ATOL:g}; first divergence: {first}"
    problem = Diagnostic(
        "error", "emit.numerics-diverged",
        f"the bridge for {bridge.model_type!r} (layout {bridge.fingerprint}) does not reproduce transformers' "
        f"logits on its tiny twin: max |diff| = {diff:.3g} > {ATOL:g}; first divergent: {first}",
        file=where, expected=f"max |logits diff| <= {ATOL:g} (fp32, TP=1)",
        hint="the names and shapes are a bijection but a conversion op or a config field does not mean what "
        "transformers computes: check that layer's ops (fused orders, splits) and the config table",
    )
    return NumericsProof(line, ok=False, problems=(problem,), max_abs=diff)
