"""Top-level tensors of the language model: token embedding, final norm, output layer (absent when tied).

Spellings are relative to the language-model prefix (``model.``, ``model.language_model.``); the output layer
is also looked up at the checkpoint root and under the prefix's parent (``lm_head.weight`` beside ``model.``).
"""

from __future__ import annotations

from mapgen.families._dsl import Dims, Family, Planner, ShapePairs, Slot, Variant, opts
from mapgen.ir import Component

EMBEDDING = Family(
    "embedding",
    role="top",
    description="token embedding, final norm and (untied) output layer",
    file=__name__,
    slots=(
        Slot("embedding", ("embed_tokens.weight", "tok_embeddings.weight", "word_embeddings.weight", "wte.weight",
                           "embed_in.weight", "tokens_embed.weight")),  # GPT-1: tokens_embed, positions_embed
        # BioGPT, XGLM: the final LayerNorm is layer_norm
        Slot("final_norm", ("norm.weight", "ln_f.weight", "final_layernorm.weight", "final_layer_norm.weight",
                            "layer_norm.weight"), init="norm"),
        Slot("lm_head", ("lm_head.weight", "output.weight", "embed_out.weight",
                         "output_projection.weight")),  # BioGPT's head (tied by default)
        Slot("final_norm_bias", ("norm.bias", "ln_f.bias", "final_layernorm.bias", "final_layer_norm.bias",
                                 "layer_norm.bias")),
        # GPT-2 learned absolute positions: megatron-core position_embedding_type='learned_absolute'
        # OPT embed_positions: its first Facts.position_offset rows precede position 0 (a count on the component);
        # GPT-1 positions_embed
        Slot("position_embedding", ("wpe.weight", "embed_positions.weight", "positions_embed.weight")),
        # Phi-1/2, GPT-J, CodeGen: a bias on the output layer (refused: GPTModel's output_layer has none)
        Slot("lm_head_bias", ("lm_head.bias", "embed_out.bias")),
        # Bloom: a LayerNorm right after the token embedding (refused: LanguageModelEmbedding has none)
        Slot("embedding_norm", ("word_embeddings_layernorm.weight",)),
        Slot("embedding_norm_bias", ("word_embeddings_layernorm.bias",)),
    ),
    variants=(Variant("tied", ("embedding", "final_norm"),
                      ("final_norm_bias", "position_embedding", "embedding_norm", "embedding_norm_bias")),
              Variant("untied", ("embedding", "final_norm", "lm_head"),
                      ("final_norm_bias", "position_embedding", "lm_head_bias", "embedding_norm",
                       "embedding_norm_bias"))),
)

LAYER_CONTAINERS = ("layers", "h")
"""The segments that number decoder layers: ``model.layers.<n>.``, GPT-2/Falcon-style ``transformer.h.<n>.``."""


def shapes(c: Component, d: Dims) -> ShapePairs:
    offset = c.count("position_offset", 0)
    positions = (d.positions + offset, d.hidden) if d.positions is not None and isinstance(offset, int) else None
    return [(c.key("embedding"), (d.vocab, d.hidden)), (c.key("final_norm"), (d.hidden,)),
            (c.key("position_embedding"), positions),
            (c.key("final_norm_bias"), (d.hidden,)), (c.key("lm_head"), (d.vocab, d.hidden)),
            (c.key("lm_head_bias"), (d.vocab,)), (c.key("embedding_norm"), (d.hidden,)),
            (c.key("embedding_norm_bias"), (d.hidden,))]


def plan_embedding(c: Component, p: Planner) -> None:
    p.add("embedding", "embedding.word_embeddings.weight", (str(c.key("embedding")),), "copy", "vocab",
          domain="global", comment="Token embedding: vocab-parallel; padded on import, truncated on export.")
    if c.key("embedding_norm") is not None:
        p.unbuildable("a LayerNorm on the token embeddings (Bloom word_embeddings_layernorm): megatron-core's "
                      "LanguageModelEmbedding has no norm", str(c.key("embedding_norm")))
    if c.key("position_embedding") is not None:
        offset = c.count("position_offset", 0)
        if not isinstance(offset, int):
            p.unsupported("a learned position table of a model type that declares no position offset (OPT and "
                          "BioGPT look up position + 2; mapgen/families/model_types.py Facts.position_offset)",
                          str(c.key("position_embedding")))
            return
        p.add("position_embedding", "embedding.position_embeddings.weight", (str(c.key("position_embedding")),),
              "copy", "replicated", domain="global", options=opts(roll=offset) if offset else (),
              comment="Learned absolute positions (a plain nn.Embedding in megatron-core: every rank holds it)"
              + (f"; HF row p + {offset} is position p: rows rotated by {offset}, the {offset} rows before "
                 "position 0 kept as Megatron's last rows." if offset else "."))


def plan_head(c: Component, p: Planner, layernorm: bool) -> None:
    if c.key("final_norm") is None:  # a model type with non-parametric norms (OLMo): the block refusal names why
        p.unbuildable("no final norm tensor (OLMo-1's final LayerNorm is non-parametric, GPT-1 has none): "
                      "megatron-core's GPTModel applies a final norm that holds a weight", "(no final norm tensor)")
        return
    p.add("final_norm", "decoder.final_layernorm.weight", (str(c.key("final_norm")),), "copy", "replicated",
          domain="global", comment="Final norm before the output layer.")
    bias = c.key("final_norm_bias")
    if (bias is not None) != layernorm:
        p.unsupported("a final LayerNorm without a bias tensor" if layernorm else
                      "a final-norm bias on a model type not declared LayerNorm (mapgen/families/model_types.py "
                      "Facts.layernorm)", str(bias or c.key("final_norm")))
    elif bias is not None:
        p.add("final_norm_bias", "decoder.final_layernorm.bias", (bias,), "copy", "replicated", domain="global",
              comment="Its LayerNorm bias.")
    if c.key("lm_head") is not None:
        p.add("output", "output_layer.weight", (str(c.key("lm_head")),), "copy", "vocab", domain="global",
              comment="Output layer (untied): vocab-parallel.")
    if c.key("lm_head_bias") is not None:
        p.unbuildable("an output-layer bias (megatron-core's GPTModel builds output_layer with bias=False)",
                      str(c.key("lm_head_bias")))
