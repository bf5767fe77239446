"""The tiny twin of an emitted layout (pure: no torch, no transformers, no files).

``mapgen emit`` proves each bridge numerically on a *twin*: a tiny model that transformers builds from the
input's own config (every semantic field kept: activation, routing, windows, RoPE scaling, ...) with its
dimensions shrunk (:data:`TWIN_OPTIONS`: hidden 64, the fewest layers that keep every layer group of the
layout, vocabulary 128, 4 experts, MTP depth kept), perturbed weights, fp32, written by ``save_pretrained``.
This module holds the decisions that need no framework:

* :func:`twin_config`: the shrunk config (``mapgen.synth``'s shrinking, so twin and ``mapgen synth`` agree);
* :func:`reference_config`: which config transformers builds (the model's own, or for a vision-language
  wrapper whose class is not a causal LM, its ``text_config``);
* :func:`reconcile_keys`: how transformers' saved keys relate to the layout's (the same, or re-rooted under
  the layout's language-model prefix), and which keys transformers does not model (MTP, towers);
* the proof lines recorded in ``proofs.json`` and the module headers.

The runtime half (building, saving in a temporary directory, running both models) is
:mod:`mapgen.runtime.numerics`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from mapgen.contract.bridge import NO_REFERENCE, PARITY
from mapgen.ir import Layout
from mapgen.synth import SynthOptions, shrunk_config

__all__ = ["ATOL", "TWIN_OPTIONS", "KeyPlan", "no_reference_line", "parity_line", "reconcile_keys",
           "reference_config", "twin_config"]

ATOL = 1e-4
TWIN_OPTIONS = SynthOptions(hidden=64, heads=4, kv_heads=2, head_dim=16, vocab=128, intermediate=96,
                            moe_intermediate=32, shared_intermediate=32, experts=4, top_k=2, dtype="fp32", shards=2)


SEQUENCE = 11  # tokens of the fixed batch both models run (mapgen.runtime.verify.fixed_batch)
WINDOW = 4  # a sliding window shorter than the sequence, so that windowed attention differs from full


def _scopes(config: Mapping[str, Any]) -> list[Any]:
    text = config.get("text_config")
    return [config, text] if isinstance(text, dict) else [config]


def _exercise(config: dict[str, Any], source: Mapping[str, Any]) -> None:
    """Sizes whose semantics a tiny model would not reach otherwise: a sliding window is shrunk below the
    twin's sequence length (a 4096-token window over 11 tokens is full attention), and group-limited routing
    keeps two groups of the twin's experts (the shrinking's single group would make it a no-op)."""
    for scope, original in zip(_scopes(config), _scopes(source), strict=True):
        window = scope.get("sliding_window")
        if isinstance(window, int) and not isinstance(window, bool) and window > WINDOW:
            scope["sliding_window"] = WINDOW
        groups = original.get("n_group")
        if isinstance(groups, int) and groups > 1 and "n_group" in scope:
            # keep what each chosen group contributes (top-k // topk_group: 2 in DeepSeek-V3's 8 // 4, 1 in a
            # V2 config whose groups are ranked by their max), which is what megatron-core's group score reads
            topk, chosen = original.get("num_experts_per_tok"), original.get("topk_group")
            per = topk // chosen if isinstance(topk, int) and isinstance(chosen, int) and chosen > 0 else 2
            twin_chosen = max(1, int(scope.get("num_experts_per_tok") or 2) // max(1, per))
            scope["n_group"] = 2 * twin_chosen
            if "topk_group" in scope:
                scope["topk_group"] = twin_chosen


def twin_config(layout: Layout) -> tuple[dict[str, Any], Layout]:
    """The twin's config.json (every field of the input's config, sizes shrunk) and its expected layout."""
    config, shrunk = shrunk_config(layout, TWIN_OPTIONS)
    _exercise(config, layout.config)
    return config, shrunk


# A vision tower's sizes in a wrapper built whole (its language model has no causal-LM class of its own): the
# tower takes no part in a text-only forward, so it is only made small. Unknown fields are kept.
_TOWER_SIZES = {"depth": 2, "num_hidden_layers": 2, "hidden_size": 32, "embed_dim": 32, "intermediate_size": 48,
                "num_heads": 2, "num_attention_heads": 2}
_TOWER_INDEXES = ("deepstack_visual_indexes", "fullatt_block_indexes")


def _small_tower(tower: Mapping[str, Any], hidden: int) -> dict[str, Any]:
    out = dict(tower)
    out.update({k: v for k, v in _TOWER_SIZES.items() if k in tower})
    if "out_hidden_size" in tower:
        out["out_hidden_size"] = hidden
    for key in _TOWER_INDEXES:
        if isinstance(tower.get(key), list) and tower[key]:
            out[key] = [0]
    return out


def reference_config(config: Mapping[str, Any], has_causal_lm: Callable[[str], bool],
                     has_image_text: Callable[[str], bool] = lambda _: False) -> tuple[dict[str, Any], str]:
    """The config transformers builds the reference from, and ``""`` -- or ``({}, reason)``.

    The model's own ``model_type`` when transformers has a causal LM for it; else, for a wrapper with a
    ``text_config`` (vision-language), the language model's; else a wrapper transformers builds whole
    (image-text-to-text) with its vision tower made small (it runs text only). Remote code is never
    considered."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and has_causal_lm(model_type):
        return dict(config), ""
    text = config.get("text_config")
    if isinstance(text, dict):
        text_type = text.get("model_type")
        if isinstance(text_type, str) and has_causal_lm(text_type):
            return dict(text), ""
        if isinstance(model_type, str) and has_image_text(model_type):
            hidden = int(text.get("hidden_size") or TWIN_OPTIONS.hidden)
            towers = {k: _small_tower(v, hidden) for k, v in config.items() if k.endswith("_config")
                      and k != "text_config" and isinstance(v, dict)}
            return {**config, **towers}, ""
        return {}, (f"transformers has no causal-LM class for model_type {model_type!r} nor for its text_config's "
                    f"{text_type!r}; checkpoint code is never executed")
    return {}, f"transformers has no causal-LM class for model_type {model_type!r}; checkpoint code is never executed"


