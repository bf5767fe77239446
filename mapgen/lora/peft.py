"""Hugging Face PEFT LoRA adapters as data: parse ``adapter_config.json`` + the tensors, and render them back.

Pure: the CLI reads and writes the files. PEFT's conventions (peft ``LoraConfig``, ``get_peft_model_state_dict``):
tensors are named ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``,
where ``<module>`` is the base weight's key without ``.weight``; the scale is ``lora_alpha / r`` unless
``use_rslora`` (``lora_alpha / sqrt(r)``); ``rank_pattern``/``alpha_pattern`` override ``r``/``lora_alpha`` for
modules whose name matches ``(.*\\.)?(<pattern>)$`` (peft ``get_pattern_key``). Only plain LoRA on linear
weights is understood; every other PEFT type or option that changes the maths is refused by name.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mapgen.errors import Diagnostic, MapgenError, error
from mapgen.lora.hf_names import ModelView

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

#: adapter_config.json fields whose non-default value changes the maths or the tensor set: refused by name.
_REFUSED: dict[str, tuple[object, ...]] = {
    "use_dora": (False, None),
    "use_rslora": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, [], ()),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "trainable_token_indices": (None, {}, []),
    "layer_replication": (None, [], ()),
    "alora_invocation_tokens": (None, [], ()),
    "use_qalora": (False, None),
}


@dataclass(frozen=True)
class LoraPair:
    """One module's adapter: ``dW = alpha / r * b @ a`` with ``a [r, in]``, ``b [out, r]``."""

    a: torch.Tensor
    b: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter: its config (kept whole, for an exact round trip) and one pair per base module."""

    config: dict[str, Any]
    modules: dict[str, LoraPair] = field(default_factory=dict)  # checkpoint module names


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
    for key, value in patterns.items():
        if module == key or re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def parse(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, where: str = "",
          view: ModelView | None = None, num_experts: int | None = None) -> PeftAdapter:
    """The adapter of a PEFT directory's config and tensors, under checkpoint module names (``view``: the model
    type's in-memory names and packed experts, :mod:`mapgen.lora.hf_names`); every problem at once."""
    view = view or ModelView()
    cfg_file = f"{where}/{CONFIG_NAME}" if where else CONFIG_NAME
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise error("adapter.unsupported-type", f"PEFT type {peft_type!r} is not supported (only LORA)",
                    file=cfg_file, key="peft_type", expected="LORA",
                    hint="convert LoRA adapters only; DoRA, IA3, prefix tuning, ... are not supported yet")
    problems = []
    for name, allowed in _REFUSED.items():
        value = config.get(name)
        if value not in allowed:
            what = "DoRA" if name == "use_dora" else name
            problems.append(Diagnostic("error", "adapter.unsupported-option",
                                       f"{what} = {value!r} is not supported yet", file=cfg_file, key=name,
                                       expected=f"{allowed[0]!r}",
                                       hint="merge it with peft (merge_and_unload) and convert the merged model"))
    if problems:
        raise MapgenError(problems)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, int | float):
        raise error("adapter.invalid-config", f"r = {r!r}, lora_alpha = {alpha!r}", file=cfg_file,
                    expected="a positive int r and a number lora_alpha")
    ranks: Mapping[str, Any] = config.get("rank_pattern") or {}
    alphas: Mapping[str, Any] = config.get("alpha_pattern") or {}

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            problems.append(Diagnostic("error", "adapter.unknown-tensor", "not a LoRA A/B weight of a linear module",
                                       file=f"{where}/{WEIGHTS_NAME}" if where else WEIGHTS_NAME, key=key,
                                       expected=f"{PREFIX}<module>.lora_A.weight / .lora_B.weight"))
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
    modules: dict[str, LoraPair] = {}
    packed_re = re.compile(rf"(.*\.{re.escape(view.container)})((?:\.base_layer)*)") if view.packed else None
    order = _nesting(config, view)
    for module, ab in sorted(pairs.items()):
        pm = packed_re.fullmatch(module) if packed_re is not None else None
        if pm is not None and set(ab) == {"A", "B"}:
            depth = pm.group(2).count(".base_layer")
            if num_experts is None or depth >= len(order):
                problems.append(Diagnostic("error", "adapter.unknown-module", "a packed-expert adapter this base or "
                                           "target_parameters does not explain", key=module, file=where))
                continue
            param = order[len(order) - 1 - depth]
            name = f"{pm.group(1)}.{param}"
            rank = _pattern_value(ranks, name) or r
            mod_alpha = _pattern_value(alphas, name)
            try:
                modules.update(_unpack(view, view.to_checkpoint(pm.group(1)), param, ab["A"], ab["B"], int(rank),
                                       float(mod_alpha if mod_alpha is not None else alpha), num_experts))
            except ValueError as exc:
                problems.append(Diagnostic("error", "adapter.shape-mismatch", str(exc), key=name, file=where))
            continue
        ckpt = view.to_checkpoint(module)
        if set(ab) != {"A", "B"}:
            problems.append(Diagnostic("error", "adapter.incomplete", f"lora_{'A' if 'A' not in ab else 'B'} is "
                                       "missing", key=module, file=where))
            continue
        a, b = ab["A"], ab["B"]
        rank = _pattern_value(ranks, module) or r
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] != rank:
            problems.append(Diagnostic("error", "adapter.shape-mismatch",
                                       f"lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, configured rank {rank}",
                                       key=module, file=where, expected="A [r, in], B [out, r]"))
            continue
        mod_alpha = _pattern_value(alphas, module)
        modules[ckpt] = LoraPair(a, b, float(mod_alpha if mod_alpha is not None else alpha))
    if problems:
        raise MapgenError(problems)
    if not modules:
        raise error("adapter.empty", "the adapter holds no LoRA weights", file=where)
    return PeftAdapter(dict(config), modules)


