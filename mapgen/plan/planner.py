"""Planning: a scanned :class:`Layout` -> a :class:`BridgePlan` (layout-decided facts + ordered rules).

Pure and deterministic. Every rule names its Megatron parameter pattern in the global local-spec namespace
(see :mod:`mapgen.contract.rules`), the HF key pattern(s), the primitive and its declared sharding. Layer,
expert and MTP indices are placeholders whose index sets come from the layout's groups; nothing is
hard-coded to ``mtp.layers.0``.

Components the runtime cannot convert yet (MXFP4 experts, per-expert biases, a fused qkv without a declared
order, ...) make :func:`plan` raise a specific "not supported" error instead of producing a partial bridge.
"""

from __future__ import annotations

import keyword
import re
from typing import Any

from mapgen.catalog.check import layout_defaults
from mapgen.contract.config import Facts
from mapgen.contract.fingerprint import fingerprint
from mapgen.contract.routing import ROUTING_KEYS
from mapgen.contract.rules import Rule
from mapgen.errors import Diagnostic, MapgenError
from mapgen.families import behaviour, embedding, facts_for, input_norm_target, norms
from mapgen.families import mtp as mtp_family
from mapgen.families.model_types import Facts as ModelTypeFacts
from mapgen.families.model_types import router_for
from mapgen.families.moe import experts_of
from mapgen.ir import LayerGroup, Layout
from mapgen.plan.plan import BridgePlan

_IDENT = re.compile(r"[^0-9a-zA-Z_]+")


def module_name(layout: Layout) -> str:
    """The generated module of the layout's model type (it holds one bridge per fingerprint)."""
    base = _IDENT.sub("_", layout.model_type.lower()).strip("_") or "model"
    if not base[0].isalpha() or keyword.iskeyword(base) or base in {"inputs", "supported"}:
        base = f"m_{base}"
    return base


# ---------------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------------
def _opts(**kw: str | int | bool) -> tuple[tuple[str, str | int | bool], ...]:
    return tuple(sorted(kw.items()))


class _Planner:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.lm = layout.language_model
        self.model_facts = model_facts = facts_for((layout.text_model_type, layout.model_type))
        self.zero_centered = model_facts.zero_centered
        self.layernorm = model_facts.layernorm
        self.plain_up_down = model_facts.plain_up_down
        self.qk_norm_after_rope = model_facts.qk_norm_after_rope
        self.router: str = model_facts.router
        self.rules: list[Rule] = []
        self.problems: list[Diagnostic] = []

    def unsupported(self, what: str, key: str) -> None:
        self.problems.append(
            Diagnostic(
                "error",
                "plan.unsupported",
                f"{what} is recognised by scan but the conversion runtime does not support it yet",
                key=key,
                hint="scan reports it; conversion of this family needs a primitive and a rule (see README, "
                "'Adding a layer family')",
            )
        )

    def unbuildable(self, what: str, key: str) -> None:
        """A layout the installed megatron-core cannot build (not a missing mapgen rule)."""
        self.problems.append(
            Diagnostic(
                "error",
                "plan.megatron-lacks",
                f"{what}: refused, megatron-core cannot build this model",
                key=key,
                hint="nothing was written; this block shape needs support in megatron-core itself (a layer spec "
                "mapgen could compose from megatron-core's own modules does not exist for it)",
            )
        )

    def add(self, family: str, megatron: str, hf: tuple[str, ...], op: str, sharding: str, *,
            domain: str, experts: bool = False, options: tuple[tuple[str, str | int | bool], ...] = (),
            comment: str = "") -> None:
        self.rules.append(
            Rule(
                family=family,
                megatron=megatron,
                hf=hf,
                op=op,  # type: ignore[arg-type]
                sharding=sharding,  # type: ignore[arg-type]
                domain=domain,
                experts=experts,
                options=options,
                comment=comment,
            )
        )

    # -- top level --------------------------------------------------------------------------------------
    def plan(self) -> None:
        lm = self.lm
        embedding.plan_embedding(lm.top, self)
        for group in lm.groups:
            self.group(group, "decoder.layers.{layer}.", group.root, f"decoder:{group.name}")
        embedding.plan_head(lm.top, self, self.layernorm)
        if lm.mtp is not None:
            mtp_family.plan(lm.mtp, lm.tied_embeddings, self)
            for group in lm.mtp.inner:
                hroot = group.root.replace("{layer}", "{hf_layer}") if lm.mtp.index_offset else group.root
                self.group(group, "mtp.layers.{layer}.{mtp_inner}.", hroot, f"mtp:{group.name}")

    # -- one decoder layer group: the block's norms around its mixer and MLP -----------------------------
    def group(self, group: LayerGroup, mroot: str, hroot: str, domain: str) -> None:
        input_norm = input_norm_target(group.mixer)
        block_ok = group.block.variant not in norms.UNSUPPORTED  # every refusal is listed, not just the first
        if not block_ok:
            self.unbuildable(norms.UNSUPPORTED[group.block.variant], hroot + (group.block.own_keys() or [""])[0])
        block_ok = block_ok and norms.check_biases(group.block, self.layernorm, self, hroot)
        for where, component in (("mixer", group.mixer), ("mlp", group.mlp)):
            if block_ok:
                norms.plan_before(group.block, where, input_norm, self, mroot, hroot, domain, group.name)
            behaviour(component).plan(component, self, mroot, hroot, domain, group.name)


