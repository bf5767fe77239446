"""Softmax attention: separate q/k/v or a fused qkv projection, optional biases, QK-norm, the Qwen3.5/Qwen3-Next
output gate (``q_proj`` holds ``[q_h; gate_h]`` per head, so it is twice as tall) and attention sinks.

Megatron: ``self_attention.linear_qkv`` (q/k/v interleaved per query group), ``linear_proj`` (row-parallel),
``q_layernorm``/``k_layernorm``, and for sinks (gpt-oss) ``core_attention.softmax_offset`` (megatron-core
``softmax_type="learnable"``: one logit per head joins the softmax and is dropped, split across TP with the heads).
"""

from __future__ import annotations

from mapgen.families._dsl import Dims, Family, Planner, ShapePairs, Slot, Variant, conv1d_shapes, opts
from mapgen.ir import Component

ATTENTION = Family(
    "attention",
    role="mixer",
    description="softmax attention (q/k/v or fused qkv, biases, QK-norm, output gate, sinks)",
    file=__name__,
    roots=("self_attn.", "attention.", "self_attention.", "attn.", "attn.attention."),  # EXAONE-3: attn.attention.
    slots=(
        Slot("q", ("q_proj.weight",)),
        Slot("k", ("k_proj.weight",)),
        Slot("v", ("v_proj.weight",)),
        Slot("qkv", ("qkv_proj.weight", "wqkv.weight", "query_key_value.weight", "c_attn.weight", "W_pack.weight")),
        Slot("o", ("o_proj.weight", "wo.weight", "dense.weight", "c_proj.weight", "out_proj.weight")),
        Slot("q_bias", ("q_proj.bias",)),
        Slot("k_bias", ("k_proj.bias",)),
        Slot("v_bias", ("v_proj.bias",)),
        Slot("qkv_bias", ("qkv_proj.bias", "query_key_value.bias", "c_attn.bias")),
        # GPT-NeoX-Japanese: attention.dense_bias, added after dense (its last layer only); GPT-Neo/OPT out_proj.bias
        Slot("o_bias", ("o_proj.bias", "dense.bias", "c_proj.bias", "out_proj.bias", "dense_bias")),
        # query_layernorm/key_layernorm: Sarvam-MoE (before RoPE), HunYuan (after RoPE: Facts.qk_norm_after_rope)
        Slot("q_norm", ("q_norm.weight", "q_layernorm.weight", "query_layernorm.weight"), init="norm"),
        Slot("k_norm", ("k_norm.weight", "k_layernorm.weight", "key_layernorm.weight"), init="norm"),
        Slot("q_norm_bias", ("q_layernorm.bias",)),  # Persimmon: per-head LayerNorm QK norms (with bias)
        Slot("k_norm_bias", ("k_layernorm.bias",)),
        Slot("sinks", ("sinks", "softmax_offset", "attention_sink_bias")),  # Flint, MiMo-V2-Flash spellings
        # -- recognised so that scan classifies every key, refused by the planner (UNBUILDABLE) ----------------
        Slot("sub_norm", ("attn_sub_norm.weight",), init="norm"),  # BitNet: a norm before o_proj
        # AFMoE: o_proj(attn * sigmoid(gate_proj(x))); Laguna: attn * softplus(g_proj(x)) (per head or element)
        Slot("gate_sep", ("gate_proj.weight", "g_proj.weight")),
        Slot("lambda_q1", ("lambda_q1",)),  # DiffLlama differential attention
        Slot("lambda_k1", ("lambda_k1",)),
        Slot("lambda_q2", ("lambda_q2",)),
        Slot("lambda_k2", ("lambda_k2",)),
        Slot("output_gate_proj", ("output_gate.weight",)),  # MiniMax lightning (linear) attention
        Slot("out_norm", ("norm.weight",), init="norm"),
        Slot("slope_rate", ("slope_rate",)),  # ... and its decay buffers, stored beside the weights
        Slot("query_decay", ("query_decay",)),
        Slot("key_decay", ("key_decay",)),
        Slot("diagonal_decay", ("diagonal_decay",)),
        Slot("kv", ("kv_proj.weight",)),  # JetMoE mixture of attention heads (MoA)
        Slot("moa_in", ("experts.input_linear.weight",)),
        Slot("moa_out", ("experts.output_linear.weight",)),
        Slot("moa_router", ("experts.router.layer.weight",)),
        Slot("moa_bias", ("experts.bias",)),
    ),
    variants=(
        Variant("separate", ("o", "q", "k", "v"),
                ("q_bias", "k_bias", "v_bias", "qkv_bias", "o_bias", "q_norm", "k_norm", "q_norm_bias", "k_norm_bias",
                 "sinks", "sub_norm", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "gate_sep")),
        Variant("lightning", ("o", "qkv", "output_gate_proj", "out_norm"),
                ("slope_rate", "query_decay", "key_decay", "diagonal_decay")),
        Variant("fused", ("o", "qkv"),
                ("q_bias", "k_bias", "v_bias", "qkv_bias", "o_bias", "q_norm", "k_norm", "q_norm_bias", "k_norm_bias",
                 "sinks", "sub_norm")),
        Variant("mixture_of_heads", ("kv", "moa_in", "moa_out", "moa_router"), ("moa_bias",)),
    ),
    excludes=("kv_a_proj_with_mqa.weight",),
    flags=("output_gate", "sliding_window", "qkv_layout", "conv1d", "qk_norm_projection"),
)

