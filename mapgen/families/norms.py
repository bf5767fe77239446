"""Block norms: the norms around a decoder layer's mixer and MLP (the *block shape*).

``pre_norm`` (Llama/Qwen): ``input_layernorm`` before the mixer, ``post_attention_layernorm`` before the MLP
(Megatron ``input_layernorm``/``pre_mlp_layernorm``, or the gated delta-net's fused ``in_proj`` norm).
Other block shapes (Gemma sandwich norms, OLMo-2 post-norms, parallel blocks) are new variants here.
"""

from __future__ import annotations

from mapgen.families._dsl import Dims, Family, Planner, ShapePairs, Slot, Variant
from mapgen.ir import Component

NORMS = Family(
    "norms",
    role="block",
    description="pre-norm block: input norm before the mixer, post-attention norm before the MLP",
    file=__name__,
    slots=(
        Slot("input_norm", ("input_layernorm.weight", "attention_norm.weight"), init="norm"),
        Slot("post_attention_norm", ("post_attention_layernorm.weight", "ffn_norm.weight"), init="norm"),
        # LayerNorm biases (StableLM, GPT-NeoX): the model type declares LayerNorm (families/model_types.py)
        Slot("input_norm_bias", ("input_layernorm.bias",)),
        Slot("post_attention_norm_bias", ("post_attention_layernorm.bias",)),
    ),
    variants=(Variant("pre_norm", ("input_norm", "post_attention_norm"),
                      ("input_norm_bias", "post_attention_norm_bias")),),
)
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
}
FUSED_COMMENT = "Pre-mixer norm, fused into the gated delta-net in_proj."


def shapes(c: Component, d: Dims) -> ShapePairs:
    return [(key, (d.hidden,)) for key in c.own_keys()]


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
        bias = c.key(BIAS_OF[slot])
        if bias is not None:
            p.add(family + "_bias", mroot + megatron.removesuffix("weight") + "bias", (hroot + bias,), "copy",
                  "replicated", domain=domain, comment=f"[{name}] Its LayerNorm bias.")