def _nesting(config: Mapping[str, Any], view: ModelView) -> list[str]:
    """The packed parameters peft wrapped on one experts module, innermost first. peft walks each module's own
    parameters in registration order (``tuners_utils.BaseTuner._inject_parameters``), so the nesting follows
    the experts module's parameter order (:attr:`ModelView.packed`), not the order of ``target_parameters``."""
    targeted = {t.rsplit(".", 1)[-1] for t in (config.get("target_parameters") or [])}
    return [p for p, _ in view.packed if p in targeted]


def _unpack(view: ModelView, container: str, param: str, a: torch.Tensor, b: torch.Tensor, rank: int,
            alpha: float, experts: int) -> dict[str, LoraPair]:
    """Per-expert checkpoint modules of one packed ParamWrapper adapter (peft ``ParamWrapper.get_delta_weight``)."""
    leaves = view.leaves(param)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank * experts or b.shape[1] != rank * experts:
        raise ValueError(f"lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}: expected [{experts}*{rank}, in] and "
                         f"[out, {rank}*{experts}] for {experts} experts of rank {rank}")
    if b.shape[0] % len(leaves):
        raise ValueError(f"lora_B has {b.shape[0]} rows, not divisible into {leaves}")
    a3 = a.reshape(experts, rank, a.shape[1])
    b3 = b.reshape(b.shape[0], rank, experts)
    rows = b.shape[0] // len(leaves)
    out = {}
    for e in range(experts):
        a_e = a3[e].contiguous()
        for i, leaf in enumerate(leaves):
            out[f"{container}.{e}.{leaf}"] = LoraPair(a_e, b3[i * rows:(i + 1) * rows, :, e].contiguous(), alpha)
    return out