FUSED_QKV_LAYOUT: dict[str, str] = {
    # root + spelling of the fused projection -> how it stores q/k/v (mapgen.ops.qkv): declared, never guessed.
    # The root is part of the key: CodeGen's attn.qkv_proj (an mp_num-interleaved order) is not Phi-3's.
    "self_attn.qkv_proj.weight": "blocks",  # Phi-3/Phi-4: [q (all heads); k; v]
    "attention.wqkv.weight": "per_group",  # InternLM2: per KV group [q heads of the group; k; v]
    # GPT-NeoX: per head [q_h; k_h; v_h] (modeling_gpt_neox.py: view(..., -1, 3 * head_size).chunk(3, -1)), i.e.
    # per group with one head per group (the model is MHA: num_query_groups = num_attention_heads); Falcon's
    # new decoder per KV group [q..; k; v], its multi-query [q; k; v] = one group; Bloom and Persimmon per head
    "attention.query_key_value.weight": "per_group",
    "self_attention.query_key_value.weight": "per_group",
    "self_attn.query_key_value.weight": "per_group",  # Persimmon: view(b, s, heads, 3, head_dim) per head
    "attn.c_attn.weight": "blocks",  # GPT-2: Conv1D output split(hidden, dim=2) -> [q; k; v] (modeling_gpt2.py)
    # Baichuan (remote modeling_baichuan.py): proj.unflatten(-1, (3, hidden_size)) -> q, k, v: [q; k; v] (MHA)
    "self_attn.W_pack.weight": "blocks",
}
CONV1D = frozenset({"c_attn.weight", "c_proj.weight"})
"""GPT-2's ``Conv1D`` spellings: stored ``[in, out]`` when the model type declares it (``Facts.conv1d``; GPT-BigCode
and StarCoder2 use the same names for ``nn.Linear``): rules say ``orientation='in_out'``, the ops read and write
the transposed view."""
UNDECLARED_CONV1D = ("a GPT-2-style spelling (c_attn/c_proj/c_fc) of a model type that declares neither Conv1D "
                     "[in, out] nor nn.Linear [out, in] storage (mapgen/families/model_types.py Facts.conv1d)")


