"""Keys (+ config cross-checks) -> :class:`~mapgen.ir.Layout`.

Order of work: refuse unsupported quantisation; split off towers (vision/audio); find the language-model
prefix; read top-level tensors; classify each decoder layer with the recognisers; group layers with equal
signatures; find MTP (three schemes); cross-check the config; list what is left as unclassified.

The keys decide; the config only breaks ties (attention output gate without shapes, packed experts' count
without headers) and is checked against what the keys say. Disagreements are diagnostics: errors are raised
together as one :class:`MapgenError`; warnings land in ``Layout.diagnostics``. Unclassified keys are *not*
an exception here: the Layout lists them and the CLI exits 2.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from mapgen.contract.hf_config import EXPERT_COUNT_READS
from mapgen.errors import Diagnostic, MapgenError
from mapgen.families import behaviour
from mapgen.families.attention import DERIVED_BUFFERS, DERIVED_BUFFERS_TOWER
from mapgen.families.embedding import EMBEDDING, LAYER_CONTAINERS
from mapgen.families.model_types import facts_for
from mapgen.families.mtp import (
    EXTRA_LAYER_MARKER,
    EXTRA_LAYERS,
    MTP_BLOCK,
    MTP_BLOCK_BASES,
    MTP_COUNT_KEYS,
    MTP_LAYERS,
    MTP_LAYERS_BASE,
    SCHEMES,
)
from mapgen.families.norms import NON_PARAMETRIC, NORMS, POST_LN
from mapgen.infer.patterns import compress_keys
from mapgen.infer.recognise import (
    EXPERT_SLOT,
    Context,
    Folded,
    Pool,
    Problem,
    fold_experts,
    match_family,
    recognise_mixer,
    recognise_mlp,
)
from mapgen.infer.summary import make_summary
from mapgen.ir import (
    MTP,
    Component,
    DiagnosticRecord,
    Dims,
    IndexSet,
    LanguageModel,
    LayerGroup,
    Layout,
    Tower,
    UnclassifiedGroup,
)
from mapgen.source.base import INDEX_NAME, Source, TensorInfo

CONFIG = "config.json"
_LAYER = re.compile(
    r"((?:[A-Za-z0-9_]+\.)*?)(" + "|".join(map(re.escape, LAYER_CONTAINERS)) + r")\.(0|[1-9][0-9]*)\.(.*)", re.DOTALL
)
_COMMON_LAYERS = "model.layers."  # what _LAYER finds first in "model.layers.<n>.<rest>" (p "model.", "layers")
_TOWERS = {
    "visual": "vision",
    "vision_tower": "vision",
    "vision_model": "vision",
    "vision_encoder": "vision",
    "audio_tower": "audio",
    "audio_model": "audio",
    "audio_encoder": "audio",
    "multi_modal_projector": "projector",
    "mm_projector": "projector",
}
_TOWER = re.compile(r"^((?:model\.)?(" + "|".join(_TOWERS) + r")\.)")
_TOWER_STARTS = tuple(p + t + "." for t in _TOWERS for p in ("", "model."))
_QUANT_SUFFIXES = (
    ".scales", ".biases", "weight_scale_inv", ".weight_scale", ".input_scale", ".qweight", ".qzeros", ".g_idx",
    "_blocks",
)  # fmt: skip
_EXPERT_COUNT_KEYS = EXPERT_COUNT_READS
_ATTENTION_TYPES = {"full_attention", "sliding_attention", "attention", "chunked_attention"}
_LINEAR_KINDS = {"gated_delta_net", "linear_attention"}  # mixer kinds config.json calls linear_attention
# other mixer kinds, as layer_types may name them (GraniteMoE-Hybrid's config writes linear_attention for Mamba)
_DECLARED_AS = {"mamba": ("mamba", "linear_attention"), "indexed_attention": ("indexed_attention",)}


def split_layer(key: str) -> tuple[str, int, str] | None:
    """``model.layers.12.mlp.x`` -> ``("model.layers.", 12, "mlp.x")``: the first ``<container>.<n>.`` segment
    (``layers``, ``h``: :data:`~mapgen.families.embedding.LAYER_CONTAINERS`) whose prefix is whole dotted
    identifiers; ``None`` when there is none."""
    m = _LAYER.match(key)
    return None if m is None else (m.group(1) + m.group(2) + ".", int(m.group(3)), m.group(4))


# ---------------------------------------------------------------------------------------------------------
# Config access
# ---------------------------------------------------------------------------------------------------------
class Config(NamedTuple):
    """The config as read: ``text`` is ``text_config`` when the config nests one, else the config itself."""

    top: Mapping[str, Any]
    text: Mapping[str, Any]

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> Config:
        text = config.get("text_config")
        return cls(config, text if isinstance(text, dict) else config)

    def get(self, *names: str) -> Any:
        for scope in (self.text, self.top):
            for n in names:
                if n in scope and scope[n] is not None:
                    return scope[n]
        return None

    def int(self, *names: str) -> int | None:
        v = self.get(*names)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    @property
    def model_type(self) -> str:
        mt = self.top.get("model_type")
        return mt if isinstance(mt, str) else ""

    @property
    def text_model_type(self) -> str:
        mt = self.text.get("model_type")
        return mt if isinstance(mt, str) else self.model_type


# ---------------------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------------------
class Findings(NamedTuple):
    errors: list[Diagnostic]
    warnings: list[Diagnostic]

    def add(self, d: Diagnostic) -> None:
        (self.errors if d.severity == "error" else self.warnings).append(d)


FP8_SCALE = ".weight_scale_inv"


def fp8_scales(keys: Iterable[str]) -> dict[str, str]:
    """Block-scaled FP8: each ``X.weight`` that has an ``X.weight_scale_inv``, to that scale key."""
    return {k.removesuffix("_scale_inv"): k for k in keys if k.endswith(FP8_SCALE)}
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
MXFP4_GROUP = 32  # FP4 values per E8M0 scale: 16 bytes of blocks, two nibbles each
_MXFP4_PACKED = 4  # [experts, rows, groups, 16] (blocks) / [experts, rows, groups] (scales)
_MXFP4_CONFIG = frozenset({"quant_method", "modules_to_not_convert", "dequantize"})


def mxfp4_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """MXFP4: each tensor ``X`` stored as ``X_blocks`` + ``X_scales``, to those two keys."""
    return {k.removesuffix(MXFP4_BLOCKS): (k, k.removesuffix(MXFP4_BLOCKS) + MXFP4_SCALES)
            for k in keys if k.endswith(MXFP4_BLOCKS)}


def mxfp4_shape(blocks: tuple[int, ...]) -> tuple[int, ...]:
    """The dequantized shape of ``X`` from its blocks' ``[E, rows, groups, 16]``: ``[E, groups * 32, rows]``
    (transformers' ``convert_moe_packed_tensors`` transposes the last two dimensions)."""
    experts, rows, groups, _ = blocks
    return (experts, groups * MXFP4_GROUP, rows)


def _mxfp4(source: Source, qc: Mapping[str, Any], suspects: list[str], findings: Findings) -> Source:
    """MXFP4 experts (``quant_method: mxfp4``; gpt-oss): ``X_blocks`` (uint8 ``[E, rows, groups, 16]``, two
    e2m1 nibbles a byte) and ``X_scales`` (uint8 E8M0 ``[E, rows, groups]``) are dequantized while read
    (:mod:`mapgen.runtime.quant`). Returns the source as the model sees it: each pair replaced by ``X`` in its
    dequantized shape ``[E, groups * 32, rows]`` and dtype, in the blocks' shard."""
    problems: list[Diagnostic] = []

    def refuse(code: str, message: str, **kw: str) -> None:
        problems.append(Diagnostic("error", code, message, hint="convert an unquantized (bf16) export of the model",
                                   **kw))

    for name in sorted(set(qc) - _MXFP4_CONFIG):
        refuse("quant.mxfp4-unsupported", f"MXFP4 quantization_config field {name!r}: not supported", file=CONFIG,
               key=f"quantization_config.{name}", expected=", ".join(sorted(_MXFP4_CONFIG)))
    skip = qc.get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(m, str) for m in skip)):
        refuse("quant.mxfp4-unsupported", f"modules_to_not_convert is {skip!r}", file=CONFIG,
               key="quantization_config.modules_to_not_convert", expected="a list of module name patterns")
    other = next((k for k in suspects if not k.endswith(MXFP4_BLOCKS)), None)
    if other is not None:
        refuse("quant.mxfp4-unsupported", "an MXFP4 checkpoint with other quantization tensors", file=INDEX_NAME,
               key=other, expected="only <tensor>_blocks beside <tensor>_scales")
    pairs = mxfp4_pairs(suspects)
    if not pairs:
        refuse("quant.mxfp4-unsupported", "quantization_config declares MXFP4, but no tensor is stored as "
               "<tensor>_blocks + <tensor>_scales", file=CONFIG, key="quantization_config.quant_method",
               expected="the release's MXFP4 tensors, or no quantization_config for an unquantized export")
    scales = {k for k in source.tensors if k.endswith(MXFP4_SCALES)}
    paired = {s for _, s in pairs.values()}
    for blocks, scale in pairs.values():
        if scale not in scales:
            refuse("quant.mxfp4-orphan", "MXFP4 blocks without their scales", file=INDEX_NAME, key=blocks,
                   expected=scale)
    for scale in sorted(scales - paired):
        refuse("quant.mxfp4-orphan", "MXFP4 scales without their blocks", file=INDEX_NAME, key=scale,
               expected=scale.removesuffix(MXFP4_SCALES) + MXFP4_BLOCKS)
    tensors = {k: v for k, v in source.tensors.items() if not k.endswith((MXFP4_BLOCKS, MXFP4_SCALES))}
    dtype = str(source.config.get("torch_dtype") or source.config.get("dtype") or "bfloat16")
    virtual = {"float32": "F32", "float16": "F16"}.get(dtype, "BF16")
    for key, (bkey, skey) in sorted(pairs.items()):
        b, s = source.tensors[bkey], source.tensors.get(skey)
        shape = None
        if b.shape is not None and s is not None and s.shape is not None:
            bytes_per_group = MXFP4_GROUP // 2
            if (b.dtype, s.dtype) != ("U8", "U8") or len(b.shape) != _MXFP4_PACKED or b.shape[-1] != bytes_per_group \
                    or tuple(s.shape) != tuple(b.shape[:-1]):
                refuse("quant.mxfp4-shape", f"MXFP4 pair of {key}: blocks {b.dtype} {list(b.shape)}, scales "
                       f"{s.dtype} {list(s.shape)}", file=b.shard, key=bkey,
                       expected=f"uint8 blocks [experts, rows, groups, {bytes_per_group}] and uint8 scales "
                       "[experts, rows, groups]")
                continue
            shape = mxfp4_shape(tuple(b.shape))
        tensors[key] = TensorInfo(b.shard, virtual if b.dtype is not None else None, shape)
    for d in problems:
        findings.add(d)
    return dataclasses.replace(source, tensors=tensors)


