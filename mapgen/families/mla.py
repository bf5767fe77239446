"""DeepSeek multi-latent attention: ``q_a_proj``/``q_a_layernorm``/``q_b_proj`` (or a full-rank ``q_proj``),
``kv_a_proj_with_mqa`` (latent + rope part), ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``.

Megatron (``MLASelfAttention``, the local layer spec with its QK norms): ``linear_q_down_proj`` /
``q_layernorm`` / ``linear_q_up_proj`` (or ``linear_q_proj``), ``linear_kv_down_proj``, ``kv_layernorm``,
``linear_kv_up_proj``, ``linear_proj``. Split across TP (``mapgen.runtime.megatron`` pins each):

* ``linear_q_up_proj`` / ``linear_q_proj`` rows are head-major ``[h: qk_nope + qk_rope]`` and
  ``linear_kv_up_proj`` rows ``[h: qk_nope + v]``, as in HF's ``q_b_proj``/``kv_b_proj``: column-parallel, so a TP
  rank holds whole heads;
* the down projections are ``ColumnParallelLinear`` in the local spec (rows split across TP, the output gathered
  before the norms; TE's spec replicates them): rank r holds a contiguous row chunk of ``q_a_proj`` and of
  ``kv_a_proj_with_mqa`` (``[latent; rope]``);
* the latent norms are replicated (they act on the gathered latents); ``linear_proj`` is row-parallel.

RoPE dims: DeepSeek stores them interleaved in pairs (transformers' ``rope_interleave``, V2's complex rotation);
megatron-core's MLA de-interleaves the same way before rotating (``_apply_rotary_pos_emb_bshd`` with
``multi_latent_attention``), so the rope rows are copied unpermuted. ``rope_interleave: false`` is refused by the
config catalog.
"""

from __future__ import annotations

from mapgen.families._dsl import Dims, Family, Planner, ShapePairs, Slot, Variant
from mapgen.ir import Component

_CORE = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o")
_INDEXER = ("indexer_wq_b_weight", "indexer_wk_weight", "indexer_k_norm_weight", "indexer_k_norm_bias",
            "indexer_weights_proj_weight")

