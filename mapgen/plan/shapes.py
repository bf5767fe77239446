"""The shape of every language-model tensor a layout implies, read off the Hugging Face config (pure, no torch).

:func:`expected_shapes` maps each concrete key of the layout's language model (decoder layers, top-level
tensors, MTP) to the shape the config implies; :func:`shape_problems` compares those with real shapes from
safetensors headers and groups the mismatches by key pattern. ``mapgen synth`` sizes its tensors with
:func:`expected_shapes`, so a synthesized checkpoint and this module cannot drift apart.

Conventions (Hugging Face ``nn.Linear`` weights are ``[out, in]``):

* attention: q ``[heads * head_dim * (2 if output gate), H]``, k/v ``[kv_heads * head_dim, H]``,
  o ``[H, heads * head_dim]``; ``head_dim`` is the config's, else ``hidden_size // num_attention_heads``.
* gated delta-net (Qwen3.5 names ``linear_*``): ``conv_dim = 2 * nk * dk + nv * dv``.
* MLP sizes: dense ``intermediate_size``; routed experts ``moe_intermediate_size`` (``intermediate_size``
  when the config has none, as in Mixtral); shared expert ``shared_expert_intermediate_size`` (else
  ``n_shared_experts * moe_intermediate_size``).
* packed experts: ``out_in`` gate_up ``[E, 2I, H]`` / down ``[E, H, I]``; ``in_out`` transposed per expert.
  MXFP4 packed experts are the tensors the scan reads their ``*_blocks``/``*_scales`` pairs as (dequantized
  ``X``, described like any packed tensor); the pairs themselves are checked by the scan.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mapgen.contract.hf_config import SHARED_COUNT_READS, SHARED_SIZE_READS, HFConfig, multi_query
from mapgen.errors import Diagnostic
from mapgen.families import behaviour, embedding, norms
from mapgen.families import mtp as mtp_family
from mapgen.families._dsl import Dims
from mapgen.families.moe import num_experts
from mapgen.ir import MTP, IndexSet, LayerGroup, Layout

__all__ = ["Shape", "ShapeEntry", "expected_shapes", "shape_entries", "shape_problems"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeEntry:
    """One concrete key, the pattern it was expanded from, and its expected shape."""

    key: str
    pattern: str
    shape: Shape
    layer: int | None = None
    expert: int | None = None


# ---------------------------------------------------------------------------------------------------------
# Dimensions
# ---------------------------------------------------------------------------------------------------------
def _int(hf: HFConfig, *names: str) -> int | None:
    value = hf.get(*names, default=None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def config_dims(config: Mapping[str, Any]) -> Dims:
    hf = HFConfig(config)
    hidden = int(hf.get("hidden_size", "n_embd"))
    heads = _int(hf, "num_attention_heads", "n_head", "num_heads") or 0  # GPT-Neo: num_heads (its catalog row refuses)
    # Falcon/GPT-BigCode: multi_query means one KV head (hf_config.multi_query)
    kv_heads = 1 if multi_query(hf) else (_int(hf, "num_key_value_heads", "num_kv_heads") or heads)
    head_dim = _int(hf, "head_dim") or (hidden // heads if heads else 0)
    intermediate = _int(hf, "intermediate_size", "n_inner", "ffn_dim")
    if intermediate is None and hf.has("n_embd"):  # GPT-2: n_inner null means 4 * n_embd
        intermediate = 4 * hidden
    moe_intermediate = _int(hf, "moe_intermediate_size") or intermediate
    # the shared expert: stated, else the shared experts' count (1 when absent) times one routed expert's size, as
    # hf_config.shared_expert_size reads it for the bridge
    shared = _int(hf, *SHARED_SIZE_READS)
    if shared is None and moe_intermediate:
        shared = int(hf.get(*SHARED_COUNT_READS, default=1)) * moe_intermediate
    gdn_values = [
        _int(hf, n)
        for n in (
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
        )
    ]
    gdn = None
    if all(v is not None for v in gdn_values):
        nk, nv, dk, dv, kernel = (int(v or 0) for v in gdn_values)
        gdn = (nk, nv, dk, dv, kernel)
    mla_values = [_int(hf, n) for n in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")]
    mla = None
    if all(v is not None for v in mla_values):
        kv_rank, nope, rope, v_dim = (int(v or 0) for v in mla_values)
        mla = (_int(hf, "q_lora_rank"), kv_rank, nope, rope, v_dim)
    return Dims(
        hidden=hidden,
        vocab=int(hf.get("vocab_size")),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        moe_intermediate=moe_intermediate,
        shared_intermediate=shared,
        gdn=gdn,
        mla=mla,
        positions=_int(hf, "max_position_embeddings", "n_positions"),
    )


def _group_pairs(group: LayerGroup, d: Dims) -> list[tuple[str, Shape | None]]:
    pairs = norms.shapes(group.block, d) + behaviour(group.mixer).shapes(group.mixer, d)
    pairs += behaviour(group.mlp).shapes(group.mlp, d)
    return [(s, shape) for s, shape in pairs if s is not None]


# ---------------------------------------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------------------------------------
def _group_entries(group: LayerGroup, d: Dims, offset: int = 0) -> Iterator[ShapeEntry]:
    pairs = _group_pairs(group, d)
    experts = num_experts(group.mlp)
    for layer in group.layers:
        root = group.root.replace("{layer}", str(layer + offset))
        for suffix, shape in pairs:
            if shape is None:
                continue
            pattern = group.root + suffix
            if "{expert}" in suffix:
                for e in range(experts):
                    yield ShapeEntry(root + suffix.replace("{expert}", str(e)), pattern, shape, layer + offset, e)
            else:
                yield ShapeEntry(root + suffix, pattern, shape, layer + offset)


def _mtp_entries(mtp: MTP, d: Dims) -> Iterator[ShapeEntry]:
    once, per_depth = mtp_family.shapes(mtp, d)
    for key, shape in once:
        if key is not None and shape is not None:
            yield ShapeEntry(key, key, shape)
    for depth in range(mtp.depth):
        index = depth + mtp.index_offset
        root = mtp.root.replace("{layer}", str(index))
        for suffix, shape in per_depth:
            if suffix is not None and shape is not None:
                yield ShapeEntry(root + suffix, mtp.root + suffix, shape, index)
    for group in mtp.inner:
        yield from _group_entries(group, d, mtp.index_offset)


def shape_entries(layout: Layout, config: Mapping[str, Any]) -> Iterator[ShapeEntry]:
    """Every language-model key with a known shape, with the pattern it came from (layers, experts kept
    symbolic in ``pattern``). MXFP4 packed experts appear as the dequantized tensors the scan presents."""
    d = config_dims(config)
    lm = layout.language_model
    for key, shape in embedding.shapes(lm.top, d):
        if key is not None and shape is not None:
            yield ShapeEntry(key, key, shape)
    for group in lm.groups:
        yield from _group_entries(group, d)
    if lm.mtp is not None:
        yield from _mtp_entries(lm.mtp, d)


def expected_shapes(layout: Layout, config: Mapping[str, Any]) -> dict[str, Shape]:
    """Key -> shape for every language-model key of ``layout`` that ``config`` sizes (towers are not
    described; MXFP4 packed experts as their dequantized tensors)."""
    return {e.key: e.shape for e in shape_entries(layout, config)}


def _fmt(shape: Shape | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(v) for v in shape) + "]"


def shape_problems(layout: Layout, config: Mapping[str, Any], actual: Mapping[str, Shape | None]) -> list[Diagnostic]:
    """Compare real shapes (from safetensors headers) with :func:`expected_shapes`.

    One ``shape.mismatch`` error per (pattern, expected, actual) triple: the first key, and which layers and
    experts share the mismatch. Keys missing from ``actual`` (or with an unknown shape) are not reported.
    """
    groups: dict[tuple[str, Shape, Shape], list[ShapeEntry]] = {}
    for entry in shape_entries(layout, config):
        got = actual.get(entry.key)
        if got is None or tuple(got) == entry.shape:
            continue
        groups.setdefault((entry.pattern, entry.shape, tuple(got)), []).append(entry)
    out: list[Diagnostic] = []
    for (pattern, want, got), entries in sorted(groups.items()):
        where: list[str] = []
        layers = [e.layer for e in entries if e.layer is not None]
        experts = [e.expert for e in entries if e.expert is not None]
        if layers:
            where.append(f"layers {IndexSet.of(layers).braces()}")
        if experts:
            where.append(f"experts {IndexSet.of(experts).braces()}")
        count = f"{len(entries)} tensor{'s' if len(entries) > 1 else ''}"
        out.append(
            Diagnostic(
                "error",
                "shape.mismatch",
                f"{pattern}: shape {_fmt(got)} but the config implies {_fmt(want)} "
                f"({count}{', ' + ', '.join(where) if where else ''})",
                key=entries[0].key,
                expected=_fmt(want),
                hint="the config's sizes (hidden_size, heads, head_dim, intermediate sizes, expert count) do not "
                "describe these tensors: fix config.json or the layout",
            )
        )
    return out