_BLOCK_DIMS = 2  # weight_block_size: [block_m, block_n]


def _fp8_block(source: Source, qc: Mapping[str, Any], suspects: list[str], findings: Findings) -> bool:
    """Block-scaled FP8 (``quant_method: fp8`` with ``weight_block_size``; DeepSeek-V3/R1, Kimi-K2): weights
    are dequantized while read (:mod:`mapgen.runtime.quant`), so it converts when every scale has its weight,
    the tiles are given and activations are scaled dynamically. True when it is that format."""
    size = qc.get("weight_block_size")
    problems: list[tuple[str, str, str]] = []  # (key, message, expected)
    if not (isinstance(size, list) and len(size) == _BLOCK_DIMS and all(isinstance(v, int) and v > 0 for v in size)):
        problems.append(("quantization_config.weight_block_size", f"FP8 with weight_block_size {size!r}: not supported",
                         "two positive integers [block_m, block_n] (per-tensor FP8 is not supported)"))
    if qc.get("fmt", "e4m3") != "e4m3":
        problems.append(("quantization_config.fmt", f"FP8 format {qc.get('fmt')!r}: not supported", "e4m3"))
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        problems.append(("quantization_config.activation_scheme",
                         f"FP8 activation scheme {qc.get('activation_scheme')!r} (static input scales): not supported",
                         "dynamic (no input_scale tensors)"))
    scale_fmt = qc.get("scale_fmt")
    if scale_fmt not in (None, "float32", "fp32"):
        problems.append(("quantization_config.scale_fmt", f"FP8 scale format {scale_fmt!r}: not supported",
                         "fp32 scales"))
    for key, message, expected in problems:
        findings.add(Diagnostic("error", "quant.fp8-unsupported", message, file=CONFIG, key=key, expected=expected,
                                hint="convert an unquantized (bf16) export of the model"))
    scales = fp8_scales(suspects)  # every key ending in FP8_SCALE is a suspect
    # as many scales as suspects: each suspect is a scale (no pass to look for another kind)
    other = None if len(scales) == len(suspects) else next((k for k in suspects if not k.endswith(FP8_SCALE)), None)
    if other is not None:
        findings.add(Diagnostic("error", "quant.fp8-unsupported", "an FP8 block-scaled checkpoint with other "
                                "quantization tensors", file=INDEX_NAME, key=other,
                                expected="only <module>.weight_scale_inv beside FP8 weights"))
    orphans = (  # a pass in order only when some weight is missing
        [] if scales.keys() <= source.tensors.keys()
        else [scale for weight, scale in scales.items() if weight not in source.tensors]
    )
    if orphans:
        findings.add(Diagnostic("error", "quant.fp8-orphan-scale", f"{len(orphans)} scale(s) without their weight",
                                file=INDEX_NAME, key=orphans[0], expected=orphans[0].removesuffix("_scale_inv")))
    return not problems and other is None and not orphans