# ---------------------------------------------------------------------------------------------------------
# Facts: what the layout decides about the Megatron model (the config table in mapgen.contract.config does the rest)
# ---------------------------------------------------------------------------------------------------------
def _facts(layout: Layout, model_facts: ModelTypeFacts) -> tuple[Facts, list[tuple[str, str]]]:
    """Each family states the facts its components decide; the first group (decoder order, then the MTP inner
    layers) that states a fact decides it. Also returns (fact, group) for every group that states the opposite:
    megatron-core has one switch per fact (``add_bias_linear`` gives the attention output projection *and* the
    MLP a bias), so a layout whose components disagree is refused by name. A MoE bridge also carries its model
    type's router scheme and transformers' defaults for the routing keys (the values the config catalog judged)."""
    lm = layout.language_model
    decided: dict[str, Any] = {"tied": lm.tied_embeddings, "zero_centered": model_facts.zero_centered,
                               "layernorm": model_facts.layernorm}
    if model_facts.rotary_interleaved:
        decided["rotary_interleaved"] = True
    fixed_eps = model_facts.norm_epsilon
    if fixed_eps is not None:
        decided["default_norm_epsilon"] = fixed_eps
    conflicts: list[tuple[str, str]] = []
    for group in (*lm.groups, *(lm.mtp.inner if lm.mtp else ())):
        for component in (group.mixer, group.mlp):
            for name, value in behaviour(component).facts(component).items():
                if decided.setdefault(name, value) != value:
                    conflicts.append((name, f"{group.root}{component.family}"))
    if decided.get("moe"):
        decided["router"] = router_for((layout.text_model_type, layout.model_type))
        defaults = layout_defaults(layout.model_type, layout.text_model_type, ROUTING_KEYS)
        decided.update({f"default_{k}": v for k, v in defaults.items()})
    return Facts(**decided), conflicts


def _group_line(group: LayerGroup) -> str:
    mlp = group.mlp
    experts = experts_of(mlp)
    if experts is not None:
        shared = ", shared expert" if mlp.child("shared") else ""
        mlp_text = f"MoE ({experts.flag('layout')} experts{shared})"
    else:
        mlp_text = "dense gated MLP"
    return f"{group.name}: {group.mixer.family} + {mlp_text}"


def _description(layout: Layout, fp: str) -> tuple[str, ...]:
    """Docstring lines; only fingerprint-relevant facts (never dimensions), so that every checkpoint with
    this layout renders the same module."""
    lm = layout.language_model
    lines = [
        f"Bridge for model_type {layout.model_type!r}, layout fingerprint {fp}.",
        f"Language model under {lm.prefix!r}; tied embeddings: {lm.tied_embeddings}.",
        "Decoder layer groups: " + "; ".join(_group_line(g) for g in lm.groups) + ".",
    ]
    if lm.mtp is not None:
        inner = "; ".join(_group_line(g) for g in lm.mtp.inner)
        lines.append(f"MTP: scheme {lm.mtp.scheme}, any depth; inner layer {inner}.")
    else:
        lines.append("MTP: none.")
    if layout.towers:
        lines.append("Carried through unchanged: " + ", ".join(t.name for t in layout.towers) + ".")
    return tuple(lines)


def plan(layout: Layout) -> BridgePlan:
    """Plan a bridge for ``layout`` or raise :class:`MapgenError` listing every unsupported family."""
    planner = _Planner(layout)
    planner.plan()
    facts, conflicts = _facts(layout, planner.model_facts)
    for name, where in conflicts:
        planner.unsupported(f"components that disagree on the Megatron switch {name!r} (megatron-core sets it for "
                            "the whole model: e.g. add_bias_linear biases the attention output and the MLP together)",
                            where)
    if planner.problems:
        raise MapgenError(sorted(set(planner.problems)))
    fp = fingerprint(layout)
    return BridgePlan(
        fingerprint=fp,
        module_name=module_name(layout),
        model_type=layout.model_type,
        description=_description(layout, fp),
        facts=facts,
        rules=tuple(planner.rules),
    )
