"""Tiny random checkpoints with exactly a source's key layout (pure: returns tensors; only the CLI writes).

:func:`synthesize` takes a scanned :class:`~mapgen.ir.Layout` (and, when headers were read, the
source's per-key dtypes and shapes) and returns a shrunk config, sharded tensors and an index such that
``scan`` of the written checkpoint has the same layout fingerprint: the same families, expert storage per
block (the MTP block's decided on its own), key names and prefixes, MTP scheme and towers — only smaller.

How it shrinks:

* layers: new layer ``i`` copies source layer ``i`` (and past the source's end, the source's period), so the
  default count is the shortest prefix in which every layer group occurs (at least 2; a hybrid Qwen3.5
  with full attention every 4th layer gets 4 = 3 gated-delta-net + 1 attention). ``layer_types`` is
  rebuilt from the same mapping, ``full_attention_interval`` / ``decoder_sparse_step`` are kept,
  ``first_k_dense_replace`` is clamped and ``mlp_only_layers`` remapped.
* MTP depth defaults to the source's; a config that declares MTP without MTP tensors stays
  declared-but-absent (no MTP tensor is ever fabricated). DeepSeek extra-layer MTP indices follow
  ``num_hidden_layers``.
* every config size is rewritten where the source had it (``text_config`` or top level); tensor shapes come
  from :func:`mapgen.plan.shapes.expected_shapes` of the shrunk layout and config, so synth and the shape
  checker cannot drift. Tower (vision/audio) keys keep their names with small non-square shapes.

Values are deterministic per (seed, key): normal * 0.02, norm weights uniform in [0.5, 1.5] (so zero-centred
norm transforms ``w - 1`` / ``w + 1`` are exact), ``A_log`` = log(uniform[1, 16]), ``dt_bias`` uniform.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mapgen.contract.expand import expand_braces
from mapgen.contract.hf_config import EXPERT_COUNT_READS, TOP_K_READS
from mapgen.errors import Diagnostic, MapgenError
from mapgen.families import by_name
from mapgen.families import mtp as mtp_family
from mapgen.families.attention import DERIVED_BUFFERS_TOWER
from mapgen.families.moe import experts_of
from mapgen.infer.patterns import compress_keys
from mapgen.infer.summary import make_summary
from mapgen.ir import MTP, Component, Dims, IndexSet, LanguageModel, LayerGroup, Layout, Tower
from mapgen.plan.shapes import Shape, shape_entries

if TYPE_CHECKING:
    import torch

    from mapgen.source import TensorInfo

__all__ = ["SynthOptions", "Synthesized", "shard_names", "synthesize"]

DType = Literal["bf16", "fp32", "keep"]
_MTP_COUNT_KEYS = ("mtp_num_hidden_layers", "num_nextn_predict_layers", "mtp_num_layers")
_EXPERT_COUNT_KEYS = EXPERT_COUNT_READS
_TOP_K_KEYS = (*TOP_K_READS, "experts_per_token")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_TOWER_SMALL = 4096  # tower tensors up to this many elements keep their real (header) shape


@dataclass(frozen=True)
class SynthOptions:
    """Sizes of the synthesized model. ``None`` means "derive from the source" (layers, MTP depth)."""

    seed: int = 0
    layers: int | None = None
    experts: int = 4
    top_k: int = 2
    hidden: int = 48
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 40
    moe_intermediate: int = 28
    shared_intermediate: int = 20
    vocab: int = 160
    mtp_depth: int | None = None
    shards: int = 3
    dtype: DType = "keep"
    linear_key_heads: int = 2
    linear_value_heads: int = 4
    linear_key_head_dim: int = 8
    linear_value_head_dim: int = 6
    linear_conv_kernel: int = 4
    # block-scaled FP8 sources: the tile of the synthesized scales (default: the source's weight_block_size)
    fp8_block: tuple[int, int] | None = None
    # store the packed routed experts as MXFP4 (X_blocks + X_scales, gpt-oss releases); an MXFP4 source is anyway
    mxfp4: bool = False
    # MLA (DeepSeek) low-rank sizes
    q_lora_rank: int = 24
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 8
    qk_rope_head_dim: int = 4
    v_head_dim: int = 8


@dataclass(frozen=True)
class Synthesized:
    """A synthesized checkpoint: what the CLI writes, plus the layout it was built from."""

    config: dict[str, Any]
    shards: Mapping[str, dict[str, torch.Tensor]]  # shard file name -> {key: tensor}, in file order (made on access)
    index: dict[str, Any]
    layout: Layout = field(compare=False)


def _fail(code: str, message: str, **kw: str) -> MapgenError:
    return MapgenError(Diagnostic("error", code, message, **kw))


# ---------------------------------------------------------------------------------------------------------
# Which source layer each new layer copies
# ---------------------------------------------------------------------------------------------------------
def _owner(groups: Sequence[LayerGroup], count: int) -> list[int]:
    """Per layer index ``0..count-1``: the index of the group holding it."""
    out = [-1] * count
    for g, group in enumerate(groups):
        for i in group.layers:
            if i < count:
                out[i] = g
    return out


def _source_map(owner: Sequence[int], start: int, new_count: int) -> list[int]:
    """New layer i -> source layer: i itself inside the source, then the source's period from ``start``."""
    n = len(owner)
    tail = owner[start:]
    period = next(
        (p for p in range(1, len(tail) + 1) if all(tail[i] == tail[i - p] for i in range(p, len(tail)))), len(tail)
    )
    out: list[int] = []
    for i in range(new_count):
        out.append(i if i < n else out[i - period] if period else n - 1)
    return out


