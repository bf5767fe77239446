"""Top-level tensors of the language model: token embedding, final norm, output layer (absent when tied).

Spellings are relative to the language-model prefix (``model.``, ``model.language_model.``); the output layer
is also looked up at the checkpoint root and under the prefix's parent (``lm_head.weight`` beside ``model.``).
"""

from __future__ import annotations

from mapgen.families._dsl import Family, Slot, Variant

EMBEDDING = Family(
    "embedding",
    role="top",
    description="token embedding, final norm and (untied) output layer",
    file=__name__,
    slots=(
        Slot("embedding", ("embed_tokens.weight",)),
        Slot("final_norm", ("norm.weight",)),
        Slot("lm_head", ("lm_head.weight",)),
    ),
    variants=(Variant("tied", ("embedding", "final_norm")), Variant("untied", ("embedding", "final_norm", "lm_head"))),
    flags=("tied_embeddings",),
)

LAYERS_CONTAINER = "layers"
"""The segment that numbers decoder layers: ``<prefix>layers.<n>.``."""