def _quantization(source: Source, cfg: Config, findings: Findings) -> tuple[str, Source]:
    """Refuse quantised formats without a dequantisation rule; return ``fp8_block`` / ``mxfp4`` / ``none`` and
    the source as the model sees it (MXFP4: each pair as its dequantized tensor, :func:`_mxfp4`)."""
    qc = cfg.top.get("quantization_config") or cfg.text.get("quantization_config")
    method = str(qc.get("quant_method", "")) if isinstance(qc, dict) else ""
    suspects = [k for k in source.tensors if k.endswith(_QUANT_SUFFIXES)]  # one pass over the keys
    if method == "fp8" and isinstance(qc, dict):
        return "fp8_block" if _fp8_block(source, qc, suspects, findings) else "none", source
    if method == "mxfp4" and isinstance(qc, dict):
        return "mxfp4", _mxfp4(source, qc, suspects, findings)
    probes: list[tuple[str, str, str]] = [
        (
            "quant.mlx-unsupported",
            "MLX-quantized checkpoint (packed .weight with .scales/.biases): not supported",
            next((k for k in suspects if k.endswith((".scales", ".biases"))), ""),
        ),
        (
            "quant.fp8-unsupported",
            "FP8 checkpoint (weight_scale_inv block scales): not supported (no dequantization rule)",
            next((k for k in suspects if k.endswith(("weight_scale_inv", ".weight_scale", ".input_scale"))), ""),
        ),
        (
            "quant.gptq-awq-unsupported",
            "GPTQ/AWQ-quantized checkpoint (qweight/qzeros): not supported",
            next((k for k in suspects if k.endswith((".qweight", ".qzeros", ".g_idx"))), ""),
        ),
    ]
    for code, message, key in probes:
        if key:
            findings.add(
                Diagnostic(
                    "error",
                    code,
                    message,
                    file=INDEX_NAME,
                    key=key,
                    hint="scan an unquantized (bf16/fp16/fp32) export of the model",
                )
            )
    mlx = cfg.top.get("quantization")
    if isinstance(mlx, dict) and "bits" in mlx and not any(c == "quant.mlx-unsupported" for c, _, k in probes if k):
        findings.add(
            Diagnostic(
                "error",
                "quant.mlx-unsupported",
                "MLX-quantized checkpoint (config 'quantization'): not supported",
                file=CONFIG,
                key="quantization",
                hint="scan an unquantized export",
            )
        )
    if method and method != "mxfp4" and not any(k for _, _, k in probes):
        findings.add(
            Diagnostic(
                "error",
                "quant.unsupported",
                f"quantization method {method!r}: not supported",
                file=CONFIG,
                key="quantization_config.quant_method",
                expected="an unquantized checkpoint, or mxfp4 experts",
            )
        )
    blocks = next((k for k in suspects if k.endswith(MXFP4_BLOCKS)), None)
    if blocks is not None:
        findings.add(Diagnostic("error", "quant.mxfp4-unsupported", "MXFP4 blocks in a checkpoint whose config does "
                                "not declare quantization_config.quant_method 'mxfp4'", file=INDEX_NAME, key=blocks,
                                expected="quantization_config = {quant_method: mxfp4, ...} in config.json",
                                hint="restore the release's quantization_config"))
    return "none", source


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------
class LayerResult(NamedTuple):
    block: Component | None
    mixer: Component | None
    mlp: Component | None
    leftover: tuple[str, ...]  # original suffixes nobody claimed

    @property
    def complete(self) -> bool:
        return None not in (self.block, self.mixer, self.mlp)

    @property
    def signature(self) -> tuple[Any, ...]:
        return (self.block, self.mixer, self.mlp)


