"""Block norms: the norms around a decoder layer's mixer and MLP (the *block shape*).

``pre_norm`` (Llama/Qwen): ``input_layernorm`` before the mixer, ``post_attention_layernorm`` before the MLP
(Megatron ``input_layernorm``/``pre_mlp_layernorm``, or the gated delta-net's fused ``in_proj`` norm).

The other block shapes are recognised so that scan classifies every key, and refused by name by the planner
(:data:`UNSUPPORTED`): megatron-core 0.16.1's ``TransformerLayer`` computes
``x + attn(input_layernorm(x))`` then ``x + mlp(pre_mlp_layernorm(x))`` and has no other norm slot
(``TransformerLayerSubmodules``: input_layernorm, pre_cross_attn_layernorm, pre_mlp_layernorm), so it cannot
build a norm on a sub-block's output (Gemma-2/3 sandwich norms, OLMo-2 post-norms) nor attention and MLP in
parallel from the same input (Falcon ``parallel_attn``/``new_decoder_architecture``, GPT-J, Phi-1/2, Cohere).
A block's variant is decided by its keys; a parallel block whose keys equal a sequential one (GPT-NeoX
``use_parallel_residual``) is refused by the config catalog.
"""

from __future__ import annotations

from mapgen.families._dsl import Dims, Family, Planner, ShapePairs, Slot, Variant
from mapgen.ir import Component

NORMS = Family(
    "norms",
    role="block",
    description="the block's norms: pre-norm (converted); sandwich, post-norm and parallel blocks (refused)",
    file=__name__,
    slots=(
        # OPT: self_attn_layer_norm before attention, the layer's final_layer_norm before fc1 (pre-norm when
        # do_layer_norm_before; the post-norm OPT-350m is refused by the config catalog); Apertus:
        # attention_layernorm/feedforward_layernorm; Bamba/Jamba/Falcon-H1: pre_ff_layernorm
        # OLMo-Hybrid's checkpoints: attention_layer_norm / feedforward_layer_norm (conversion_mapping.py renames
        # them onto input_layernorm / post_attention_layernorm, in post-norm attention layers too)
        # A.X-K2: a gated RMSNorm's own norm under .norm (its low-rank gate: the *_gate_down/_gate_up slots)
        Slot("input_norm", ("input_layernorm.weight", "attention_norm.weight", "ln_1.weight",
                            "self_attn_layer_norm.weight", "attention_layernorm.weight", "attention_layer_norm.weight",
                            "input_layernorm.norm.weight"), init="norm"),
        Slot("post_attention_norm", ("post_attention_layernorm.weight", "ffn_norm.weight", "ln_2.weight",
                                     "final_layer_norm.weight", "feedforward_layernorm.weight",
                                     "pre_ff_layernorm.weight", "feedforward_layer_norm.weight",
                                     "post_attention_layernorm.norm.weight"), init="norm"),
        # A.X-K2 AXK2GatedRMSNorm: y = RMSNorm(x) * sigmoid(W_up(act(W_down(y)))), Megatron-LM's GatedNormWrapper
        *(Slot(f"{norm}_gate_{w.lower().removeprefix('w_')}", (f"{spelled}.{w}.weight",))
          for norm, spelled in (("input_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"))
          for w in ("W_down", "W_up")),
        # LayerNorm biases (StableLM, GPT-NeoX): the model type declares LayerNorm (families/model_types.py)
        Slot("input_norm_bias", ("input_layernorm.bias", "ln_1.bias", "self_attn_layer_norm.bias")),
        Slot("post_attention_norm_bias", ("post_attention_layernorm.bias", "ln_2.bias", "final_layer_norm.bias")),
        # Gemma-2/3 sandwich and OLMo-2 post-norms: norms on the attention / MLP outputs
        Slot("pre_feedforward_norm", ("pre_feedforward_layernorm.weight",), init="norm"),
        Slot("post_feedforward_norm", ("post_feedforward_layernorm.weight",), init="norm"),
        # Falcon new_decoder_architecture: one norm per parallel branch
        # GLM-4 post_self_attn_layernorm/post_mlp_layernorm, HyperCLOVA X post_norm1/post_norm2 (input_layernorm and
        # post_attention_layernorm stay the pre-norms), A.X-K1 post_mlp_layernorm on the MoE output
        # (Kolibri-1 stores them as post_attn_norm/post_ffn_norm: conversion_mapping.py renames them onto GLM-4's)
        Slot("attention_output_norm", ("post_self_attn_layernorm.weight", "post_norm1.weight", "post_attn_norm.weight"),
             init="norm"),
        Slot("mlp_output_norm", ("post_mlp_layernorm.weight", "post_norm2.weight", "post_ffn_norm.weight"),
             init="norm"),
        Slot("pre_mlp_norm", ("pre_mlp_layernorm.weight",), init="norm"),  # AFMoE: the MLP's input norm
        Slot("attention_branch_norm", ("ln_attn.weight",), init="norm"),
        Slot("mlp_branch_norm", ("ln_mlp.weight",), init="norm"),
        Slot("attention_branch_norm_bias", ("ln_attn.bias",)),
        Slot("mlp_branch_norm_bias", ("ln_mlp.bias",)),
    ),
    variants=(
        Variant("gated_pre_norm", ("input_norm", "post_attention_norm", "input_norm_gate_down", "input_norm_gate_up"),
                ("post_attention_norm_gate_down", "post_attention_norm_gate_up")),
        Variant("sandwich", ("input_norm", "post_attention_norm", "pre_feedforward_norm", "post_feedforward_norm")),
        Variant("sandwich_outputs", ("input_norm", "post_attention_norm", "attention_output_norm", "mlp_output_norm")),
        # AFMoE: post_attention_layernorm on the attention output, pre_mlp/post_mlp_layernorm around the MLP
        Variant("sandwich_pre_mlp", ("input_norm", "post_attention_norm", "pre_mlp_norm", "mlp_output_norm")),
        Variant("pre_norm_mlp_output", ("input_norm", "post_attention_norm", "mlp_output_norm")),
        Variant("pre_norm", ("input_norm", "post_attention_norm"), ("input_norm_bias", "post_attention_norm_bias")),
        Variant("post_norm", ("post_attention_norm", "post_feedforward_norm")),
        # VaultGemma: a pre-norm block whose pre-MLP norm is spelled pre_feedforward_layernorm
        Variant("pre_norm_ff", ("input_norm", "pre_feedforward_norm")),
        Variant("parallel_two_norms", ("attention_branch_norm", "mlp_branch_norm"),
                ("attention_branch_norm_bias", "mlp_branch_norm_bias")),
        Variant("parallel_one_norm", ("input_norm",), ("input_norm_bias",)),
    ),
)
_NO_SLOT = ("megatron-core 0.16.1's TransformerLayer has no norm on a sub-block's output (its norm slots are "
            "input_layernorm, pre_cross_attn_layernorm and pre_mlp_layernorm)")
