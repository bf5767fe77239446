"""The bijection proof: before anything is written, the rules must cover both sides exactly.

* Every Megatron parameter of the model the bridge configures — enumerated from the *installed*
  megatron-core, model built on the meta device — is produced by exactly one rule instance, and with the
  shape megatron-core gives it.
* Every checkpoint key of the language model is consumed by exactly one rule instance, except keys that a
  rule declares ``shared`` (one HF tensor for every MTP depth) or that a ``duplicate`` rule re-reads; tower
  keys (vision/audio) are carried through unchanged and counted apart.
* Rules whose HF keys are not in the checkpoint, or whose Megatron names are not in the model, are
  reported too. Problems are grouped by pattern so a 48-layer gap reads as one line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mapgen.contract.expand import Instance, plan_instances, tower_keys
from mapgen.errors import Diagnostic
from mapgen.families.moe import experts_of
from mapgen.infer.patterns import compress_keys
from mapgen.ir import Layout
from mapgen.plan.expand import language_model_keys
from mapgen.plan.plan import BridgePlan


def group_names(names: Iterable[str]) -> list[str]:
    """Compress concrete names into patterns with brace sets: ``a.{0..47}.b  (48)``."""
    return [f"{pattern}  ({count})" for pattern, count in compress_keys(names)]


@dataclass(frozen=True)
class Proof:
    megatron_params: int
    hf_keys: int
    carried_keys: int
    problems: tuple[Diagnostic, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unmatched(self) -> int:
        return len(self.problems)

    @property
    def line(self) -> str:
        carried = f" (+{self.carried_keys:,} tower keys carried through)" if self.carried_keys else ""
        return (f"{self.megatron_params:,} Megatron params <-> {self.hf_keys:,} HF keys{carried}, "
                f"{self.unmatched} unmatched")


def _problem(code: str, message: str, names: Iterable[str], hint: str) -> list[Diagnostic]:
    return [Diagnostic("error", code, message, key=pattern, hint=hint) for pattern in group_names(names)]


def _unit(inst: Instance, key: str) -> str:
    """What one instance consumes of an HF key: the whole key, or one expert slot of a packed tensor."""
    if inst.rule.experts and inst.rule.option("layout") == "packed":
        return f"{key}[expert {inst.expert}]"
    return key


def packed_units(layout: Layout) -> dict[str, list[str]]:
    """Packed 3-D expert keys -> their per-expert slot units (each slot must be consumed exactly once)."""
    out: dict[str, list[str]] = {}
    lm = layout.language_model
    groups = [(g, 0) for g in lm.groups] + ([(g, lm.mtp.index_offset) for g in lm.mtp.inner] if lm.mtp else [])
    for group, offset in groups:
        experts = experts_of(group.mlp)
        if experts is None or experts.flag("layout") != "packed":
            continue
        count = int(experts.count("num_experts"))
        for layer in group.layers:
            root = group.root.replace("{layer}", str(layer + offset))
            for f in experts.own_keys():
                key = root + f
                out[key] = [f"{key}[expert {e}]" for e in range(count)]
    return out


def check_bijection(instances: list[Instance], megatron: Mapping[str, tuple[int, ...]], hf_keys: set[str],
                    packed: Mapping[str, list[str]] | None = None) -> list[Diagnostic]:
    """The pure core of the proof (also used by tests with hand-made inputs). ``packed`` maps packed expert
    keys to their slot units: those keys are consumed slot by slot."""
    problems: list[Diagnostic] = []
    packed = packed or {}
    units = set()
    for key in hf_keys:
        units.update(packed.get(key, [key]))
    hf_keys = units
    produced = Counter(i.megatron for i in instances if i.rule.op != "duplicate")
    consumed: Counter[str] = Counter()
    shared_keys: set[str] = set()
    for inst in instances:
        used = [_unit(inst, k) for k in inst.hf]
        if inst.rule.option("shared") and inst.rule.op != "duplicate":
            shared_keys.update(used)
            continue
        consumed.update(used)
    consumed.update(shared_keys)

    hint_rules = "fix the recogniser or planner for this family, then re-run `mapgen emit`"
    problems += _problem("proof.megatron-unproduced", "Megatron parameters no rule produces",
                         (n for n in megatron if n not in produced), hint_rules)
    problems += _problem("proof.megatron-overproduced", "Megatron parameters produced by more than one rule",
                         (n for n, c in produced.items() if c > 1), hint_rules)
    problems += _problem("proof.megatron-unknown", "rules produce names the Megatron model does not have",
                         (n for n in produced if n not in megatron),
                         "the layer spec or the megatron-core version names this parameter differently")
    problems += _problem("proof.hf-unconsumed", "checkpoint keys no rule consumes",
                         (k for k in hf_keys if k not in consumed), hint_rules)
    problems += _problem("proof.hf-overconsumed", "checkpoint keys consumed by more than one rule",
                         (k for k, c in consumed.items() if c > 1), hint_rules)
    problems += _problem("proof.hf-missing", "rules read keys the checkpoint does not have",
                         (k for k in consumed if k not in hf_keys), hint_rules)
    dup_targets = {i.megatron for i in instances if i.rule.op == "duplicate"}
    problems += _problem("proof.duplicate-target", "duplicate rules point at parameters no rule produces",
                         (n for n in dup_targets if n not in produced), hint_rules)
    return problems


def prove(plan: BridgePlan, layout: Layout) -> Proof:
    """Prove ``plan`` against the installed megatron-core for ``layout`` (its stored config gives sizes)."""
    from mapgen.contract.config import model_spec
    from mapgen.contract.hf_config import HFConfig
    from mapgen.runtime.megatron import enumerate_parameters, mtp_inner_name

    spec = model_spec(HFConfig(layout.config), layout, plan.facts)
    megatron = enumerate_parameters(spec)
    instances = list(plan_instances(plan.rules, layout, mtp_inner_name()))
    hf = language_model_keys(layout)
    carried = tower_keys(layout) - hf
    problems = check_bijection(instances, megatron, hf, packed_units(layout))
    return Proof(len(megatron), len(hf), len(carried), tuple(problems))