def _min_layers(owner: Sequence[int]) -> int:
    """The shortest prefix of the source in which every group occurs."""
    first: dict[int, int] = {}
    for i, g in enumerate(owner):
        first.setdefault(g, i)
    return max(first.values(), default=0) + 1


def _regroup(groups: Sequence[LayerGroup], source_of: Sequence[int], owner: Sequence[int], experts: int,
             what: str) -> tuple[LayerGroup, ...]:  # fmt: skip
    out = []
    for g, group in enumerate(groups):
        layers = [i for i, j in enumerate(source_of) if owner[j] == g]
        if not layers:
            first = min(group.layers)
            raise _fail(
                "synth.too-few-layers",
                f"{len(source_of)} {what} would leave out layer group {group.name!r} (first at {first})",
                expected=f"at least {first + 1} {what}",
                hint="raise --layers / --mtp-depth, or leave it out to use the smallest count that keeps every group",
            )
        mlp = group.mlp
        old = experts_of(mlp)
        if old is not None:
            counts = tuple((k, experts if k == "num_experts" else v) for k, v in old.counts)
            new = dataclasses.replace(old, counts=counts)
            mlp = dataclasses.replace(mlp, children=tuple((k, new if k == "experts" else v) for k, v in mlp.children))
        out.append(dataclasses.replace(group, layers=IndexSet.of(layers), mlp=mlp))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------
