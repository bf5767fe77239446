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
  MXFP4 packed experts (``*_blocks``/``*_scales``) are not described: their keys are left out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mapgen.contract.hf_config import HFConfig
from mapgen.errors import Diagnostic
from mapgen.infer.ir import MLA, MTP, Attention, DenseMLP, Experts, GatedDeltaNet, IndexSet, LayerGroup, Layout, MoE

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
@dataclass(frozen=True)
class _Dims:
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int | None
    moe_intermediate: int | None
    shared_intermediate: int | None
    gdn: tuple[int, int, int, int, int] | None  # nk, nv, dk, dv, conv kernel
    mla: tuple[int | None, int, int, int, int] | None  # q_lora_rank, kv_lora_rank, nope, rope, v_head_dim


def _int(hf: HFConfig, *names: str) -> int | None:
    value = hf.get(*names, default=None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dims(config: Mapping[str, Any]) -> _Dims:
    hf = HFConfig(config)
    hidden = int(hf.get("hidden_size"))
    heads = _int(hf, "num_attention_heads") or 0
    kv_heads = _int(hf, "num_key_value_heads") or heads
    head_dim = _int(hf, "head_dim") or (hidden // heads if heads else 0)
    intermediate = _int(hf, "intermediate_size")
    moe_intermediate = _int(hf, "moe_intermediate_size") or intermediate
    shared = _int(hf, "shared_expert_intermediate_size")
    if shared is None:
        n_shared = _int(hf, "n_shared_experts")
        shared = n_shared * moe_intermediate if n_shared and moe_intermediate else intermediate
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
    return _Dims(
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
    )


# ---------------------------------------------------------------------------------------------------------
# Per family: (suffix, shape) pairs; a suffix may hold ``{expert}``. ``None`` shapes are unknown (omitted).
# ---------------------------------------------------------------------------------------------------------
_Pairs = list[tuple[str | None, Shape | None]]


def _attention(a: Attention, d: _Dims) -> _Pairs:
    q_rows = d.heads * d.head_dim * (2 if a.output_gate else 1)
    kv_rows = d.kv_heads * d.head_dim
    qkv_rows = d.heads * d.head_dim + 2 * kv_rows
    return [
        (a.q, (q_rows, d.hidden)),
        (a.k, (kv_rows, d.hidden)),
        (a.v, (kv_rows, d.hidden)),
        (a.qkv, (qkv_rows, d.hidden)),
        (a.o, (d.hidden, d.heads * d.head_dim)),
        (a.q_bias, (q_rows,)),
        (a.k_bias, (kv_rows,)),
        (a.v_bias, (kv_rows,)),
        (a.qkv_bias, (qkv_rows,)),
        (a.o_bias, (d.hidden,)),
        (a.q_norm, (d.head_dim,)),
        (a.k_norm, (d.head_dim,)),
        (a.sinks, (d.heads,)),
    ]


def _gated_delta_net(g: GatedDeltaNet, d: _Dims) -> _Pairs:
    if d.gdn is None:
        return [(s, None) for s in (g.conv1d, g.a_log, g.dt_bias, g.norm, g.out_proj)]
    nk, nv, dk, dv, kernel = d.gdn
    key_dim, value_dim = nk * dk, nv * dv
    conv_dim = 2 * key_dim + value_dim
    return [
        (g.in_proj_qkv, (conv_dim, d.hidden)),
        (g.in_proj_z, (value_dim, d.hidden)),
        (g.in_proj_b, (nv, d.hidden)),
        (g.in_proj_a, (nv, d.hidden)),
        (g.in_proj_qkvz, (2 * key_dim + 2 * value_dim, d.hidden)),
        (g.in_proj_ba, (2 * nv, d.hidden)),
        (g.conv1d, (conv_dim, 1, kernel)),
        (g.conv1d_bias, (conv_dim,)),
        (g.a_log, (nv,)),
        (g.dt_bias, (nv,)),
        (g.norm, (dv,)),
        (g.out_proj, (d.hidden, value_dim)),
    ]


def _mla(m: MLA, d: _Dims) -> _Pairs:
    if d.mla is None:
        return [(s, None) for s in (m.kv_a_proj_with_mqa, m.kv_a_layernorm, m.kv_b_proj, m.o)]
    q_rank, kv_rank, nope, rope, v_dim = d.mla
    q_rows = d.heads * (nope + rope)
    return [
        (m.q_a_proj, (q_rank, d.hidden) if q_rank else None),
        (m.q_a_layernorm, (q_rank,) if q_rank else None),
        (m.q_b_proj, (q_rows, q_rank) if q_rank else None),
        (m.q, (q_rows, d.hidden)),
        (m.kv_a_proj_with_mqa, (kv_rank + rope, d.hidden)),
        (m.kv_a_layernorm, (kv_rank,)),
        (m.kv_b_proj, (d.heads * (nope + v_dim), kv_rank)),
        (m.o, (d.hidden, d.heads * v_dim)),
    ]


def _dense(m: DenseMLP, hidden: int, inter: int | None) -> _Pairs:
    if inter is None:
        return [(s, None) for s in (m.gate, m.up, m.gate_up, m.down)]
    return [
        (m.gate, (inter, hidden)),
        (m.up, (inter, hidden)),
        (m.gate_up, (2 * inter, hidden)),
        (m.down, (hidden, inter)),
        (m.gate_bias, (inter,)),
        (m.up_bias, (inter,)),
        (m.down_bias, (hidden,)),
    ]


def _experts(x: Experts, d: _Dims) -> _Pairs:
    inter, hidden, e = d.moe_intermediate, d.hidden, x.num_experts
    if x.layout == "per_expert":
        mlp = DenseMLP(
            down=x.down, gate=x.gate, up=x.up, gate_up=x.gate_up,
            gate_bias=x.gate_bias, up_bias=x.up_bias, down_bias=x.down_bias,
        )  # fmt: skip
        return _dense(mlp, hidden, inter)
    if inter is None:
        return []
    if x.orientation == "out_in":
        gate_up, down = (e, 2 * inter, hidden), (e, hidden, inter)
    else:
        gate_up, down = (e, hidden, 2 * inter), (e, inter, hidden)
    biases: _Pairs = [(x.gate_up_bias, (e, 2 * inter)), (x.down_bias, (e, hidden))]
    if x.quant != "none":  # MXFP4 blocks/scales: not described (left out); the biases are plain tensors
        return biases
    return [(x.gate_up, gate_up), (x.down, down), *biases]


def _moe(m: MoE, d: _Dims) -> _Pairs:
    e = m.experts.num_experts
    pairs: _Pairs = [(m.router, (e, d.hidden)), (m.router_bias, (e,)), (m.expert_bias, (e,))]
    pairs += _experts(m.experts, d)
    if m.shared is not None:
        pairs += _dense(m.shared.mlp, d.hidden, d.shared_intermediate)
        pairs.append((m.shared.gate, (1, d.hidden)))
    return pairs


def _group_pairs(group: LayerGroup, d: _Dims) -> list[tuple[str, Shape | None]]:
    pairs: _Pairs = [(group.input_norm, (d.hidden,)), (group.post_attention_norm, (d.hidden,))]
    mixer = group.mixer
    if isinstance(mixer, Attention):
        pairs += _attention(mixer, d)
    elif isinstance(mixer, GatedDeltaNet):
        pairs += _gated_delta_net(mixer, d)
    else:
        pairs += _mla(mixer, d)
    if isinstance(group.mlp, MoE):
        pairs += _moe(group.mlp, d)
    else:
        pairs += _dense(group.mlp, d.hidden, d.intermediate)
    return [(s, shape) for s, shape in pairs if s is not None]


# ---------------------------------------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------------------------------------
def _group_entries(group: LayerGroup, d: _Dims, offset: int = 0) -> Iterator[ShapeEntry]:
    pairs = _group_pairs(group, d)
    experts = group.mlp.experts.num_experts if isinstance(group.mlp, MoE) else 0
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


def _mtp_entries(mtp: MTP, d: _Dims) -> Iterator[ShapeEntry]:
    h = d.hidden
    per_depth: list[tuple[str, Shape]] = [
        (mtp.enorm, (h,)), (mtp.hnorm, (h,)), (mtp.eh_proj, (h, 2 * h)), (mtp.final_norm, (h,)),
    ]  # fmt: skip
    if mtp.shared:
        for key, shape in per_depth:
            yield ShapeEntry(key, key, shape)
        per_depth = []
    per_depth += [(c, (d.vocab, h)) for c in (mtp.embed_copy, mtp.head_copy) if c]
    for depth in range(mtp.depth):
        index = depth + mtp.index_offset
        root = mtp.root.replace("{layer}", str(index))
        for suffix, shape in per_depth:
            yield ShapeEntry(root + suffix, mtp.root + suffix, shape, index)
    for group in mtp.inner:
        yield from _group_entries(group, d, mtp.index_offset)


def shape_entries(layout: Layout, config: Mapping[str, Any]) -> Iterator[ShapeEntry]:
    """Every language-model key with a known shape, with the pattern it came from (layers, experts kept
    symbolic in ``pattern``). MXFP4 packed experts are left out."""
    d = _dims(config)
    lm = layout.language_model
    top = [(lm.embedding, (d.vocab, d.hidden)), (lm.final_norm, (d.hidden,))]
    if lm.lm_head is not None:
        top.append((lm.lm_head, (d.vocab, d.hidden)))
    for key, shape in top:
        yield ShapeEntry(key, key, shape)
    for group in lm.groups:
        yield from _group_entries(group, d)
    if lm.mtp is not None:
        yield from _mtp_entries(lm.mtp, d)


def expected_shapes(layout: Layout, config: Mapping[str, Any]) -> dict[str, Shape]:
    """Key -> shape for every language-model key of ``layout`` that ``config`` sizes (towers are not
    described; MXFP4 packed experts are left out rather than guessed)."""
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
