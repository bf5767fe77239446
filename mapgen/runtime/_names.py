"""Pure name translation between Megatron spellings (no torch, no megatron-core).

Megatron-core builds the same model with different parameter names depending on the layer specs:

=========================================================  =====================================================
local spec (what mapgen builds on CPU)                     Transformer Engine spec
=========================================================  =====================================================
``<L>.input_layernorm.weight`` (attention layers)           ``<L>.self_attention.linear_qkv.layer_norm_weight``
``<L>.pre_mlp_layernorm.weight`` (dense MLP layers)         ``<L>.mlp.linear_fc1.layer_norm_weight``
``<L>.pre_mlp_layernorm.weight`` (MoE layers)               ``<L>.pre_mlp_layernorm.weight`` (unchanged)
``<L>.mlp.experts.local_experts.<E>.linear_fc1.weight``     ``<L>.mlp.experts.linear_fc1.weight<E>`` (TEGroupedMLP)
``<L>.self_attention.q_layernorm.weight`` (MLA layers)      ``<L>.self_attention.linear_q_up_proj.layer_norm_weight``
``<L>.self_attention.kv_layernorm.weight`` (MLA layers)     ``<L>.self_attention.linear_kv_up_proj.layer_norm_weight``
``<L>.input_layernorm.weight`` (MLA layers)                 ``<L>.input_layernorm.weight`` (unchanged)
=========================================================  =====================================================

``<L>`` is ``decoder.layers.<N>`` or an MTP inner layer (``mtp.layers.<D>.transformer_layer`` in megatron-core
0.16.1, ``mtp.layers.<D>.mtp_model_layer`` later); the same for ``.bias`` / ``layer_norm_bias`` and for
``linear_fc2``. GDN layers are named identically in both (their input norm is fused into ``in_proj``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MTP_INNER_NAMES = ("transformer_layer", "mtp_model_layer")
_MTP_OWN = frozenset({"enorm", "hnorm", "eh_proj", "final_layernorm"})
_MTP_CHILD = re.compile(r"^mtp\.layers\.\d+\.([A-Za-z_][A-Za-z0-9_]*)\.")

_L_INPUT_LN = re.compile(r"^(?P<p>(?:.*\.)?)input_layernorm\.(?P<w>weight|bias)$")
_L_PRE_MLP_LN = re.compile(r"^(?P<p>(?:.*\.)?)pre_mlp_layernorm\.(?P<w>weight|bias)$")
_L_EXPERT = re.compile(
    r"^(?P<p>.*\.mlp\.experts\.)local_experts\.(?P<e>\d+)\.(?P<fc>linear_fc[12])\.(?P<w>weight|bias)$"
)

_L_MLA_LN = re.compile(r"^(?P<p>(?:.*\.)?)self_attention\.(?P<n>q|kv)_layernorm\.(?P<w>weight|bias)$")
_T_MLA_LN = re.compile(r"^(?P<p>(?:.*\.)?)self_attention\.linear_(?P<n>q|kv)_up_proj\.layer_norm_(?P<w>weight|bias)$")
_MLA_MARK = "self_attention.linear_kv_down_proj.weight"
_T_INPUT_LN = re.compile(r"^(?P<p>(?:.*\.)?)self_attention\.linear_qkv\.layer_norm_(?P<w>weight|bias)$")
_T_PRE_MLP_LN = re.compile(r"^(?P<p>(?:.*\.)?)mlp\.linear_fc1\.layer_norm_(?P<w>weight|bias)$")
_T_EXPERT = re.compile(r"^(?P<p>.*\.mlp\.experts\.)(?P<fc>linear_fc[12])\.(?P<w>weight|bias)(?P<e>\d+)$")


def local_to_te_name(name: str, *, dense_mlp: bool = True, mla: bool = False) -> str:
    """One local-spec name in TE spelling; ``dense_mlp`` says whether the name's layer has a dense MLP, ``mla``
    whether its attention is multi-latent (TE fuses the latent norms, not the input norm)."""
    if mla and (m := _L_MLA_LN.match(name)):
        return f"{m['p']}self_attention.linear_{m['n']}_up_proj.layer_norm_{m['w']}"
    if mla and _L_INPUT_LN.match(name):
        return name
    if m := _L_INPUT_LN.match(name):
        return f"{m['p']}self_attention.linear_qkv.layer_norm_{m['w']}"
    if dense_mlp and (m := _L_PRE_MLP_LN.match(name)):
        return f"{m['p']}mlp.linear_fc1.layer_norm_{m['w']}"
    if m := _L_EXPERT.match(name):
        return f"{m['p']}{m['fc']}.{m['w']}{m['e']}"
    return name


def te_to_local_name(name: str) -> str:
    """One TE-spec name in local spelling (no context needed)."""
    if m := _T_MLA_LN.match(name):
        return f"{m['p']}self_attention.{m['n']}_layernorm.{m['w']}"
    if m := _T_INPUT_LN.match(name):
        return f"{m['p']}input_layernorm.{m['w']}"
    if m := _T_PRE_MLP_LN.match(name):
        return f"{m['p']}pre_mlp_layernorm.{m['w']}"
    if m := _T_EXPERT.match(name):
        return f"{m['p']}local_experts.{m['e']}.{m['fc']}.{m['w']}"
    return name


def local_to_te_names(names: Iterable[str]) -> dict[str, str]:
    """Local -> TE for a whole name set; a layer is MoE when ``<L>.mlp.router.weight`` is in the set."""
    names = list(names)
    moe_prefixes = {n[: -len("mlp.router.weight")] for n in names if n.endswith("mlp.router.weight")}
    mla_prefixes = {n[: -len(_MLA_MARK)] for n in names if n.endswith(_MLA_MARK)}
    out = {}
    for n in names:
        m = _L_PRE_MLP_LN.match(n)
        dense = not (m and m["p"] in moe_prefixes)
        layer = _L_INPUT_LN.match(n) or _L_MLA_LN.match(n)
        out[n] = local_to_te_name(n, dense_mlp=dense, mla=bool(layer and layer["p"] in mla_prefixes))
    return out


def te_to_local_names(names: Iterable[str]) -> dict[str, str]:
    """TE -> local for a whole name set."""
    return {n: te_to_local_name(n) for n in names}


def detect_mtp_inner_name(param_names: Iterable[str]) -> str | None:
    """The attribute under ``mtp.layers.<D>.`` that holds the MTP inner transformer layer, or None.

    Raises ``ValueError`` if the names show more than one candidate.
    """
    found = {m[1] for n in param_names if (m := _MTP_CHILD.match(n)) and m[1] not in _MTP_OWN}
    if len(found) > 1:
        raise ValueError(f"ambiguous MTP inner layer attribute: {sorted(found)}")
    return next(iter(found), None)


def rename_mtp_inner(name: str, new: str) -> str:
    """Rewrite ``mtp.layers.<D>.<any known inner name>.`` to use ``new`` (other names unchanged)."""
    m = _MTP_CHILD.match(name)
    if m and m[1] in MTP_INNER_NAMES and m[1] != new:
        return name[: m.start(1)] + new + name[m.end(1) :]
    return name