def classify_layer(
    suffixes: list[str],
    shape: Callable[[str], tuple[int, ...] | None],
    ctx: Context,
    *,
    sliding: bool,
    problems: list[Problem],
    fold_cache: dict[frozenset[str], Folded] | None = None,
) -> LayerResult:
    """Run the recognisers over one layer. ``fold_cache`` shares expert folding between layers with the same
    key set (the usual case: a 40-layer model has one or two distinct sets)."""
    key = frozenset(suffixes)
    folded_ids = fold_cache.get(key) if fold_cache is not None else None
    if folded_ids is None:
        folded_ids = fold_experts(suffixes)
        if fold_cache is not None:
            fold_cache[key] = folded_ids
    folded, ids = folded_ids
    pool = Pool(set(folded))

    def shape0(suffix: str) -> tuple[int, ...] | None:
        return shape(suffix.replace(EXPERT_SLOT, "0"))

    mixer = recognise_mixer(pool, shape0, ctx, sliding=sliding)
    mlp = recognise_mlp(pool, shape0, ctx, ids, problems)
    found = match_family(NORMS, pool)
    block = Component.make(NORMS.name, found.variant.name, found.keys) if found else None
    declared = facts_for(ctx.model_types)
    if block is None and declared.non_parametric_norms:
        block = Component.make(NORMS.name, NON_PARAMETRIC, {})  # OLMo: norms without tensors (refused by the planner)
    elif block is not None and block.variant == "pre_norm" and declared.post_layernorm:
        block = Component.make(NORMS.name, POST_LN, dict(block.slots))  # GPT-1: the same keys, after the residual
    leftover = sorted(s for t in pool.avail for s in folded[t])
    result = LayerResult(block, mixer, mlp, tuple(leftover))
    if not result.complete:  # a partial layer is not a layer: every key in it stays unclassified
        return LayerResult(None, None, None, tuple(sorted(suffixes)))
    return result


_GROUP_BASE = {"gated_delta_net": "linear_attention"}


def make_groups(results: Mapping[int, LayerResult], root: str, name_prefix: str = "") -> tuple[LayerGroup, ...]:
    """Group complete layers by signature; name groups by mixer kind (+ ``_dense``/``_moe`` when needed)."""
    by_sig: dict[tuple[Any, ...], list[int]] = {}
    for i in sorted(results):
        r = results[i]
        if r.complete:
            by_sig.setdefault(r.signature, []).append(i)
    ordered = sorted(by_sig.items(), key=lambda kv: kv[1][0])
    bases = []
    for sig, _ in ordered:
        kind = behaviour(sig[1]).kind(sig[1])
        bases.append((_GROUP_BASE.get(kind, kind), behaviour(sig[2]).kind(sig[2])))
    names: list[str] = []
    for mixer_name, mlp_name in bases:
        if sum(1 for b in bases if b[0] == mixer_name) == 1:
            names.append(mixer_name)
            continue
        name = f"{mixer_name}_{mlp_name}"
        same = [b for b in bases if b == (mixer_name, mlp_name)]
        if len(same) > 1:
            name += f"_{sum(1 for n in names if n.startswith(name)) + 1}"
        names.append(name)
    groups = []
    for name, (sig, layers) in zip(names, ordered, strict=True):
        block, mixer, mlp = sig
        groups.append(LayerGroup(name_prefix + name, root, IndexSet.of(layers), block, mixer, mlp))
    return tuple(groups)