MLA = Family(
    "mla",
    role="mixer",
    description="multi-latent attention (DeepSeek-V2/V3, Kimi-K2)",
    file=__name__,
    roots=("self_attn.",),
    slots=(
        Slot("kv_a_proj_with_mqa", ("kv_a_proj_with_mqa.weight",)),
        Slot("kv_a_layernorm", ("kv_a_layernorm.weight",), init="norm"),
        Slot("kv_b_proj", ("kv_b_proj.weight",)),
        Slot("o", ("o_proj.weight",)),
        Slot("q_a_proj", ("q_a_proj.weight",)),
        Slot("q_a_layernorm", ("q_a_layernorm.weight",), init="norm"),
        Slot("q_b_proj", ("q_b_proj.weight",)),
        Slot("q", ("q_proj.weight",)),
        # DeepSeek-V3.2-style sparse-attention ("lightning") indexer (A.X-K2): classified, refused by the planner
        *(Slot(f"indexer_{n.replace('.', '_')}", (f"indexer.{n}",), init="norm" if n == "k_norm.weight" else "normal")
          for n in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")),
    ),
    variants=(
        Variant("q_low_rank", (*_CORE, "q_a_proj", "q_a_layernorm", "q_b_proj"), _INDEXER),
        Variant("q_full_rank", (*_CORE, "q"), _INDEXER),
    ),
)

INPUT_NORM = "input_layernorm.weight"


def facts(c: Component) -> dict[str, bool]:
    return {"mla": True}


def kind(c: Component) -> str:
    """``indexed_attention`` with a sparse-attention indexer (what DeepSeek-V3.2-style configs declare in
    layer_types), else ``mla``."""
    return "indexed_attention" if c.key("indexer_wq_b_weight") else "mla"


def describe(c: Component) -> str:
    return "MLA (" + ("q low-rank" if c.key("q_a_proj") else "q full-rank") + ")"


def shapes(c: Component, d: Dims) -> ShapePairs:
    if d.mla is None:
        return [(c.key(s), None) for s in ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o")]
    q_rank, kv_rank, nope, rope, v_dim = d.mla
    q_rows = d.heads * (nope + rope)
    return [
        (c.key("q_a_proj"), (q_rank, d.hidden) if q_rank else None),
        (c.key("q_a_layernorm"), (q_rank,) if q_rank else None),
        (c.key("q_b_proj"), (q_rows + d.heads * v_dim, 2 * q_rank) if c.flag("gated_q") and q_rank
         else (q_rows, q_rank) if q_rank else None),
        (c.key("q"), (q_rows, d.hidden)),
        (c.key("kv_a_proj_with_mqa"), (kv_rank + rope, d.hidden)),
        (c.key("kv_a_layernorm"), (kv_rank,)),
        (c.key("kv_b_proj"), (d.heads * (nope + v_dim), kv_rank)),
        (c.key("o"), (d.hidden, d.heads * v_dim)),
    ]


# (rule family, Megatron suffix under self_attention., HF slot, declared sharding, what it is): every MLA tensor is a
# plain copy; only its split differs.
_Q_LOW_RANK = (
    ("mla.q_down", "linear_q_down_proj.weight", "q_a_proj", "column",
     "q_a_proj -> linear_q_down_proj (local spec: column-parallel, gathered)"),
    ("mla.q_norm", "q_layernorm.weight", "q_a_layernorm", "replicated", "q latent norm"),
    ("mla.q_up", "linear_q_up_proj.weight", "q_b_proj", "column",
     "q_b_proj -> linear_q_up_proj: head-major [nope; rope] rows, whole heads per rank"),
)
_Q_FULL_RANK = (
    ("mla.q", "linear_q_proj.weight", "q", "column",
     "full-rank q_proj -> linear_q_proj: head-major [nope; rope] rows, whole heads per rank"),
)
_KV_O = (
    ("mla.kv_down", "linear_kv_down_proj.weight", "kv_a_proj_with_mqa", "column",
     "kv_a_proj_with_mqa [latent; rope] -> linear_kv_down_proj (column-parallel, gathered)"),
    ("mla.kv_norm", "kv_layernorm.weight", "kv_a_layernorm", "replicated", "kv latent norm"),
    ("mla.kv_up", "linear_kv_up_proj.weight", "kv_b_proj", "column",
     "kv_b_proj -> linear_kv_up_proj: head-major [nope; v] rows, whole heads per rank"),
    ("mla.o", "linear_proj.weight", "o", "row", "Output projection: row-parallel"),
)


def plan(c: Component, p: Planner, mroot: str, hroot: str, domain: str, name: str) -> None:
    if c.flag("gated_q"):
        p.unbuildable("a gated MLA query projection (A.X-K2 q_b_proj: the q latent normed and raw, [q_a_layernorm(c); "
                      "c], to a per-head query and a sigmoid output gate): megatron-core's MLASelfAttention has "
                      "neither", hroot + str(c.key("q_b_proj")))
    if c.key("indexer_wq_b_weight"):
        p.unsupported("a sparse-attention indexer (DeepSeek-V3.2-style lightning indexer: indexer.wq_b/wk/k_norm/"
                      "weights_proj, A.X-K2)", hroot + str(c.key("indexer_wq_b_weight")))
    q = _Q_LOW_RANK if c.key("q_a_proj") is not None else _Q_FULL_RANK
    for family, target, slot, sharding, what in (*q, *_KV_O):
        p.add(family, f"{mroot}self_attention.{target}", (hroot + str(c.key(slot)),), "copy", sharding,
              domain=domain, comment=f"[{name}] {what}.")