_PARALLEL = ("megatron-core 0.16.1's TransformerLayer runs attention, then the MLP on the attention's residual "
             "output; it has no parallel attention + MLP block")
UNSUPPORTED: dict[str, str] = {
    # block variant -> what megatron-core lacks (the planner refuses the layout by name)
    "sandwich": f"sandwich norms (Gemma-2/3: norms after attention and after the MLP): {_NO_SLOT}",
    "sandwich_outputs": f"norms on the attention and MLP outputs (GLM-4 post_self_attn_layernorm/post_mlp_layernorm, "
                        f"HyperCLOVA X post_norm1/post_norm2): {_NO_SLOT}",
    "sandwich_pre_mlp": f"sandwich norms (AFMoE: post_attention_layernorm on the attention output, pre_mlp_layernorm "
                        f"and post_mlp_layernorm around the MLP): {_NO_SLOT}",
    "pre_norm_mlp_output": f"a norm on the MLP/MoE output before the residual add (A.X-K1 post_mlp_layernorm): "
                           f"{_NO_SLOT}",
    "post_norm": f"a post-norm block (OLMo-2: norms after attention and after the MLP only): {_NO_SLOT}",
    "gated_pre_norm": "gated RMSNorms (A.X-K2: RMSNorm(x) times the sigmoid of a low-rank MLP of it, Megatron-LM's "
                      "GatedNormWrapper): megatron-core 0.16.1's TransformerLayer norms are plain RMSNorm / LayerNorm",
    "parallel_two_norms": f"a parallel attention + MLP block with a norm per branch (Falcon ln_attn/ln_mlp): "
                          f"{_PARALLEL}",
    "parallel_one_norm": f"a parallel attention + MLP block from one norm (GPT-J, Phi-1/2, Falcon parallel_attn, "
                         f"Cohere): {_PARALLEL}",
}
NON_PARAMETRIC = "non_parametric"
"""The block of a model type whose norms hold no tensors (``Facts.non_parametric_norms``): no slots, so it is not a
declared variant (an empty variant would match every layer); scan makes it only for those model types."""
UNSUPPORTED[NON_PARAMETRIC] = (
    "non-parametric LayerNorms (OLMo: F.layer_norm without weight or bias tensors): megatron-core's norms always hold "
    "a weight (and LayerNorm a bias), and mapgen has no rule that writes constant ones and zeros for them")
