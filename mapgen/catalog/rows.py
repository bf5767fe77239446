"""The vocabulary of the config catalog: one :class:`Row` per config key, and the helpers that build rows.

A row says what a ``config.json`` key means for the Megatron model the bridge builds:

* ``mapped``: the bridge reads it into the :class:`~mapgen.contract.spec.ModelSpec` field(s) ``feeds``.
  ``via="config"``: the bridge reads the value itself (``mapgen.contract.config.CONFIG`` names it);
  ``via="keys"``: the value is fixed by the checkpoint's tensors (layer structure, biases, tied head) and scan
  cross-checks it.
* ``inert``: it cannot change the converted model's outputs (token ids, dtype, dropout at inference, ...).
* ``refused``: mapgen / megatron-core cannot express it today. ``equivalent(value, scope)`` names the values
  that compute the same as what the bridge builds (``routed_scaling_factor: 1.0``): those are inert.

``limit(value, scope)`` (mapped and inert rows) returns a refusal reason for values the bridge does not
express (e.g. RoPE scalings other than Llama-3); ``valid(value, scope)`` returns a problem for values that
are wrong whatever the model (``config.invalid-value``).

Flipping a refusal to a mapping once megatron-core support lands is a one-row change: replace
``refused("x", ...)`` by ``mapped("x", "modelspec_field")``.

Pure data and pure functions: no torch, no transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Verdict = Literal["mapped", "inert", "refused"]
Via = Literal["config", "keys", ""]


class Scope:
    """One level of a config (the top level, or ``text_config``) with transformers' defaults behind it.

    ``get(key)`` is the config's value when the key is present, else the default transformers' config class
    gives it for this scope's ``model_type`` (``None`` when neither has it).
    """

    def __init__(self, prefix: str, values: Mapping[str, Any], defaults: Mapping[str, Any], model_type: str,
                 parent: Scope | None = None) -> None:
        self.prefix = prefix
        self.values = values
        self.defaults = defaults
        self.model_type = model_type
        self.parent = parent

    def has(self, key: str) -> bool:
        return key in self.values or key in self.defaults

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.values:
            return self.values[key]
        return self.defaults.get(key, default)

    def lookup(self, *names: str, default: Any = None, config_only: bool = False) -> Any:
        """Like the bridge's ``hf.get``: the first of ``names`` (dotted into dicts) that is not None, searched
        in this scope, then its parent; transformers' defaults last (never, with ``config_only``)."""
        scopes: list[Scope] = [self] + ([self.parent] if self.parent is not None else [])
        for source in ("values",) if config_only else ("values", "defaults"):
            for scope in scopes:
                for name in names:
                    value: Any = getattr(scope, source)
                    for part in name.split("."):
                        value = value.get(part) if isinstance(value, Mapping) else None
                    if value is not None:
                        return value
        return default


Check = Callable[[Any, Scope], "str | None"]
Same = Callable[[Any, Scope], bool]


@dataclass(frozen=True)
class Row:
    name: str
    verdict: Verdict
    feeds: tuple[str, ...] = ()
    via: Via = ""
    why: str = ""
    equivalent: Same | None = None
    limit: Check | None = None
    valid: Check | None = None
    transformers_default: bool = False  # absent from config.json: take transformers' class default (semantic key)
    unread: Check | None = None  # mapped rows: why this model type's code never reads the key (then inert)


def mapped(name: str, *feeds: str, via: Via = "config", why: str = "", limit: Check | None = None,
           valid: Check | None = None, default: bool = False, unread: Check | None = None) -> Row:
    return Row(name, "mapped", feeds=feeds, via=via, why=why, limit=limit, valid=valid, transformers_default=default,
               unread=unread)


def structural(name: str, *feeds: str, why: str, limit: Check | None = None, valid: Check | None = None) -> Row:
    """Mapped through the checkpoint's keys: the tensors decide, scan cross-checks the config."""
    return mapped(name, *feeds, via="keys", why=why, limit=limit, valid=valid)


def inert(why: str, *names: str, limit: Check | None = None, valid: Check | None = None) -> list[Row]:
    return [Row(n, "inert", why=why, limit=limit, valid=valid, transformers_default=limit is not None)
            for n in names]


def refused(name: str, why: str, *, unless: Same | None = None, valid: Check | None = None,
            default: bool = True) -> Row:
    """``default``: when the key is absent, judge transformers' class default for it (the model computes with it)."""
    return Row(name, "refused", why=why, equivalent=unless, valid=valid, transformers_default=default)


def refused_all(why: str, *names: str) -> list[Row]:
    """Keys of a family or block shape the bridge does not build: refused unless unset (null, false, 0, empty)."""
    return [refused(n, why, unless=lambda v, _: v is None or v is False or v in (0, [], {})) for n in names]


# ---------------------------------------------------------------------------------------------------------
# Value predicates
# ---------------------------------------------------------------------------------------------------------
def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(float(v))


def positive_int(v: Any, _: Scope) -> str | None:
    if v is None:
        return None
    return None if is_int(v) and v > 0 else f"must be a positive integer, got {v!r}"


def non_negative_int(v: Any, _: Scope) -> str | None:
    if v is None:
        return None
    return None if is_int(v) and v >= 0 else f"must be a non-negative integer, got {v!r}"


def positive_number(v: Any, _: Scope) -> str | None:
    if v is None:
        return None
    return None if is_num(v) and float(v) > 0 else f"must be a positive number, got {v!r}"


def fraction(v: Any, _: Scope) -> str | None:
    if v is None:
        return None
    return None if is_num(v) and 0 < float(v) <= 1 else f"must be a number in (0, 1], got {v!r}"


def boolean(v: Any, _: Scope) -> str | None:
    if v is None:
        return None
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def one_of(*allowed: str) -> Check:
    def check(v: Any, _: Scope) -> str | None:
        if v is None or v in allowed:
            return None
        return f"must be one of {', '.join(sorted(allowed))}; got {v!r}"

    return check


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def equals(*values: Any) -> Same:
    """Inert-equivalent for these values (and for null: not set)."""

    def same(v: Any, _: Scope) -> bool:
        return v is None or any(_same(v, x) for x in values)

    return same


def falsy(v: Any, _: Scope) -> bool:
    return v is None or v in (0, [], {})


def all_of(*checks: Check) -> Check:
    def check(v: Any, scope: Scope) -> str | None:
        for c in checks:
            problem = c(v, scope)
            if problem:
                return problem
        return None

    return check