class _ConfigWriter:
    """Rewrites fields where the source had them: ``text_config`` first, then the top level."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.top: dict[str, Any] = copy.deepcopy(dict(config))
        text = self.top.get("text_config")
        self.text: dict[str, Any] = text if isinstance(text, dict) else self.top

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    def get(self, name: str) -> Any:
        for scope in (self.text, self.top):
            if scope.get(name) is not None:
                return scope[name]
        return None

    def set(self, name: str, value: Any, *, add: bool = False) -> None:
        for scope in (self.text, self.top):
            if name in scope:
                scope[name] = value
                return
        if add:
            self.text[name] = value


def _mla_heads(w: _ConfigWriter, o: SynthOptions) -> None:
    """MLA: a key and value per query head; DeepSeek's derived head sizes follow the shrunk q/k dims."""
    if w.has("q_lora_rank"):
        w.set("q_lora_rank", o.q_lora_rank)
    if w.has("kv_lora_rank"):
        w.set("num_key_value_heads", o.heads)
        w.set("qk_head_dim", o.qk_nope_head_dim + o.qk_rope_head_dim)
        w.set("head_dim", o.qk_rope_head_dim)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _shrink_config(
    config: Mapping[str, Any],
    o: SynthOptions,
    source_of: Sequence[int],
    source_layers: int,
    mtp_depth: int | None,
) -> dict[str, Any]:
    w = _ConfigWriter(config)
    n = len(source_of)
    w.set("hidden_size", o.hidden, add=True)
    w.set("num_attention_heads", o.heads, add=True)
    # A config without a KV-head count is multi-head attention and stays so: GPT-NeoX, GPT-2 and Persimmon's
    # config classes have no num_key_value_heads, and their models would ignore one written here.
    if w.has("num_key_value_heads"):
        w.set("num_key_value_heads", o.kv_heads)
    if w.has("head_dim") or o.head_dim != o.hidden // o.heads:
        w.set("head_dim", o.head_dim, add=True)
    w.set("vocab_size", o.vocab, add=True)
    for name in _LAYER_COUNT_KEYS:
        w.set(name, n)
    for name, value in (
        ("intermediate_size", o.intermediate),
        ("moe_intermediate_size", o.moe_intermediate),
        ("shared_expert_intermediate_size", o.shared_intermediate),
        ("linear_num_key_heads", o.linear_key_heads),
        ("linear_num_value_heads", o.linear_value_heads),
        ("linear_key_head_dim", o.linear_key_head_dim),
        ("linear_value_head_dim", o.linear_value_head_dim),
        ("linear_conv_kernel_dim", o.linear_conv_kernel),
        ("kv_lora_rank", o.kv_lora_rank),
        ("qk_nope_head_dim", o.qk_nope_head_dim),
        ("qk_rope_head_dim", o.qk_rope_head_dim),
        ("v_head_dim", o.v_head_dim),
    ):
        if w.has(name):
            w.set(name, value)
    _shrink_spellings(w, o)
    _mla_heads(w, o)
    if w.has("n_shared_experts") and not w.has("shared_expert_intermediate_size"):
        w.set("n_shared_experts", 1)
    for name in _EXPERT_COUNT_KEYS:
        if w.has(name):
            w.set(name, o.experts)
    for name in _TOP_K_KEYS:
        k = _int(w.get(name))
        if k is not None:
            w.set(name, max(1, min(k, o.top_k, o.experts)))
    for name in ("n_group", "topk_group"):
        if w.has(name):
            w.set(name, 1)
    # -- per-layer structure -------------------------------------------------------------------------------
    types = w.get("layer_types")
    if isinstance(types, list) and types:
        w.set("layer_types", [types[j % len(types)] for j in source_of])
    k_dense = _int(w.get("first_k_dense_replace"))
    if k_dense is not None:
        w.set("first_k_dense_replace", min(k_dense, n))
    only = w.get("mlp_only_layers")
    if isinstance(only, list):
        w.set("mlp_only_layers", [i for i, j in enumerate(source_of) if j in only])
    window_layers = _int(w.get("max_window_layers"))
    if window_layers is not None and window_layers >= source_layers:
        w.set("max_window_layers", n)
    elif window_layers is not None:
        w.set("max_window_layers", min(window_layers, n))
    if mtp_depth is not None:
        for name in _MTP_COUNT_KEYS:
            if w.has(name):
                w.set(name, mtp_depth)
    _remap_token_ids(w, o.vocab)
    _shrink_mrope(w, o.head_dim)
    # -- towers' projection into the text model, dtype label -----------------------------------------------
    for tower in ("vision_config", "audio_config"):
        sub = w.top.get(tower)
        if isinstance(sub, dict) and "out_hidden_size" in sub:
            sub["out_hidden_size"] = o.hidden
    if o.dtype != "keep":
        label = "bfloat16" if o.dtype == "bf16" else "float32"
        for scope in (w.top, w.text):
            for name in ("dtype", "torch_dtype"):
                if name in scope:
                    scope[name] = label
    return w.top


