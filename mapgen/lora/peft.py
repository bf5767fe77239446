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
    "target_parameters": (None, [], ()),
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
    modules: dict[str, LoraPair] = field(default_factory=dict)


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
    for key, value in patterns.items():
        if module == key or re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def parse(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, where: str = "") -> PeftAdapter:
    """The adapter of a PEFT directory's config and tensors; every problem at once (``adapter.*`` codes)."""
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
    for module, ab in sorted(pairs.items()):
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
        modules[module] = LoraPair(a, b, float(mod_alpha if mod_alpha is not None else alpha))
    if problems:
        raise MapgenError(problems)
    if not modules:
        raise error("adapter.empty", "the adapter holds no LoRA weights", file=where)
    return PeftAdapter(dict(config), modules)


def render(adapter: PeftAdapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json, tensors)``. A config carried from the original PEFT directory is kept as it
    was when it still describes the modules; otherwise ``r``/``lora_alpha`` are the most common values,
    ``rank_pattern``/``alpha_pattern`` name every module that differs, and ``target_modules`` lists the
    modules themselves (peft matches a list entry by suffix, so a full name matches exactly that module)."""
    tensors: dict[str, torch.Tensor] = {}
    for module, pair in sorted(adapter.modules.items()):
        tensors[f"{PREFIX}{module}.lora_A.weight"] = pair.a.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = pair.b.contiguous()
    config = dict(adapter.config)
    if config and _describes(config, adapter):
        return config, tensors
    ranks = Counter(p.rank for p in adapter.modules.values())
    alphas = Counter(p.alpha for p in adapter.modules.values())
    r = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    config.update(
        peft_type="LORA", r=r, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        target_modules=sorted(adapter.modules),
        rank_pattern={m: p.rank for m, p in sorted(adapter.modules.items()) if p.rank != r},
        alpha_pattern={m: p.alpha for m, p in sorted(adapter.modules.items()) if p.alpha != alpha},
        use_dora=False, use_rslora=False, bias="none", fan_in_fan_out=False, lora_dropout=config.get("lora_dropout", 0.0),
        task_type=config.get("task_type", "CAUSAL_LM"), modules_to_save=None,
    )
    config.setdefault("base_model_name_or_path", None)
    config.setdefault("inference_mode", True)
    return config, tensors


def _describes(config: Mapping[str, Any], adapter: PeftAdapter) -> bool:
    try:
        back = parse(config, render_tensors(adapter))
    except MapgenError:
        return False
    return all(back.modules[m].alpha == p.alpha and back.modules[m].rank == p.rank for m, p in adapter.modules.items())


def render_tensors(adapter: PeftAdapter) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for module, pair in sorted(adapter.modules.items()):
        out[f"{PREFIX}{module}.lora_A.weight"] = pair.a
        out[f"{PREFIX}{module}.lora_B.weight"] = pair.b
    return out