# ---------------------------------------------------------------------------------------------------------
# The whole checkpoint
# ---------------------------------------------------------------------------------------------------------
def _dims(cfg: Config) -> Dims:
    hidden = cfg.int("hidden_size", "n_embd") or 0
    heads = cfg.int("num_attention_heads", "n_head") or 0
    return Dims(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=cfg.int("num_key_value_heads") or heads,
        head_dim=cfg.int("head_dim") or (hidden // heads if heads else 0),
        intermediate_size=cfg.int("intermediate_size", "n_inner") or 0,
        moe_intermediate_size=cfg.int("moe_intermediate_size") or 0,
        shared_expert_intermediate_size=cfg.int("shared_expert_intermediate_size") or 0,
        vocab_size=cfg.int("vocab_size") or 0,
        num_experts_per_tok=cfg.int("num_experts_per_tok", "experts_per_token") or 0,
    )


def _context(cfg: Config) -> Context:
    types = tuple(dict.fromkeys(t for t in (cfg.text_model_type, cfg.model_type) if t))
    gate = cfg.get("attn_output_gate")
    if not isinstance(gate, bool):
        gate = facts_for(types).output_gate
    return Context(model_types=types, num_experts=cfg.int(*_EXPERT_COUNT_KEYS) or None, output_gate=gate)


def _shape_lookup(source: Source, prefix: str) -> Callable[[str], tuple[int, ...] | None]:
    def shape(suffix: str) -> tuple[int, ...] | None:
        info = source.tensors.get(prefix + suffix)
        return info.shape if info is not None else None

    return shape


def _problems_to_diags(problems: list[Problem], key_prefix: str, findings: Findings) -> None:
    for p in problems:
        findings.add(
            Diagnostic(p.severity, p.code, p.message, file=INDEX_NAME, key=key_prefix + p.suffix, expected=p.expected)
        )


def infer(source: Source) -> Layout:
    """Classify every key of ``source`` into the IR. Raises :class:`MapgenError` with all errors found."""
    cfg = Config.of(source.config)
    ctx = _context(cfg)
    if not source.tensors:
        raise MapgenError(Diagnostic(
            "error", "checkpoint.no-tensors", "the checkpoint lists no tensors (an empty weight_map)",
            file=INDEX_NAME, expected="weight_map: tensor name -> shard file, one entry per tensor",
            hint="the index or the download is incomplete: fetch the checkpoint again",
        ))
    findings = Findings([], list(source.diagnostics))
    # MXFP4: the model sees each X_blocks + X_scales pair as X, dequantized while read
    quantization, source = _quantization(source, cfg, findings)
    if findings.errors:
        raise MapgenError(findings.errors)
    checked = source  # shard headers are checked with the FP8 scales
    if quantization == "fp8_block":  # the scales belong to their weights: read with them, never mapped alone
        source = dataclasses.replace(
            source, tensors={k: v for k, v in source.tensors.items() if not k.endswith(FP8_SCALE)})

    # -- towers, and decoder layers by prefix ------------------------------------------------------------
    tower_keys: dict[str, list[str]] = {}
    others: list[str] = []  # keys outside any decoder layer
    by_prefix_s: dict[str, dict[str, list[str]]] = {}  # "model.layers." -> layer (digits) -> suffixes
    common = _COMMON_LAYERS  # fast path for the usual decoder prefix; the regex decides every other key
    common_layers = by_prefix_s.setdefault(common, {})
    # Faster still: an index lists a layer's keys together, so a key under the previous key's "model.layers.<n>."
    # joins that layer with one prefix test (what the test below would decide for it, in fewer steps).
    run_prefix: str | None = None
    run_len = 0
    run: list[str] = []
    run_append = run.append
    for key in source.tensors:
        if run_prefix is not None and key.startswith(run_prefix):
            run_append(key[run_len:])
            continue
        if key.startswith(common):
            digits, dot, tail = key[len(common):].partition(".")
            if dot and digits.isascii() and digits.isdigit() and (digits == "0" or digits[0] != "0"):
                layer = common_layers.get(digits)
                if layer is None:
                    common_layers[digits] = layer = []
                layer.append(tail)
                run_prefix = f"{common}{digits}."
                run_len, run_append = len(run_prefix), layer.append
                continue
        m = _LAYER.match(key)
        if m is None:
            t = _TOWER.match(key)
            if t is not None:
                tower_keys.setdefault(t.group(1), []).append(key)
            else:
                others.append(key)
            continue
        p, container, i, rest = m.groups()
        by_prefix_s.setdefault(f"{p}{container}.", {}).setdefault(i, []).append(rest)
    for p in [p for p in by_prefix_s if p.startswith(_TOWER_STARTS)]:  # e.g. audio_tower.layers.<n>.*
        tower_prefix = _TOWER.match(p)
        assert tower_prefix is not None
        tower_layers = by_prefix_s.pop(p)
        tower_keys.setdefault(tower_prefix.group(1), []).extend(
            f"{p}{i}.{r}" for i in tower_layers for r in tower_layers[i]
        )
    by_prefix = {p: {int(i): v for i, v in layers.items()} for p, layers in by_prefix_s.items() if layers}
    towers = _towers(tower_keys)
    candidates = [p for p in by_prefix if not p.startswith("mtp.")]
    layers_at = max(  # the decoder's "<prefix><container>." (most keys; "model.layers." on ties)
        candidates, key=lambda p: (sum(len(v) for v in by_prefix[p].values()), p == "model.layers."),
        default="model.layers.",
    )
    prefix = layers_at[: layers_at[:-1].rfind(".") + 1]  # the language model's prefix, "model." / "transformer."
    layer_suffixes = by_prefix.get(layers_at, {})
    claimed: set[str] = set()

    def claim(key: str | None) -> str | None:
        if key is not None and key in source.tensors:
            claimed.add(key)
            return key
        return None

    # -- top level ----------------------------------------------------------------------------------------
    embedding = next((k for s in EMBEDDING.slot("embedding").spellings if (k := claim(prefix + s))), None)
    final_norm = next((k for s in EMBEDDING.slot("final_norm").spellings if (k := claim(prefix + s))), None)
    embedding_norm, embedding_norm_bias = (
        next((k for s in EMBEDDING.slot(slot).spellings if (k := claim(prefix + s))), None)
        for slot in ("embedding_norm", "embedding_norm_bias")
    )
    position_embedding = next(
        (k for s in EMBEDDING.slot("position_embedding").spellings if (k := claim(prefix + s))), None
    )
    final_norm_bias = next(  # the bias beside the weight found (ln_f.weight -> ln_f.bias)
        (k for s in EMBEDDING.slot("final_norm_bias").spellings
         if final_norm and prefix + s == final_norm.removesuffix("weight") + "bias" and (k := claim(prefix + s))),
        None,
    )
    parent = prefix.removesuffix("model.") if prefix.endswith("model.") else ""
    lm_head = next(
        (k for s in EMBEDDING.slot("lm_head").spellings for r in ("", parent, prefix) if (k := claim(r + s))), None
    )
    lm_head_bias = next(  # beside the head found (lm_head.weight -> lm_head.bias)
        (k for s in EMBEDDING.slot("lm_head_bias").spellings for r in ("", parent, prefix)
         if lm_head and r + s == lm_head.removesuffix("weight") + "bias" and (k := claim(r + s))), None
    )
    no_norm_tensors = facts_for(ctx.model_types).non_parametric_norms or facts_for(ctx.model_types).post_layernorm
    for name, slot, found in (("embedding", "embedding", embedding), ("final norm", "final_norm", final_norm)):
        if found is None and not (slot == "final_norm" and no_norm_tensors):
            findings.add(
                Diagnostic(
                    "error",
                    "keys.missing-top-level",
                    f"no {name} tensor",
                    file=INDEX_NAME,
                    expected=" or ".join(prefix + s for s in EMBEDDING.slot(slot).spellings),
                )
            )

    # -- decoder layers -----------------------------------------------------------------------------------
    n_cfg = cfg.int("num_hidden_layers", "n_layer", "num_layers")
    layer_types = cfg.get("layer_types")
    layer_types = layer_types if isinstance(layer_types, list) else None
    extra = sorted(i for i in layer_suffixes if EXTRA_LAYER_MARKER in layer_suffixes[i])
    n_main = n_cfg if (n_cfg is not None and extra and min(extra) >= n_cfg) else None
    if n_main is None and extra:
        n_main = min(extra)
    main_ids = sorted(i for i in layer_suffixes if n_main is None or i < n_main)
    results: dict[int, LayerResult] = {}
    fold_cache: dict[frozenset[str], Folded] = {}
    layer_root = layers_at + "{layer}."
    buffers: list[str] = []  # derived buffers (rotary_emb.inv_freq): carried through, never converted
    for i in main_ids:
        problems: list[Problem] = []
        sliding = bool(layer_types and i < len(layer_types) and layer_types[i] == "sliding_attention")
        suffixes = layer_suffixes[i]
        if not DERIVED_BUFFERS.isdisjoint(suffixes):  # rare: only then two passes over the layer's keys
            buffers.extend(f"{layers_at}{i}.{x}" for x in suffixes if x in DERIVED_BUFFERS)
            suffixes = [x for x in suffixes if x not in DERIVED_BUFFERS]
        results[i] = classify_layer(
            list(suffixes),
            _shape_lookup(source, f"{layers_at}{i}."),
            ctx,
            sliding=sliding,
            problems=problems,
            fold_cache=fold_cache,
        )
        _problems_to_diags(problems, f"{layers_at}{i}.", findings)
    groups = make_groups(results, layer_root)
    if buffers:
        towers = (*towers, Tower(DERIVED_BUFFERS_TOWER, layers_at, len(buffers),
                                 tuple(p for p, _ in compress_keys(buffers))))
    leftover = [f"{layers_at}{i}.{s}" for i, r in results.items() for s in r.leftover]
    num_layers = len(main_ids)
    _check_layers(results, main_ids, n_cfg, layer_types, cfg, layer_root, findings)

    # -- MTP ----------------------------------------------------------------------------------------------
    mtp, mtp_leftover = _mtp(source, cfg, ctx, prefix, layers_at, layer_suffixes, extra, n_main, claim, findings)
    leftover.extend(mtp_leftover)

    # -- unclassified -------------------------------------------------------------------------------------
    rest = [k for k in others if k not in claimed]  # strays outside decoder layers; MTP keys are claimed
    for p, layers in by_prefix.items():  # decoder-layer keys outside the main decoder (MTP claims its own)
        for i, suffixes in layers.items():
            if p != layers_at or i not in results:
                rest.extend(k for k in (f"{p}{i}.{s}" for s in suffixes) if k not in claimed)
    unclassified_keys = sorted(set(leftover) | set(rest))
    unclassified = tuple(UnclassifiedGroup(p, c) for p, c in compress_keys(unclassified_keys))

    # -- config cross-checks on the whole ------------------------------------------------------------------
    tied = lm_head is None
    tie_cfg = cfg.get("tie_word_embeddings")
    if tie_cfg is False and tied:
        findings.add(
            Diagnostic(
                "error",
                "config.tie-mismatch",
                "config says tie_word_embeddings=false but there is no lm_head tensor",
                file=CONFIG,
                key="tie_word_embeddings",
                expected=EMBEDDING.slot("lm_head").spellings[0],
            )
        )
    elif tie_cfg is True and not tied:
        findings.add(
            Diagnostic(
                "warning",
                "config.tie-lm-head-present",
                "config says tie_word_embeddings=true but an lm_head "
                "tensor is stored; treating the embeddings as untied",
                file=CONFIG,
                key=lm_head or "",
            )
        )
    moe_groups = [g for g in groups if g.mlp.family == "moe"]
    dense_only = cfg.get("mlp_only_layers")  # Qwen2/3-MoE-style: these layers build a dense MLP whatever num_experts
    all_dense = isinstance(dense_only, list) and set(range(num_layers)) <= set(dense_only)
    if ctx.num_experts and groups and not moe_groups and not all_dense:
        findings.add(
            Diagnostic(
                "error",
                "config.experts-declared-absent",
                f"config declares {ctx.num_experts} experts but no layer has routed experts",
                file=CONFIG,
                key="num_experts",
            )
        )

    if findings.errors:
        extra_text = ""
        if unclassified:
            extra_text = "unclassified keys:\n" + "\n".join(f"  {u.pattern}  ({u.count} keys)" for u in unclassified)
        raise MapgenError(findings.errors, extra=extra_text)

    top = Component.make(EMBEDDING.name, "tied" if tied else "untied",
                         {"embedding": embedding, "final_norm": final_norm, "lm_head": lm_head,
                          "final_norm_bias": final_norm_bias, "position_embedding": position_embedding,
                          "lm_head_bias": lm_head_bias, "embedding_norm": embedding_norm,
                          "embedding_norm_bias": embedding_norm_bias},
                         counts={"position_offset": _position_offset(position_embedding, ctx.model_types)})
    language_model = LanguageModel(prefix=prefix, top=top, groups=groups, num_layers=num_layers, mtp=mtp)
    mtp_declared = cfg.int(*MTP_COUNT_KEYS) or 0
    archs = source.config.get("architectures")
    summary = make_summary(
        model_type=cfg.model_type,
        language_model=language_model,
        towers=towers,
        unclassified_keys=len(unclassified_keys),
        mtp_declared=mtp_declared,
    )
    layout = Layout(
        model_type=cfg.model_type,
        text_model_type=cfg.text_model_type,
        architectures=tuple(str(a) for a in archs) if isinstance(archs, list) else (),
        language_model=language_model,
        dims=_dims(cfg),
        summary=summary,
        towers=towers,
        unclassified=unclassified,
        diagnostics=tuple(DiagnosticRecord(d.severity, d.code, d.message, d.key) for d in findings.warnings),
        quantization=quantization,
        config=dict(source.config),
    )
    if source.headers_read:
        _check_headers(layout, checked)
    return layout


_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def _position_offset(key: str | None, model_types: tuple[str, ...]) -> int | str | None:
    """Rows of the learned position table before position 0: the model type's declared offset (OPT: 2), none for
    GPT-2's ``wpe``, ``"undeclared"`` for another spelling of a model type that declares none (refused)."""
    if key is None:
        return None
    offset = facts_for(model_types).position_offset
    if offset is None:
        return None if key.endswith("wpe.weight") else "undeclared"
    return offset or None


def _check_headers(layout: Layout, source: Source) -> None:
    """Shapes and dtypes from the shard headers against what the config implies, all reported at once.

    Every language-model tensor the config sizes must have that shape (:func:`mapgen.plan.shapes.shape_problems`)
    and a floating-point dtype: FP8 weights without their scales would otherwise be converted as if they were
    bf16, and an integer tensor in a weight slot means a quantized or corrupt checkpoint."""
    from mapgen.plan.shapes import shape_entries, shape_problems

    actual = {key: info.shape for key, info in source.tensors.items() if info.shape is not None}
    scaled = fp8_scales(source.tensors)
    errors = shape_problems(layout, layout.config, actual)
    by_dtype: dict[str, list[str]] = {}
    for entry in shape_entries(layout, layout.config):
        info = source.tensors.get(entry.key)
        if info is None or info.dtype is None or info.dtype in _FLOAT_DTYPES:
            continue
        if info.dtype == "F8_E4M3" and layout.quantization == "fp8_block" and entry.key in scaled:
            continue
        by_dtype.setdefault(info.dtype, []).append(entry.key)
    for dtype, keys in sorted(by_dtype.items()):
        fp8 = dtype.startswith("F8")
        errors.append(
            Diagnostic(
                "error",
                "quant.fp8-unsupported" if fp8 else "dtype.mismatch",
                (f"{len(keys)} weight(s) stored as {dtype} (FP8) without a dequantization rule: not supported"
                 if fp8 else f"{len(keys)} weight(s) stored as {dtype}, but the config describes a floating-point "
                 f"model ({layout.config.get('torch_dtype') or layout.config.get('dtype') or 'float'})"),
                file=source.tensors[keys[0]].shard,
                key=keys[0],
                expected="F32, F16 or BF16 tensors",
                hint="convert an unquantized (bf16/fp16/fp32) export of the model",
            )
        )
    if errors:
        raise MapgenError(errors)


def _towers(tower_keys: Mapping[str, list[str]]) -> tuple[Tower, ...]:
    out: list[Tower] = []
    names = [_TOWERS[p.removeprefix("model.").rstrip(".")] for p in sorted(tower_keys)]
    for prefix, name in zip(sorted(tower_keys), names, strict=True):
        segment = prefix.removeprefix("model.").rstrip(".")
        unique = name if names.count(name) == 1 else f"{name}:{segment}"
        keys = tower_keys[prefix]
        out.append(Tower(unique, prefix, len(keys), tuple(p for p, _ in compress_keys(keys))))
    return tuple(out)


def _check_layers(
    results: Mapping[int, LayerResult],
    main_ids: list[int],
    n_cfg: int | None,
    layer_types: list[Any] | None,
    cfg: Config,
    root: str,
    findings: Findings,
) -> None:
    n = len(main_ids)
    if not main_ids:  # never "the keys hold 0 layers": say what was looked for
        containers = ", ".join(f"<prefix>{c}.<n>." for c in LAYER_CONTAINERS)
        findings.add(
            Diagnostic(
                "error",
                "keys.no-decoder-layers",
                "found no decoder-layer keys" + (f" (the config declares {n_cfg} layers)" if n_cfg else ""),
                file=INDEX_NAME,
                expected=f"keys under {containers}",
                hint="if this model numbers its layers under another name, add it to "
                "mapgen/families/embedding.py LAYER_CONTAINERS",
            )
        )
        return
    if main_ids != list(range(n)):
        missing = sorted(set(range(max(main_ids) + 1)) - set(main_ids))
        findings.add(
            Diagnostic(
                "error",
                "layers.gap",
                f"decoder layers {IndexSet.of(missing).braces()} have no keys",
                file=INDEX_NAME,
                key=root.format(layer=missing[0]),
                expected=f"layers 0..{max(main_ids)}",
            )
        )
    if n_cfg is not None and n_cfg != n:
        findings.add(
            Diagnostic(
                "error",
                "config.layers-mismatch",
                f"config declares num_hidden_layers={n_cfg} but the keys hold {n} decoder layers",
                file=CONFIG,
                key="num_hidden_layers",
                expected=str(n),
            )
        )
    interval = cfg.int("full_attention_interval")
    has_gdn = any(x.mixer is not None and x.mixer.family == "gated_delta_net" for x in results.values())
    has_moe = any(x.mlp is not None and x.mlp.family == "moe" for x in results.values())
    for i in main_ids:
        r = results[i]
        if r.mixer is None:
            continue
        is_linear = behaviour(r.mixer).kind(r.mixer) in _LINEAR_KINDS
        declared: str | None = None
        if layer_types is not None and i < len(layer_types):
            declared = str(layer_types[i])
            kind = behaviour(r.mixer).kind(r.mixer)
            if kind in _DECLARED_AS:
                ok = declared in _DECLARED_AS[kind]
            else:
                ok = declared == "linear_attention" if is_linear else declared in _ATTENTION_TYPES
        elif layer_types is None and interval and has_gdn:
            declared = "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            ok = declared == ("linear_attention" if is_linear else "full_attention")
        else:
            continue
        if not ok:
            findings.add(
                Diagnostic(
                    "error",
                    "config.layer-type-mismatch",
                    f"layer {i} is {behaviour(r.mixer).kind(r.mixer)} by its keys but the config declares {declared}",
                    file=CONFIG,
                    key=root.format(layer=i),
                    expected=declared,
                )
            )
    if layer_types is not None and len(layer_types) != n:
        findings.add(
            Diagnostic(
                "warning",
                "config.layer-types-length",
                f"layer_types has {len(layer_types)} entries for {n} layers",
                file=CONFIG,
                key="layer_types",
            )
        )
    dense_declared: set[int] = set()
    k = cfg.int("first_k_dense_replace")
    if k is not None:
        dense_declared |= set(range(min(k, n)))
    only = cfg.get("mlp_only_layers")
    if isinstance(only, list):
        dense_declared |= {x for x in only if isinstance(x, int)}
    if (k is not None or isinstance(only, list)) and has_moe:
        for i in main_ids:
            r = results[i]
            if r.mlp is None:
                continue
            is_moe = r.mlp.family == "moe"
            if (i in dense_declared) == is_moe:
                want = "dense" if i in dense_declared else "MoE"
                findings.add(
                    Diagnostic(
                        "error",
                        "config.dense-moe-mismatch",
                        f"layer {i} has a {'MoE' if is_moe else 'dense'} MLP by its keys but the "
                        f"config (first_k_dense_replace / mlp_only_layers) makes it {want}",
                        file=CONFIG,
                        key=root.format(layer=i),
                        expected=want,
                    )
                )


def _mtp(
    source: Source,
    cfg: Config,
    ctx: Context,
    prefix: str,
    layers_at: str,
    layer_suffixes: Mapping[int, list[str]],
    extra: list[int],
    n_main: int | None,
    claim: Callable[[str | None], str | None],
    findings: Findings,
) -> tuple[MTP | None, list[str]]:
    """Find MTP in one of three schemes; returns the node and the MTP keys left unclassified."""
    declared = cfg.int(*MTP_COUNT_KEYS) or 0
    keys = [k for k in source.tensors if "mtp" in k]  # every MTP scheme's keys but extra_layers contain "mtp"
    per_depth: dict[int, list[str]] = {}
    scheme = ""
    root = ""
    # Qwen mtp_block: top-level mtp.* (also accepted under the language-model prefix)
    block = MTP_BLOCK
    for base in (b.format(prefix=prefix) for b in MTP_BLOCK_BASES):
        shared_names = [base + n for n in (block.eh_proj, block.final_norm, block.enorm, block.hnorm)]
        layer_re = re.compile(re.escape(base) + r"layers\.(0|[1-9][0-9]*)\.(.+)$")
        hits = [(m, k) for k in keys if k.startswith(base) for m in [layer_re.match(k)]]
        if not hits:
            continue
        scheme, root = block.name, base + "layers.{layer}."
        for m, _ in hits:
            if m is not None:
                per_depth.setdefault(int(m.group(1)), []).append(m.group(2))
        if not all(n in source.tensors for n in shared_names):
            findings.add(
                Diagnostic(
                    "error",
                    "mtp.incomplete",
                    "MTP keys present but the shared fc/norm tensors are missing",
                    file=INDEX_NAME,
                    key=base + "*",
                    expected=", ".join(shared_names),
                )
            )
            return None, [k for _, k in hits]
        for n in shared_names:
            claim(n)
        enorm, hnorm, eh_proj, final_norm = shared_names[2], shared_names[3], shared_names[0], shared_names[1]
        leftover = [k for m, k in hits if m is None and k not in shared_names]
        break
    else:
        leftover = []
        mimo = MTP_LAYERS_BASE.format(prefix=prefix)
        mimo_re = re.compile(re.escape(mimo) + r"(0|[1-9][0-9]*)\.(.+)$")
        for k in keys:
            m = mimo_re.match(k)
            if m is not None:
                per_depth.setdefault(int(m.group(1)), []).append(m.group(2))
            elif k.startswith(mimo):
                leftover.append(k)
        if per_depth:
            scheme, root = MTP_LAYERS.name, mimo + "{layer}."
            y = MTP_LAYERS
            enorm, hnorm, eh_proj, final_norm = y.enorm, y.hnorm, y.eh_proj, y.final_norm
        elif extra:
            scheme, root = EXTRA_LAYERS.name, layers_at + "{layer}."
            assert n_main is not None
            per_depth = {i - n_main: list(layer_suffixes[i]) for i in layer_suffixes if i >= n_main}
            x = EXTRA_LAYERS
            enorm, hnorm, eh_proj, final_norm = x.enorm, x.hnorm, x.eh_proj, x.final_norm

    if not scheme:
        if declared:
            findings.add(
                Diagnostic(
                    "warning",
                    "mtp.declared-absent",
                    f"config declares {declared} MTP layer(s) but the checkpoint has no MTP tensors; "
                    "scanning without MTP",
                    file=CONFIG,
                    key=next((n for n in MTP_COUNT_KEYS if cfg.get(n) is not None), ""),
                )
            )
        return None, []

    offset = (n_main or 0) if scheme == "extra_layers" else 0
    depth = len(per_depth)
    if sorted(per_depth) != list(range(depth)):
        findings.add(
            Diagnostic(
                "error",
                "mtp.gap",
                f"MTP depths {sorted(per_depth)} are not 0..{depth - 1}",
                file=INDEX_NAME,
                key=root.format(layer="*"),
            )
        )
    if declared and declared != depth:
        findings.add(
            Diagnostic(
                "error",
                "config.mtp-depth-mismatch",
                f"config declares {declared} MTP layer(s) but the keys hold {depth}",
                file=CONFIG,
                key="mtp_num_hidden_layers",
                expected=str(depth),
            )
        )
    elif not declared:
        findings.add(
            Diagnostic(
                "warning",
                "mtp.undeclared",
                f"the keys hold {depth} MTP layer(s) but the config declares none",
                file=CONFIG,
            )
        )

    spec = next(x for x in SCHEMES if x.name == scheme)
    shared = spec.shared
    per_depth_names = [] if shared else [enorm, hnorm, eh_proj, final_norm]
    copies = list(spec.copies)
    results: dict[int, LayerResult] = {}
    present_copies: set[str] = set()
    for d, suffixes in sorted(per_depth.items()):
        key_root = root.format(layer=offset + d)
        missing = [n for n in per_depth_names if n not in suffixes]
        if missing:
            findings.add(
                Diagnostic(
                    "error",
                    "mtp.incomplete",
                    f"MTP depth {d} lacks {', '.join(missing)}",
                    file=INDEX_NAME,
                    key=key_root,
                    expected=", ".join(per_depth_names),
                )
            )
        present_copies |= {c for c in copies if c in suffixes}
        inner = [s for s in suffixes if s not in per_depth_names and s not in copies]
        problems: list[Problem] = []
        results[d] = classify_layer(inner, _shape_lookup(source, key_root), ctx, sliding=False, problems=problems)
        _problems_to_diags(problems, key_root, findings)
        leftover.extend(key_root + s for s in results[d].leftover)
        for s in suffixes:
            if s in per_depth_names or s in copies:
                claim(key_root + s)
    inner_groups = make_groups(results, root, name_prefix="mtp_")
    for d, r in results.items():  # MTP inner-layer keys that were classified
        if r.complete:
            key_root = root.format(layer=offset + d)
            for s in per_depth[d]:
                if s not in r.leftover:
                    claim(key_root + s)
    return (
        MTP(
            scheme=spec.name,
            depth=depth,
            root=root,
            parts=Component.make(
                "mtp",
                spec.name,
                {
                    "enorm": enorm,
                    "hnorm": hnorm,
                    "eh_proj": eh_proj,
                    "final_norm": final_norm,
                    "embed_copy": copies[0] if copies and copies[0] in present_copies else None,
                    "head_copy": copies[1] if len(copies) > 1 and copies[1] in present_copies else None,
                },
                flags={"shared": shared, "eh_proj_order": spec.eh_proj_order},
            ),
            inner=inner_groups,
            index_offset=offset,
        ),
        leftover,
    )