def _shrink_spellings(w: _ConfigWriter, o: SynthOptions) -> None:
    """Sizes under other model types' names: OPT's ``ffn_dim`` and GPT-2's ``n_inner`` (null: 4 * hidden, kept
    so), OPT's ``word_embed_proj_dim`` (equal to hidden_size when project_in/out are absent, and kept equal)."""
    for name in ("ffn_dim", "n_inner"):
        if w.get(name) is not None:
            w.set(name, o.intermediate)
    if w.has("word_embed_proj_dim"):
        w.set("word_embed_proj_dim", o.hidden)


def _shrink_mrope(w: _ConfigWriter, head_dim: int) -> None:
    """M-RoPE sections (rotary pairs per temporal/height/width axis) must add up to half the new head dim: shrink
    them in proportion, the last section taking the rounding."""
    for name in ("rope_scaling", "rope_parameters"):
        rope = w.get(name)
        sections = rope.get("mrope_section") if isinstance(rope, dict) else None
        if not isinstance(sections, list) or not sections or not all(_int(x) for x in sections):
            continue
        total, pairs = sum(sections), head_dim // 2
        new = [max(1, x * pairs // total) for x in sections[:-1]]
        rope["mrope_section"] = [*new, pairs - sum(new)]


def _remap_token_ids(w: _ConfigWriter, vocab: int) -> None:
    """``*_token_id(s)`` outside the new vocabulary move to its top ids (distinct ids stay distinct)."""
    scopes = [w.top] if w.text is w.top else [w.top, w.text]
    found: set[int] = set()

    def ids(value: Any) -> list[int]:
        items = value if isinstance(value, list) else [value]
        return [v for v in items if _int(v) is not None]

    for scope in scopes:
        for name, value in scope.items():
            if name.endswith(("_token_id", "_token_ids")):
                found.update(v for v in ids(value) if v >= vocab)
    new = {old: vocab - 1 - rank for rank, old in enumerate(sorted(found))}

    def fix(value: Any) -> Any:
        if isinstance(value, list):
            return [fix(v) for v in value]
        return new.get(value, value) if _int(value) is not None else value

    for scope in scopes:
        for name in list(scope):
            if name.endswith(("_token_id", "_token_ids")):
                scope[name] = fix(scope[name])


# ---------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------
def _check_supported(layout: Layout) -> None:
    problems: list[Diagnostic] = []
    if layout.quantization not in ("none", "fp8_block", "mxfp4") or any(
        (e := experts_of(g.mlp)) is not None and e.flag("quant") != "none"
        for g in layout.language_model.groups + (layout.language_model.mtp.inner if layout.language_model.mtp else ())
    ):
        problems.append(
            Diagnostic(
                "error",
                "synth.unsupported",
                f"{layout.quantization} quantized experts are not supported by synth (their packed blocks/scales "
                "have no shape mapgen can derive from the config)",
                expected="an unquantized source (bf16/fp16/fp32)",
            )
        )
    if layout.unclassified:
        problems.append(
            Diagnostic(
                "error",
                "synth.unclassified",
                f"{layout.summary.unclassified_keys} key(s) of the source fit no layer family; synth cannot size them",
                key=layout.unclassified[0].pattern,
                hint="run `mapgen scan SOURCE` to list them",
            )
        )
    if problems:
        raise MapgenError(problems)


def _shrunk_layout(layout: Layout, o: SynthOptions) -> tuple[Layout, list[int], int | None]:
    """The layout of the synthesized checkpoint, new layer -> source layer, and the new MTP depth (``None``
    when the source has no MTP tensors)."""
    lm = layout.language_model
    owner = _owner(lm.groups, lm.num_layers)
    k_dense = _int(layout.config.get("first_k_dense_replace")) or _int(
        (layout.config.get("text_config") or {}).get("first_k_dense_replace")
    )
    default = max(2, _min_layers(owner))
    count = o.layers if o.layers is not None else default
    if count < 1:
        raise _fail("synth.bad-option", f"--layers {count}: need at least one layer")
    source_of = _source_map(owner, min(k_dense or 0, len(owner)), count)
    groups = _regroup(lm.groups, source_of, owner, o.experts, "layers")

    mtp: MTP | None = None
    new_depth: int | None = None
    if lm.mtp is None:
        if o.mtp_depth:
            declared = layout.summary.mtp_declared
            raise _fail(
                "synth.no-mtp",
                f"--mtp-depth {o.mtp_depth}: the source has no MTP tensors"
                + (f" (its config declares {declared} MTP layer(s) but the checkpoint holds none)" if declared else "")
                + "; synth never fabricates MTP weights",
                hint="synthesize from a source that stores MTP weights",
            )
    else:
        new_depth = o.mtp_depth if o.mtp_depth is not None else lm.mtp.depth
        if new_depth > 0:
            inner_owner = _owner(lm.mtp.inner, lm.mtp.depth)
            depth_map = _source_map(inner_owner, 0, new_depth)
            inner = _regroup(lm.mtp.inner, depth_map, inner_owner, o.experts, "MTP layers")
            offset = count if lm.mtp.scheme == "extra_layers" else lm.mtp.index_offset
            mtp = dataclasses.replace(lm.mtp, depth=new_depth, inner=inner, index_offset=offset)

    language_model = dataclasses.replace(lm, groups=groups, num_layers=count, mtp=mtp)
    towers = tuple(_shrunk_buffers(t, count) if t.name == DERIVED_BUFFERS_TOWER else t for t in layout.towers)
    return dataclasses.replace(layout, language_model=language_model, towers=towers), source_of, new_depth


def _shrunk_buffers(tower: Tower, count: int) -> Tower:
    """The derived RoPE buffers of the kept decoder layers (the source's are per layer: ``<prefix>{0..N}.<rest>``)."""
    rests = sorted({key[len(tower.prefix):].split(".", 1)[1] for p in tower.patterns for key in expand_braces(p)})
    keys = [f"{tower.prefix}{i}.{rest}" for i in range(count) for rest in rests]
    return dataclasses.replace(tower, num_keys=len(keys), patterns=tuple(p for p, _ in compress_keys(keys)))


def _inv_freq(layout: Layout, config: Mapping[str, Any]) -> Any:
    """RoPE's inverse frequencies for the synthesized config, read with the bridge's own config rows."""
    import torch

    from mapgen.contract.config import CONFIG, Facts, row_value
    from mapgen.contract.hf_config import HFConfig

    hf, rows = HFConfig(config), {r.field: r for r in CONFIG}
    dim, pct, base = (row_value(rows[f], hf, layout, Facts()) for f in ("kv_channels", "rotary_percent", "rotary_base"))
    rot = int(dim * pct)
    return 1.0 / (float(base) ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))


def _finish_layout(layout: Layout, config: Mapping[str, Any], o: SynthOptions) -> Layout:
    """Summary and dims of the shrunk layout, as scan will read them back."""
    get = _ConfigWriter(config).get
    declared = next((v for k in _MTP_COUNT_KEYS for v in [_int(get(k))] if v), 0)
    summary = make_summary(
        model_type=layout.model_type,
        language_model=layout.language_model,
        towers=layout.towers,
        unclassified_keys=0,
        mtp_declared=declared,
    )
    dims = Dims(
        hidden_size=o.hidden,
        num_attention_heads=o.heads,
        num_key_value_heads=_int(get("num_key_value_heads")) or o.heads,
        head_dim=_int(get("head_dim")) or o.hidden // o.heads,
        intermediate_size=_int(get("intermediate_size")) or 0,
        moe_intermediate_size=_int(get("moe_intermediate_size")) or 0,
        shared_expert_intermediate_size=_int(get("shared_expert_intermediate_size")) or 0,
        vocab_size=o.vocab,
        num_experts_per_tok=_int(get("num_experts_per_tok")) or _int(get("experts_per_token")) or 0,
    )
    return dataclasses.replace(layout, summary=summary, dims=dims, config=dict(config), diagnostics=())


# ---------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------
def _init_kinds(c: Component, root: str, out: dict[str, str]) -> None:
    family = by_name(c.family)
    for slot, key in c.slots:
        kind = family.init_of(slot)
        if kind != "normal":
            out[root + key] = kind
    for _, child in c.children:
        _init_kinds(child, root, out)


def _init_patterns(lm: LanguageModel) -> dict[str, str]:
    """Key patterns (as :func:`~mapgen.plan.shapes.shape_entries` names them) -> synth initialisation kind, for
    every slot whose family declares one other than ``normal`` (norms, the gated delta-net's decay)."""
    out: dict[str, str] = {}
    _init_kinds(lm.top, "", out)
    groups = lm.groups + (lm.mtp.inner if lm.mtp else ())
    for g in groups:
        for c in g.components:
            _init_kinds(c, g.root, out)
    if lm.mtp is not None:
        mtp = lm.mtp
        norms = mtp_family.norm_keys(mtp)
        out.update((n if mtp.shared else mtp.root + n, "norm") for n in norms)
    return out


def _tower_shape(key: str, info: TensorInfo | None) -> Shape:
    if info is not None and info.shape is not None:
        if math.prod(info.shape) <= _TOWER_SMALL:
            return info.shape
        return (3, 5, 2, 2, 2, 2)[: len(info.shape)] if info.shape else ()
    if key.endswith((".bias", "norm.weight")) or not key.endswith(".weight"):
        return (5,)
    return (3, 5)


def _values(key: str, shape: Shape, kind: str, seed: int, dtype: torch.dtype) -> torch.Tensor:
    import torch

    # The CPU generator keeps only 32 bits of its seed: hash the (seed, key) pair down to them.
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))
    if kind == "norm":
        t = torch.rand(shape, generator=gen) + 0.5
    elif kind == "a_log":
        t = torch.log(torch.rand(shape, generator=gen) * 15 + 1)
    elif kind == "dt_bias":
        t = torch.rand(shape, generator=gen) * 2 - 1
    else:
        t = torch.randn(shape, generator=gen) * 0.02
    return t.to(dtype)


