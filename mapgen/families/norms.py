"""Block norms: the norms around a decoder layer's mixer and MLP (the *block shape*).

``pre_norm`` (Llama/Qwen): ``input_layernorm`` before the mixer, ``post_attention_layernorm`` before the MLP
(Megatron ``input_layernorm``/``pre_mlp_layernorm``, or the gated delta-net's fused ``in_proj`` norm).
Other block shapes (Gemma sandwich norms, OLMo-2 post-norms, parallel blocks) are new variants here.
"""

from __future__ import annotations

from mapgen.families._dsl import Family, Slot, Variant

NORMS = Family(
    "norms",
    role="block",
    description="pre-norm block: input norm before the mixer, post-attention norm before the MLP",
    file=__name__,
    slots=(
        Slot("input_norm", ("input_layernorm.weight",)),
        Slot("post_attention_norm", ("post_attention_layernorm.weight",)),
    ),
    variants=(Variant("pre_norm", ("input_norm", "post_attention_norm")),),
)