UNBUILDABLE: dict[str, tuple[str, str]] = {
    # a variant or slot -> (what megatron-core 0.16.1's SelfAttention (linear_qkv -> core attention -> linear_proj,
    # optional q/k layernorms) cannot build, the slot whose key the refusal names): plan.megatron-lacks
    "lightning": ("lightning (linear) attention layers (MiniMax: qkv_proj, output_gate, norm): megatron-core has "
                  "no lightning-attention module", "output_gate_proj"),
    "mixture_of_heads": ("mixture-of-attention-heads (JetMoE MoA: routed per-expert q and output projections "
                         "beside one kv_proj): megatron-core's SelfAttention has a single q/k/v and output projection",
                         "moa_router"),
    "sub_norm": ("a norm between attention and its output projection (BitNet attn_sub_norm): megatron-core's "
                 "SelfAttention has no norm before linear_proj", "sub_norm"),
    "lambda_q1": ("differential attention (DiffLlama lambda_q1/k1/q2/k2: two softmax maps subtracted, then a group "
                  "norm): megatron-core's core attention computes one softmax map", "lambda_q1"),
}


def kind(c: Component) -> str:
    if c.variant == "lightning":
        return "linear_attention"  # what config.json's layer_types calls these layers
    return "sliding_attention" if c.flag("sliding_window") else "attention"


DERIVED_BUFFERS = frozenset(root + "rotary_emb.inv_freq" for root in ATTENTION.roots)
"""Buffers some checkpoints store beside attention (LLaVA-1.5, older Llama exports): RoPE's inverse frequencies,
a function of the config (transformers recomputes them and ignores the stored copy: a non-persistent buffer).
Scan lists them as one carried group (:data:`DERIVED_BUFFERS_TOWER`), the Megatron model computes its own from
``rotary_base``/``rotary_percent``, and export copies them back from ``--source`` exactly when the source had
them; ``verify`` checks them against the config."""
DERIVED_BUFFERS_TOWER = "derived_rope_buffers"

QK_NORM_PROJECTION = ("QK norms over the whole q / k projection (OLMo-2/3, OLMoE, FlexOlmo: RMSNorm(num_heads * "
                      "head_dim) before the heads are split): megatron-core 0.16.1's SelfAttention builds "
                      "q_layernorm/k_layernorm of hidden_size_per_attention_head and applies them per head (and under "
                      "TP a norm over all heads would need a reduction across ranks)")

INPUT_NORM = "input_layernorm.weight"
"""Megatron's name for the block's pre-mixer norm (a separate module with the local spec)."""


def facts(c: Component) -> dict[str, bool]:
    """The Megatron config facts this component decides (``mapgen.contract.config.Facts`` fields)."""
    return {
        "add_qkv_bias": bool(c.key("q_bias") or c.key("qkv_bias")),
        "add_bias_linear": bool(c.key("o_bias")),
        "qk_layernorm": bool(c.key("q_norm")),
        "attention_output_gate": bool(c.flag("output_gate")),
        "attention_sinks": bool(c.key("sinks")),
    }


def describe(c: Component) -> str:
    traits = ["fused qkv" if c.key("qkv") else "q/k/v"]
    if c.key("q_bias") or c.key("qkv_bias"):
        traits.append("qkv bias")
    if c.key("o_bias"):
        traits.append("o bias")
    if c.key("q_norm"):
        traits.append("qk-norm")
    if c.flag("output_gate"):
        traits.append("output gate")
    if c.key("sinks"):
        traits.append("sinks")
    return ("sliding-window attention" if c.flag("sliding_window") else "attention") + f" ({', '.join(traits)})"