def _copies(lm: LanguageModel) -> dict[str, str]:
    """Duplicated HF keys -> the key whose values they repeat."""
    mtp = lm.mtp
    out: dict[str, str] = {}
    if mtp is None:
        return out
    head = lm.lm_head if lm.lm_head is not None and not lm.tied_embeddings else lm.embedding
    for depth in range(mtp.depth):
        root = mtp.root.replace("{layer}", str(depth + mtp.index_offset))
        embed_copy, head_copy = mtp.parts.key("embed_copy"), mtp.parts.key("head_copy")
        if embed_copy:
            out[root + embed_copy] = lm.embedding
        if head_copy:
            out[root + head_copy] = head
    return out


def shard_names(count: int) -> list[str]:
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def synthesize(
    layout: Layout,
    options: SynthOptions | None = None,
    *,
    tensors: Mapping[str, TensorInfo] | None = None,
) -> Synthesized:
    """A tiny random checkpoint with ``layout``'s key layout. ``tensors``: the source's per-key metadata
    (dtype/shape from headers, when read) — dtypes are kept under ``dtype="keep"``, small tower shapes too."""
    import torch

    o = options or SynthOptions()
    tensors = tensors or {}
    _check_supported(layout)
    for what, total, part in (
        ("--heads", o.heads, o.kv_heads),
        ("linear value heads", o.linear_value_heads, o.linear_key_heads),
        ("--experts", o.experts, 1),
    ):
        if part < 1 or total < 1 or total % part:
            raise _fail("synth.bad-option", f"{what} = {total} is not a positive multiple of {part}")
    shrunk, source_of, mtp_depth = _shrunk_layout(layout, o)
    config = _shrink_config(layout.config, o, source_of, layout.language_model.num_layers, mtp_depth)
    shrunk = _finish_layout(shrunk, config, o)

    shapes: dict[str, tuple[Shape, str]] = {}
    kinds = _init_patterns(shrunk.language_model)
    for entry in shape_entries(shrunk, config):
        kind = kinds.get(entry.pattern, "normal")
        shapes[entry.key] = (entry.shape, kind)
    fixed: dict[str, Any] = {}
    for tower in shrunk.towers:
        for pattern in tower.patterns:
            for key in expand_braces(pattern):
                if tower.name == DERIVED_BUFFERS_TOWER:  # derived from the config: the values it implies
                    fixed[key] = _inv_freq(shrunk, config)
                    shapes[key] = (tuple(fixed[key].shape), "normal")
                    continue
                shape = _tower_shape(key, tensors.get(key))
                kind = "norm" if len(shape) == 1 and key.endswith("norm.weight") else "normal"
                shapes[key] = (shape, kind)

    forced: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}

    def dtype_of(key: str) -> torch.dtype:
        if o.dtype in forced:
            return forced[o.dtype]
        info = tensors.get(key)
        name = _SAFETENSORS_DTYPES.get(info.dtype or "") if info is not None else None
        return getattr(torch, name) if name else torch.bfloat16

    keys = sorted(shapes)
    count = max(1, min(o.shards, len(keys)))
    names = shard_names(count)
    bounds = [round(i * len(keys) / count) for i in range(count + 1)]
    weight_map: dict[str, str] = {}
    total = 0
    copies = _copies(shrunk.language_model)
    for s, name in enumerate(names):
        for key in keys[bounds[s] : bounds[s + 1]]:
            weight_map[key] = name
            origin = copies.get(key, key)
            total += math.prod(shapes[key][0]) * dtype_of(origin).itemsize

    def make(name: str) -> dict[str, torch.Tensor]:
        # A tensor HF stores twice (DeepSeek/GLM MTP embedding and head copies) gets the same values.
        # Derived buffers (RoPE inverse frequencies) get the values the config implies.
        return {key: fixed[key].to(dtype_of(key)) if key in fixed else
                _values(copies.get(key, key), shapes[key][0], shapes[key][1], o.seed, dtype_of(copies.get(key, key)))
                for key in keys if weight_map[key] == name}

    if layout.quantization == "fp8_block":  # quantized across the shards in place: made eagerly (small)
        shards = {name: make(name) for name in names}
        total += _quantize_fp8(shards, weight_map, config, tensors, o)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        return Synthesized(config=config, shards=shards, index=index, layout=shrunk)
    if layout.quantization == "mxfp4" or o.mxfp4:
        shards = {name: make(name) for name in names}
        total += _quantize_mxfp4(shards, weight_map, config, shrunk)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        return Synthesized(config=config, shards=shards, index=index, layout=shrunk)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return Synthesized(config=config, shards=_LazyShards(names, make), index=index, layout=shrunk)