POST_LN = "post_ln"
"""The block of a model type whose ``ln_1``/``ln_2`` follow the residual adds (``Facts.post_layernorm``): the keys
equal a pre-norm block's, so scan makes it from the model type, never from the keys."""
UNSUPPORTED[POST_LN] = f"post-LayerNorm blocks (GPT-1: ln_1(x + attn(x)), ln_2(x + mlp(x)), no final norm): {_NO_SLOT}"
BIAS_OF = {"input_norm": "input_norm_bias", "post_attention_norm": "post_attention_norm_bias"}
"""A norm weight's bias slot: Megatron's name is the weight's with ``.bias``."""

# Where each norm of a block shape sits in Megatron: (slot, before which component, Megatron name, comment).
# ``None`` as the name: the mixer family's ``INPUT_NORM`` (separate with attention, fused into the gated
# delta-net's in_proj).
PLACEMENT: dict[str, tuple[tuple[str, str, str | None, str], ...]] = {
    "pre_norm": (
        ("input_norm", "mixer", None, "Pre-attention norm."),
        ("post_attention_norm", "mlp", "pre_mlp_layernorm.weight", "Pre-MLP norm."),
    ),
    "pre_norm_ff": (
        ("input_norm", "mixer", None, "Pre-attention norm."),
        ("pre_feedforward_norm", "mlp", "pre_mlp_layernorm.weight", "Pre-MLP norm (pre_feedforward_layernorm)."),
    ),
}
FUSED_COMMENT = "Pre-mixer norm, fused into the gated delta-net in_proj."


def shapes(c: Component, d: Dims) -> ShapePairs:
    """Norm weights (and biases) are ``[hidden]``; a gated norm's low-rank gate (rank: ``gated_norm_rank``, not
    mapped) is not checked."""
    return [(key, None if "_gate_" in slot else (d.hidden,)) for slot, key in c.slots]


def norm_keys(c: Component) -> list[str]:
    """Key suffixes that are norm weights (synth initialises them near 1; biases stay small)."""
    return [str(c.key(slot)) for slot in BIAS_OF if c.key(slot)]


def check_biases(c: Component, layernorm: bool, p: Planner, hroot: str) -> bool:
    """LayerNorm needs every bias and RMSNorm none: megatron-core's torch LayerNorm always has one (and a bias on
    a norm the model type does not declare LayerNorm could be any of several norms). False when refused."""
    missing = [w for w, b in BIAS_OF.items() if bool(c.key(b)) != layernorm]
    if not missing:
        return True
    if layernorm:
        p.unsupported("a LayerNorm without a bias tensor (megatron-core's LayerNorm always has one)",
                      hroot + str(c.key(missing[0])))
    else:
        p.unsupported("a norm bias on a model type not declared LayerNorm (mapgen/families/model_types.py "
                      "Facts.layernorm)", hroot + str(c.key(BIAS_OF[missing[0]])))
    return False


def plan_before(c: Component, where: str, mixer_input_norm: str, p: Planner, mroot: str, hroot: str,
                domain: str, name: str) -> None:
    """The rules of the block's norms that sit before ``where`` (``mixer`` or ``mlp``)."""
    for slot, before, target, comment in PLACEMENT[c.variant]:
        if before != where:
            continue
        key = c.key(slot)
        assert key is not None
        megatron = target or mixer_input_norm
        fused = target is None and mixer_input_norm != "input_layernorm.weight"
        family = "norm.input" if slot == "input_norm" else f"norm.{slot.removesuffix('_norm')}"
        p.add(family, mroot + megatron, (hroot + key,), "copy", "replicated", domain=domain,
              comment=f"[{name}] {FUSED_COMMENT if fused else comment}")
        bias = c.key(BIAS_OF[slot]) if slot in BIAS_OF else None
        if bias is not None:
            p.add(family + "_bias", mroot + megatron.removesuffix("weight") + "bias", (hroot + bias,), "copy",
                  "replicated", domain=domain, comment=f"[{name}] Its LayerNorm bias.")