def _pack(pairs: list[list[LoraPair]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``pairs[e][leaf]`` -> one ParamWrapper adapter (A, B, alpha): the leaves share A when they can, else their
    A are stacked with B block-diagonal (what peft does converting per-expert adapters, ``PeftConcatenate``)."""
    a_list, b_list = [], []
    alphas = {p.alpha / p.rank for row in pairs for p in row}
    if len(alphas) != 1:
        raise ValueError("the experts' adapters have different scales")
    for row in pairs:
        if all(torch.equal(p.a, row[0].a) for p in row):
            a_list.append(row[0].a)
            b_list.append(torch.cat([p.b for p in row]))
        else:
            a_list.append(torch.cat([p.a for p in row]))
            b_list.append(_block_diag([p.b for p in row]))
    ranks = {int(a.shape[0]) for a in a_list}
    if len(ranks) != 1:
        raise ValueError("the experts' adapters have different ranks")
    rank = ranks.pop()
    a = torch.stack(a_list).reshape(len(pairs) * rank, a_list[0].shape[1])
    b = torch.stack(b_list, dim=2).reshape(b_list[0].shape[0], rank * len(pairs))
    return a, b, alphas.pop() * rank


def render(adapter: PeftAdapter, *, view: ModelView | None = None,
           num_experts: int | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json, tensors)`` under the model type's in-memory names, per-expert adapters packed where
    transformers packs the experts. A config carried from the original PEFT directory is kept as it was when it
    still describes the modules; otherwise ``r``/``lora_alpha`` are the most common values,
    ``rank_pattern``/``alpha_pattern`` name every module that differs, ``target_modules`` lists the modules
    themselves (peft matches a list entry by suffix, so a full name matches exactly that module) and
    ``target_parameters`` the packed expert parameters and bare-parameter routers."""
    view = view or ModelView()
    tensors, ranks, alphas, params = _render_tensors(adapter, view, num_experts)
    config = dict(adapter.config)
    if config and _describes(config, tensors, adapter, view, num_experts):
        return config, tensors
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    plain = sorted(m for m in ranks if m not in params)
    routers = [m for m in plain if any(m.endswith(f".{leaf}") for leaf in view.parameters)]
    config.update(
        peft_type="LORA", r=r, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        target_modules=[m for m in plain if m not in routers] or None,
        target_parameters=[f"{m}.weight" for m in routers] + sorted(set(params.values()),
                                                                    key=[p for p, _ in view.packed].index),
        rank_pattern={**{m: ranks[m] for m in plain if ranks[m] != r},
                      **{rf".*\.{p}": ranks[m] for m, p in params.items() if ranks[m] != r}},
        alpha_pattern={**{m: alphas[m] for m in plain if alphas[m] != alpha},
                       **{rf".*\.{p}": alphas[m] for m, p in params.items() if alphas[m] != alpha}},
        use_dora=False, use_rslora=False, bias="none", fan_in_fan_out=False,
        lora_dropout=config.get("lora_dropout", 0.0), task_type=config.get("task_type", "CAUSAL_LM"),
        modules_to_save=None,
    )
    if not config["target_parameters"]:
        config["target_parameters"] = None
    config.setdefault("base_model_name_or_path", None)
    config.setdefault("inference_mode", True)
    return config, tensors


def _render_tensors(adapter: PeftAdapter, view: ModelView, num_experts: int | None) -> tuple[
        dict[str, torch.Tensor], dict[str, int], dict[str, float], dict[str, str]]:
    """PEFT tensors (model names) and each rendered module's rank and alpha; ``params``: packed module -> param."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    params: dict[str, str] = {}
    leaf_of = {leaf: p for p, leaves in view.packed for leaf in leaves}
    expert_re = re.compile(rf"(.*\.{re.escape(view.container)})\.(\d+)\.([^.]+)")
    groups: dict[tuple[str, str], dict[int, dict[str, LoraPair]]] = {}
    for module, pair in sorted(adapter.modules.items()):
        m = expert_re.fullmatch(module) if view.packed else None
        if m is not None and m.group(3) in leaf_of:
            groups.setdefault((m.group(1), leaf_of[m.group(3)]), {}).setdefault(int(m.group(2)), {})[m.group(3)] = pair
            continue
        name = view.to_model(module)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = pair.a.clone()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = pair.b.clone()
        ranks[name], alphas[name] = pair.rank, pair.alpha
    order = _nesting(adapter.config, view) or [p for p, _ in view.packed]
    for (container, param), experts in sorted(groups.items()):
        leaves = view.leaves(param)
        if num_experts is None or sorted(experts) != list(range(num_experts)) or any(
                sorted(e) != sorted(leaves) for e in experts.values()):
            raise error("adapter.unpackable", f"transformers packs these experts into {param}; the adapter must cover "
                        f"every expert's {', '.join(leaves)}", key=f"{container}.*")
        try:
            a, b, alpha = _pack([[experts[e][leaf] for leaf in leaves] for e in range(num_experts)])
        except ValueError as exc:
            raise error("adapter.unpackable", str(exc), key=f"{container}.{param}") from None
        name = view.to_model(container) + ".base_layer" * (len(order) - 1 - order.index(param))
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b
        ranks[name], alphas[name], params[name] = int(a.shape[0]) // num_experts, alpha, param
    return tensors, ranks, alphas, params


def _describes(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], adapter: PeftAdapter,
               view: ModelView, num_experts: int | None) -> bool:
    try:
        back = parse(config, tensors, view=view, num_experts=num_experts)
    except MapgenError:
        return False
    if set(back.modules) != set(adapter.modules):
        return False
    return all(back.modules[m].alpha == p.alpha and back.modules[m].rank == p.rank for m, p in adapter.modules.items())


def _block_diag(blocks: list[torch.Tensor]) -> torch.Tensor:
    out = blocks[0].new_zeros((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)))
    r = c = 0
    for b in blocks:
        out[r:r + b.shape[0], c:c + b.shape[1]] = b
        r, c = r + b.shape[0], c + b.shape[1]
    return out