class _LazyShards(Mapping[str, "dict[str, torch.Tensor]"]):
    """Shard name -> its tensors, made (deterministically, from the seed and each key) when asked for: a
    16 GiB checkpoint is written one shard at a time instead of held whole in memory."""

    def __init__(self, names: Sequence[str], make: Callable[[str], dict[str, torch.Tensor]]) -> None:
        self._names, self._make = list(names), make

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._names:
            raise KeyError(name)
        return self._make(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_NUMBERED = re.compile(r"\.\d+\.")


def _quantize_fp8(shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str], config: dict[str, Any],
                  source: Mapping[str, TensorInfo], o: SynthOptions) -> int:
    """Block-scaled FP8 like the source: every weight whose key pattern (layer and expert numbers aside) has
    scales in the source is stored as e4m3 beside its ``weight_scale_inv``, in the same shard; the config's
    ``weight_block_size`` is the tile used. Returns the bytes added."""
    from mapgen.infer.build import FP8_SCALE, fp8_scales
    from mapgen.runtime.quant import quantize_blocks

    quantized = {_NUMBERED.sub(".N.", weight) for weight in fp8_scales(source)}
    qc = dict(config.get("quantization_config") or {})
    block = o.fp8_block or tuple(qc.get("weight_block_size") or (128, 128))
    tile = (int(block[0]), int(block[1]))
    qc["weight_block_size"] = list(tile)
    config["quantization_config"] = qc
    added = 0
    for name, shard in shards.items():
        for key in list(shard):
            value = shard[key]
            if value.dim() != 2 or _NUMBERED.sub(".N.", key) not in quantized:  # noqa: PLR2004 (a matrix)
                continue
            q, scales = quantize_blocks(value, tile)
            added += q.numel() * q.element_size() + scales.numel() * scales.element_size()
            added -= value.numel() * value.element_size()
            shard[key] = q
            scale_key = key.removesuffix(".weight") + FP8_SCALE
            shard[scale_key] = scales
            weight_map[scale_key] = name
    return added