def shapes(c: Component, d: Dims) -> ShapePairs:
    q_rows = d.heads * d.head_dim * (2 if c.flag("output_gate") else 1)
    kv_rows = d.kv_heads * d.head_dim
    qkv_rows = d.heads * d.head_dim + 2 * kv_rows
    if c.variant == "lightning":  # MiniMax lightning attention: q, k, v over all heads
        qkv_rows = 3 * d.heads * d.head_dim
    full = c.flag("qk_norm_projection") is True  # declared per model type, never read off the shapes
    q_norm, k_norm = ((d.heads * d.head_dim,), (kv_rows,)) if full else ((d.head_dim,), (d.head_dim,))
    return conv1d_shapes([
        (c.key("q"), (q_rows, d.hidden)),
        (c.key("k"), (kv_rows, d.hidden)),
        (c.key("v"), (kv_rows, d.hidden)),
        (c.key("qkv"), (qkv_rows, d.hidden)),
        (c.key("o"), (d.hidden, d.heads * d.head_dim)),
        (c.key("q_bias"), (q_rows,)),
        (c.key("k_bias"), (kv_rows,)),
        (c.key("v_bias"), (kv_rows,)),
        (c.key("qkv_bias"), (qkv_rows,)),
        (c.key("o_bias"), (d.hidden,)),
        (c.key("q_norm"), q_norm),
        (c.key("k_norm"), k_norm),
        (c.key("q_norm_bias"), (d.head_dim,)),
        (c.key("k_norm_bias"), (d.head_dim,)),
        (c.key("sinks"), (d.heads,)),
        (c.key("sub_norm"), (d.hidden,)),
        (c.key("output_gate_proj"), (d.heads * d.head_dim, d.hidden)),
        (c.key("out_norm"), (d.heads * d.head_dim,)),
    ], c.flag("conv1d") is True)


def plan(c: Component, p: Planner, mroot: str, hroot: str, domain: str, name: str) -> None:
    lacks = [(what, str(c.key(slot))) for x, (what, slot) in UNBUILDABLE.items() if x in (c.variant, *dict(c.slots))]
    for what, key in lacks:
        p.unbuildable(what, hroot + key)
    if lacks:
        return
    if c.key("gate_sep"):
        p.unsupported("a separate attention output-gate projection (AFMoE gate_proj with a sigmoid, Laguna g_proj "
                      "with a softplus; megatron-core's attention_output_gate is a sigmoid gate read from linear_qkv, "
                      "and mapgen has no rule that moves one there)", hroot + str(c.key("gate_sep")))
        return
    q, k, v, o = c.key("q"), c.key("k"), c.key("v"), c.key("o")
    if c.flag("conv1d") == "undeclared":
        p.unsupported(UNDECLARED_CONV1D, hroot + str(c.key("qkv") or o))
        return
    if c.key("qkv") is not None:
        _plan_fused(c, p, mroot, hroot, domain, name)
        return
    if q is None or k is None or v is None or o is None:
        p.unsupported("an incomplete q/k/v projection set", hroot + "self_attn")
        return
    gate = bool(c.flag("output_gate"))
    p.add("attention.qkv", f"{mroot}self_attention.linear_qkv.weight", (hroot + q, hroot + k, hroot + v), "qkv",
          "qkv_groups", domain=domain, options=opts(output_gate=gate, part="weight"),
          comment=f"[{name}] q/k/v -> linear_qkv, interleaved per query group"
          + (" (q_proj carries the output gate)" if gate else "") + "; TP splits whole groups.")
    biases = (c.key("q_bias"), c.key("k_bias"), c.key("v_bias"))
    if any(biases):
        if not all(biases):
            p.unsupported("a partial q/k/v bias", hroot + str(next(b for b in biases if b)))
            return
        p.add("attention.qkv_bias", f"{mroot}self_attention.linear_qkv.bias", tuple(hroot + str(b) for b in biases),
              "qkv", "qkv_groups", domain=domain, options=opts(output_gate=gate, part="bias"),
              comment=f"[{name}] q/k/v biases, grouped like the weights.")
    p.add("attention.o", f"{mroot}self_attention.linear_proj.weight", (hroot + o,), "copy", "row", domain=domain,
          comment=f"[{name}] Output projection: row-parallel.")
    _plan_common(c, p, mroot, hroot, domain, name)


