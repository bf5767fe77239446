"""Multi-token prediction: three storage schemes, each declared as data; the matching is an explicit hook in
:mod:`mapgen.infer.build` (MTP is irregular: it spans top-level keys, extra decoder layers and inner layers).

``mtp_block`` (Qwen3-Next/3.5/3.6): ``mtp.fc``/``mtp.norm``/``mtp.pre_fc_norm_*`` stored once for all depths,
inner layers ``mtp.layers.<d>.*``. ``extra_layers`` (DeepSeek-V3/GLM-4.5): decoder layers ``model.layers.<N+d>``
with ``enorm``/``hnorm``/``eh_proj``/``shared_head.norm`` and duplicated ``embed_tokens``/``shared_head.head``.
``mtp_layers`` (MiMo): ``model.mtp_layers.<d>.*`` with ``token_layernorm``/``hidden_layernorm``/``input_proj``/
``final_layernorm``; its projection takes ``[hidden; embedding]``.

Megatron: ``mtp.layers.<d>.{enorm,hnorm,eh_proj,final_layernorm}`` and the inner transformer layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mapgen.families._dsl import Dims, Planner, ShapePairs, opts
from mapgen.ir import MTP


@dataclass(frozen=True)
class MtpScheme:
    """One MTP storage scheme. Spellings are relative to the scheme's root (or full keys under the base
    when ``shared``)."""

    name: Literal["mtp_block", "extra_layers", "mtp_layers"]
    enorm: str
    hnorm: str
    eh_proj: str
    final_norm: str
    shared: bool = False
    copies: tuple[str, ...] = ()
    eh_proj_order: Literal["embedding_hidden", "hidden_embedding"] = "embedding_hidden"


MTP_BLOCK = MtpScheme("mtp_block", enorm="pre_fc_norm_embedding.weight", hnorm="pre_fc_norm_hidden.weight",
                      eh_proj="fc.weight", final_norm="norm.weight", shared=True)
EXTRA_LAYERS = MtpScheme("extra_layers", enorm="enorm.weight", hnorm="hnorm.weight", eh_proj="eh_proj.weight",
                         final_norm="shared_head.norm.weight",
                         copies=("embed_tokens.weight", "shared_head.head.weight"))
MTP_LAYERS = MtpScheme("mtp_layers", enorm="token_layernorm.weight", hnorm="hidden_layernorm.weight",
                       eh_proj="input_proj.weight", final_norm="final_layernorm.weight",
                       eh_proj_order="hidden_embedding")

SCHEMES = (MTP_BLOCK, EXTRA_LAYERS, MTP_LAYERS)

MTP_BLOCK_BASES = ("mtp.", "{prefix}mtp.")
"""Where a Qwen ``mtp_block`` lives: at the checkpoint root, or under the language-model prefix."""
MTP_LAYERS_BASE = "{prefix}mtp_layers."
MTP_COUNT_KEYS = ("mtp_num_hidden_layers", "num_nextn_predict_layers", "mtp_num_layers")
"""Config keys that declare the MTP depth."""
EXTRA_LAYER_MARKER = "eh_proj.weight"
"""A decoder layer holding this suffix is a DeepSeek-style extra MTP layer, not a main decoder layer."""


def shapes(mtp: MTP, d: Dims) -> tuple[ShapePairs, ShapePairs]:
    """(tensors stored once for every depth as full keys, per-depth tensors as suffixes of ``mtp.root``)."""
    h = d.hidden
    parts: ShapePairs = [(mtp.parts.key(s), shape) for s, shape in
                         (("enorm", (h,)), ("hnorm", (h,)), ("eh_proj", (h, 2 * h)), ("final_norm", (h,)))]
    copies: ShapePairs = [(mtp.parts.key(s), (d.vocab, h)) for s in ("embed_copy", "head_copy")]
    return (parts, copies) if mtp.shared else ([], parts + copies)


def norm_keys(mtp: MTP) -> list[str]:
    return [k for s in ("enorm", "hnorm", "final_norm") if (k := mtp.parts.key(s))]


def plan(mtp: MTP, tied: bool, p: Planner) -> None:
    """The MTP-level rules (the inner layers are planned like decoder layer groups)."""
    hroot = mtp.root.replace("{layer}", "{hf_layer}") if mtp.index_offset else mtp.root

    def key(slot: str) -> tuple[str, ...]:
        name = str(mtp.parts.key(slot))
        return (name if mtp.shared else hroot + name,)

    note = " (one HF tensor shared by every depth)" if mtp.shared else ""
    shared = opts(shared=True) if mtp.shared else ()
    order = str(mtp.parts.flag("eh_proj_order", "embedding_hidden"))
    m = "mtp.layers.{layer}."
    p.add("mtp.enorm", f"{m}enorm.weight", key("enorm"), "copy", "replicated", domain="mtp", options=shared,
          comment=f"MTP embedding norm{note}.")
    p.add("mtp.hnorm", f"{m}hnorm.weight", key("hnorm"), "copy", "replicated", domain="mtp", options=shared,
          comment=f"MTP hidden-state norm{note}.")
    p.add("mtp.eh_proj", f"{m}eh_proj.weight", key("eh_proj"), "mtp_eh_proj", "column", domain="mtp",
          options=opts(order=order, **dict(shared)),
          comment=f"MTP projection of [embedding; hidden]{note}; HF input order {order}.")
    p.add("mtp.final_norm", f"{m}final_layernorm.weight", key("final_norm"), "copy", "replicated", domain="mtp",
          options=shared, comment=f"MTP final norm{note}.")
    if mtp.parts.key("embed_copy"):
        p.add("mtp.embed_copy", "embedding.word_embeddings.weight", (hroot + str(mtp.parts.key("embed_copy")),),
              "duplicate", "vocab", domain="mtp", comment="HF stores a copy of the token embedding in every MTP layer.")
    if mtp.parts.key("head_copy"):
        target = "embedding.word_embeddings.weight" if tied else "output_layer.weight"
        p.add("mtp.head_copy", target, (hroot + str(mtp.parts.key("head_copy")),), "duplicate", "vocab",
              domain="mtp", comment="HF stores a copy of the output layer in every MTP layer.")