@dataclass(frozen=True)
class KeyPlan:
    """How transformers' saved keys become the twin's: ``rename`` (saved -> layout key, identity when the
    roots agree), ``extra`` (layout keys transformers does not model, filled like ``mapgen synth``), or the
    ``reason`` there is no twin."""

    rename: Mapping[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    reason: str = ""


def _is_unmodelled(key: str, layout: Layout) -> bool:
    """Keys transformers' causal LM has no module for: vision/audio towers and MTP layers (under an ``mtp``
    root, or DeepSeek/GLM extra decoder layers past ``num_hidden_layers``)."""
    lm = layout.language_model
    if any(key.startswith(t.prefix) for t in layout.towers):
        return True
    if lm.mtp is None:
        return False
    index = _layer_index(key, lm.prefix)
    return "mtp" in key or (index is not None and index >= lm.num_layers)


def _layer_index(key: str, prefix: str) -> int | None:
    rest = key[len(prefix):] if key.startswith(prefix) else ""
    head, _, tail = rest.partition(".")
    number, _, _ = tail.partition(".")
    return int(number) if head == "layers" and number.isdigit() else None


def reconcile_keys(saved: Collection[str], expected: Collection[str], layout: Layout, saved_prefix: str) -> KeyPlan:
    """Match transformers' saved keys with the layout's. A text model saved for a wrapper checkpoint keeps its
    keys under ``saved_prefix`` (``model.``) where the layout's language model lives under its own prefix
    (``model.language_model.``): those keys are re-rooted, nothing else is renamed."""
    want = set(expected)
    rename: dict[str, str] = {}
    unknown: list[str] = []
    target = layout.language_model.prefix
    for key in sorted(saved):
        if key in want:
            rename[key] = key
        elif saved_prefix and key.startswith(saved_prefix) and target + key[len(saved_prefix):] in want:
            rename[key] = target + key[len(saved_prefix):]
        else:
            unknown.append(key)
    if unknown:
        return KeyPlan(reason=f"transformers saves {len(unknown)} key(s) the layout does not have "
                              f"(e.g. {unknown[0]!r}): its storage differs from this checkpoint's")
    missing = sorted(want - set(rename.values()))
    lacking = [k for k in missing if not _is_unmodelled(k, layout)]
    if lacking:
        return KeyPlan(reason=f"transformers does not save {len(lacking)} key(s) the layout has "
                              f"(e.g. {lacking[0]!r}): its storage differs from this checkpoint's")
    return KeyPlan(rename=rename, extra=tuple(missing))


def parity_line(transformers_version: str, max_abs: float) -> str:
    return f"{PARITY} {transformers_version}: max |diff| = {max_abs:.1e} (tiny twin, TP=1, fp32)"


def no_reference_line(reason: str) -> str:
    return f"{NO_REFERENCE} ({reason})"