def _plan_fused(c: Component, p: Planner, mroot: str, hroot: str, domain: str, name: str) -> None:
    layout = str(c.flag("qkv_layout", ""))
    qkv_key = str(c.key("qkv"))
    if not layout:
        p.unsupported("a fused qkv projection with no declared q/k/v order", hroot + qkv_key)
        return
    conv1d = c.flag("conv1d") is True
    stored = {"orientation": "in_out"} if conv1d else {}
    p.add("attention.qkv", f"{mroot}self_attention.linear_qkv.weight", (hroot + qkv_key,), "qkv", "qkv_groups",
          domain=domain, options=opts(layout=layout, output_gate=False, part="weight", **stored),
          comment=f"[{name}] fused qkv ({layout}) -> linear_qkv, regrouped per query group"
          + (" (Conv1D: stored [in, out])." if conv1d else "."))
    if c.key("qkv_bias"):
        p.add("attention.qkv_bias", f"{mroot}self_attention.linear_qkv.bias", (hroot + str(c.key("qkv_bias")),),
              "qkv", "qkv_groups", domain=domain, options=opts(layout=layout, output_gate=False, part="bias"),
              comment=f"[{name}] fused qkv bias, regrouped like the weight.")
    elif c.key("q_bias") or c.key("k_bias") or c.key("v_bias"):
        p.unsupported("separate q/k/v biases beside a fused qkv projection", hroot + qkv_key)
        return
    p.add("attention.o", f"{mroot}self_attention.linear_proj.weight", (hroot + str(c.key("o")),), "copy", "row",
          domain=domain, options=opts(**stored), comment=f"[{name}] Output projection: row-parallel.")
    _plan_common(c, p, mroot, hroot, domain, name)


def _plan_common(c: Component, p: Planner, mroot: str, hroot: str, domain: str, name: str) -> None:
    """The output-projection bias, the attention sinks and QK norms, whatever stores q/k/v."""
    if c.key("o_bias"):
        p.add("attention.o_bias", f"{mroot}self_attention.linear_proj.bias", (hroot + str(c.key("o_bias")),),
              "copy", "replicated", domain=domain, comment=f"[{name}] Output projection bias.")
    if c.key("sinks"):
        # gpt-oss: one learned logit per head joins each softmax and is dropped after it (modeling_gpt_oss.py
        # eager_attention_forward); megatron-core softmax_type="learnable" (DotProductAttention.softmax_offset,
        # [heads / TP] per rank, sharded on axis 0 like the heads themselves)
        p.add("attention.sinks", f"{mroot}self_attention.core_attention.softmax_offset",
              (hroot + str(c.key("sinks")),), "copy", "column", domain=domain,
              comment=f"[{name}] Attention sinks -> learnable softmax offset, one per head; TP splits with the heads.")
    if c.key("q_norm") and p.qk_norm_after_rope:
        p.unbuildable("QK norms applied after RoPE (HunYuan: query_layernorm/key_layernorm on the rotated q/k): "
                      "megatron-core applies q_layernorm/k_layernorm before the rotary embedding",
                      hroot + str(c.key("q_norm")))
        return
    if c.key("q_norm") and c.flag("qk_norm_projection") is True:
        p.unbuildable(QK_NORM_PROJECTION, hroot + str(c.key("q_norm")))
        return
    for side in ("q", "k"):
        weight, bias = c.key(f"{side}_norm"), c.key(f"{side}_norm_bias")
        if weight is None:
            continue
        if bool(bias) != p.layernorm:  # the QK norms are the model's norm type (megatron-core builds them so)
            p.unsupported("a QK-norm bias on a model type not declared LayerNorm" if bias else
                          "an RMS QK-norm in a LayerNorm model (megatron-core builds QK norms of the model's norm "
                          "type)",
                          hroot + str(bias or weight))
            continue
        what = "queries" if side == "q" else "keys"
        p.add(f"attention.{side}_norm", f"{mroot}self_attention.{side}_layernorm.weight", (hroot + weight,), "copy",
              "replicated", domain=domain, comment=f"[{name}] QK-norm on {what} (per head).")
        if bias:
            p.add(f"attention.{side}_norm_bias", f"{mroot}self_attention.{side}_layernorm.bias", (hroot + bias,),
                  "copy", "replicated", domain=domain, comment=f"[{name}] Its LayerNorm bias.")