def _quantize_mxfp4(shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str], config: dict[str, Any],
                    layout: Layout) -> int:
    """MXFP4 like the gpt-oss releases: every packed routed-experts ``gate_up`` / ``down`` tensor ``X`` ``[E, in,
    out]`` is stored as ``X_blocks`` (uint8 ``[E, out, in / 32, 16]``) beside ``X_scales`` (uint8 ``[E, out, in /
    32]``) in the same shard; ``quantization_config`` is the source's, or ``{quant_method: mxfp4,
    modules_to_not_convert: [every other module]}``. Returns the bytes added."""
    from mapgen.infer.build import MXFP4_BLOCKS, MXFP4_GROUP, MXFP4_SCALES, split_layer
    from mapgen.runtime.quant import quantize_mxfp4

    lm = layout.language_model
    packed = [e for g in lm.groups + (lm.mtp.inner if lm.mtp else ())
              if (e := experts_of(g.mlp)) is not None and e.flag("layout") == "packed"]
    suffixes = {key for e in packed for slot in ("gate_up", "down") if (key := e.key(slot))}
    if not suffixes:
        raise _fail("synth.bad-option", "MXFP4 stores packed routed experts, and this layout has none",
                    expected="a source with packed experts (mlp.experts.gate_up_proj / down_proj)")
    experts = tuple({suffix.rsplit(".", 1)[0] + "." for suffix in suffixes})
    added = 0
    kept: set[str] = set()
    for name, shard in shards.items():
        for key in list(shard):
            value, where = shard[key], split_layer(key)
            if where is None or where[2] not in suffixes or value.dim() != 3:  # noqa: PLR2004 ([E, in, out])
                module = _NUMBERED.sub(".*.", key).rsplit(".", 1)[0]
                if (value.dim() > 1 or key.endswith(".bias")) and not (where and where[2].startswith(experts)):
                    kept.add(module)
                continue
            if value.shape[1] % MXFP4_GROUP:
                raise _fail("synth.bad-option", f"{key} has {value.shape[1]} inputs a row: MXFP4 packs groups of "
                            f"{MXFP4_GROUP}", key=key,
                            hint="pass --hidden, --intermediate and --moe-intermediate as multiples of 32")
            blocks, scales = quantize_mxfp4(value.transpose(1, 2))
            del shard[key], weight_map[key]
            shard[key + MXFP4_BLOCKS], shard[key + MXFP4_SCALES] = blocks, scales
            weight_map[key + MXFP4_BLOCKS] = weight_map[key + MXFP4_SCALES] = name
            added += blocks.numel() + scales.numel() - value.numel() * value.element_size()
    if not isinstance(config.get("quantization_config"), dict):
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": sorted(kept)}
    return added


def shrunk_config(layout: Layout, options: SynthOptions | None = None) -> tuple[dict[str, Any], Layout]:
    """The shrunk config.json and layout :func:`synthesize` would write, without any tensor (pure, no torch):
    the config keeps every field of the source and rewrites only sizes and per-layer structure."""
    o = options or SynthOptions()
    _check_supported(layout)
    shrunk, source_of, mtp_depth = _shrunk_layout(layout, o)
    config = _shrink_config(layout.config, o, source_of, layout.language_model.num_layers, mtp_depth)
    return config, _finish_layout(shrunk, config, o)


def copy_sources(layout: Layout) -> dict[str, str]:
    """Keys a checkpoint of ``layout`` stores twice (DeepSeek/GLM MTP embedding and head copies) -> the key they
    copy: a twin must hold the same values under both."""
    return _copies(layout.language_model)
