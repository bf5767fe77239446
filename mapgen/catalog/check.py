"""``check_config(config) -> ConfigReport``: one verdict per config key, and the diagnostics that stop a run.

Pure: no file access beyond the committed defaults table (read once), no torch, no transformers.
"""

from __future__ import annotations

import json
import pkgutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from mapgen.catalog.fields import BRIDGE_READS, NESTED_INDEX, SEMANTIC_FALLBACKS, TOP_INDEX, bridge_value
from mapgen.catalog.model_types import CONDITIONAL_FACTS, FACTS, scope_problem
from mapgen.catalog.rows import Row, Scope
from mapgen.errors import Diagnostic

DEFAULTS_FILE = "defaults.json"
TEXT_CONFIG = "text_config"


@cache
def transformers_defaults() -> dict[str, Any]:
    """The committed table ``{"transformers_version", "model_types": {model_type: {key: default}},
    "text_model_types": {model_type: text model_type}}`` (``tests/regen_catalog_defaults.py`` writes it)."""
    # pkgutil, not importlib.resources: the same package data (also from a zip), without importing tempfile,
    # shutil and the compression modules into every scan
    raw = pkgutil.get_data("mapgen.catalog", DEFAULTS_FILE)
    if raw is None:  # a loader that cannot read package data
        raise FileNotFoundError(f"mapgen.catalog/{DEFAULTS_FILE}")
    data: dict[str, Any] = json.loads(raw.decode("utf-8"))
    return data


def defaults_for(model_type: str) -> dict[str, Any]:
    found: dict[str, Any] = transformers_defaults()["model_types"].get(model_type, {})
    return found


def layout_defaults(model_type: str, text_model_type: str, keys: Iterable[str]) -> dict[str, Any]:
    """transformers' defaults for ``keys`` as :func:`check_config` judges a config that leaves them out: the
    text model's (``text_config``) first, then the top level's. What a bridge for this layout carries
    (``Facts.default_*``), so that it computes with the values the catalog judged."""
    text = text_model_type if text_model_type and text_model_type != model_type else str(
        transformers_defaults()["text_model_types"].get(model_type, ""))
    out: dict[str, Any] = {}
    for key in keys:
        for scope_type in (text, model_type):
            value = defaults_for(scope_type).get(key) if scope_type else None
            if value is not None:
                out[key] = value
                break
    return out


@dataclass(frozen=True)
class FieldVerdict:
    """The verdict on one key. ``key`` is dotted for nested keys (``text_config.norm_topk_prob``,
    ``rope_parameters.rope_theta``); ``source`` is ``config.json`` or ``default`` (transformers' class default,
    the key being absent). ``verdict`` is mapped / inert / refused / unknown."""

    key: str
    verdict: str
    value: Any
    source: str = "config.json"
    megatron: tuple[str, ...] = ()
    via: str = ""
    reason: str = ""
    escape: str = ""  # "assume-inert" / "accept-semantic-gap" when a flag decided it

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"verdict": self.verdict, "source": self.source}
        if self.megatron:
            out["megatron"] = list(self.megatron)
            out["via"] = self.via
        if self.reason:
            out["reason"] = self.reason
        if self.escape:
            out["escape"] = self.escape
        if self.source == "default":
            out["value"] = self.value
        return out

    def line(self) -> str:
        where = f" -> {', '.join(self.megatron)}" if self.megatron else ""
        how = f" ({self.via})" if self.via == "keys" else ""
        why = f": {self.reason}" if self.reason and self.verdict != "mapped" else ""
        flag = f" [--{self.escape}]" if self.escape else ""
        dflt = " [transformers default]" if self.source == "default" else ""
        return f"{self.key} = {_short(self.value)}: {self.verdict}{where}{how}{why}{dflt}{flag}"


@dataclass(frozen=True)
class ConfigReport:
    fields: tuple[FieldVerdict, ...]
    diagnostics: tuple[Diagnostic, ...]
    assumed_inert: tuple[str, ...] = ()
    accepted_gaps: tuple[str, ...] = ()
    scope_error: bool = False
    model_type: str = ""
    text_model_type: str = ""

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "error")

    @property
    def ok(self) -> bool:
        return not self.errors

    def counts(self) -> dict[str, int]:
        out = {"mapped": 0, "inert": 0, "refused": 0, "unknown": 0}
        for f in self.fields:
            out[f.verdict] = out.get(f.verdict, 0) + 1
        return out

    def by_verdict(self, verdict: str) -> tuple[FieldVerdict, ...]:
        return tuple(f for f in self.fields if f.verdict == verdict)

    def to_json(self) -> dict[str, Any]:
        """What ``mapgen scan --json`` (and a conversion's ``mapgen.json``) record."""
        return {
            "fields": {f.key: f.to_json() for f in self.fields},
            "assumed_inert": list(self.assumed_inert),
            "accepted_gaps": list(self.accepted_gaps),
            "defaults_from": "transformers " + str(transformers_defaults().get("transformers_version", "?")),
        }

    def render(self, *, verbose: bool = False) -> str:
        """The short verdict section ``mapgen scan`` prints."""
        c = self.counts()
        lines = [f"config fields    {c['mapped']} mapped, {c['inert']} inert, {c['refused']} refused, "
                 f"{c['unknown']} unknown"]
        for f in self.fields:
            if verbose or f.verdict in ("refused", "unknown") or f.escape or (
                    f.source == "default" and f.verdict != "inert"):
                lines.append(f"  {f.line()}")
        return "\n".join(lines) + "\n"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Checker:
    def __init__(self, file: str, assume_inert: Iterable[str], accept_gaps: Iterable[str]) -> None:
        self.file = file
        self.assume_inert = tuple(dict.fromkeys(assume_inert))
        self.accept_gaps = tuple(dict.fromkeys(accept_gaps))
        self.fields: list[FieldVerdict] = []
        self.diagnostics: list[Diagnostic] = []
        self.used_flags: set[str] = set()

    def _escaped(self, key: str, flags: tuple[str, ...]) -> bool:
        bare = key.split(".", 1)[1] if key.startswith(TEXT_CONFIG + ".") else key
        for candidate in (key, bare):
            if candidate in flags:
                self.used_flags.add(candidate)
                return True
        return False

    def scope(self, scope: Scope) -> None:
        keys = list(scope.values)
        keys += [k for k in sorted(scope.defaults) if k not in scope.values and _semantic(TOP_INDEX.get(k))]
        for key in keys:
            if key == TEXT_CONFIG and scope.prefix == "" and isinstance(scope.values.get(key), Mapping):
                continue
            self.one(key, scope, TOP_INDEX.get(key), nested=key in NESTED_INDEX)

    def one(self, key: str, scope: Scope, row: Row | None, *, nested: bool = False) -> None:
        full = scope.prefix + key
        present = key in scope.values
        value = scope.get(key)
        source = "config.json" if present else "default"
        if row is None:
            if self._escaped(full, self.assume_inert):
                self.fields.append(FieldVerdict(full, "inert", value, source, reason="assumed inert by the user",
                                                escape="assume-inert"))
                return
            self.fields.append(FieldVerdict(full, "unknown", value, source))
            self.diagnostics.append(Diagnostic(
                "error", "config.unknown-field",
                f"config key {full!r} = {_short(value)} is not in mapgen's config catalog: mapgen cannot tell "
                "whether the converted model would compute the same thing", file=self.file, key=full,
                expected="a key the catalog classifies as mapped, inert or refused (mapgen/catalog/fields.py)",
                hint=f"if it cannot change the model's outputs, pass --assume-inert {full} (recorded in the "
                "output's metadata); otherwise add a catalog row for it"))
            return
        problem = row.valid(value, scope) if row.valid is not None and value is not None else None
        if problem:
            self.fields.append(FieldVerdict(full, row.verdict, value, source, row.feeds, row.via, row.why))
            self.diagnostics.append(Diagnostic(
                "error", "config.invalid-value", f"{full} {problem}", file=self.file, key=full,
                expected=_expected(row), hint="fix config.json; the checkpoint cannot describe a valid model "
                "with this value"))
            return
        refusal = None
        if row.verdict == "refused":
            if row.equivalent is not None and row.equivalent(value, scope):
                self.fields.append(FieldVerdict(full, "inert", value, source,
                                                reason="equivalent to what the bridge builds at this value"))
                self._nested(key, scope, value, nested)
                return
            refusal = row.why
        elif row.unread is not None and (unread := row.unread(value, scope)):
            self.fields.append(FieldVerdict(full, "inert", value, source, reason=unread))
            self._nested(key, scope, value, nested)
            return
        elif row.limit is not None:
            refusal = row.limit(value, scope)
        if refusal:
            self.refuse(full, value, source, refusal, row)
        else:
            self.fields.append(FieldVerdict(full, row.verdict, value, source, row.feeds, row.via, row.why))
        self._nested(key, scope, value, nested)

    def _nested(self, key: str, scope: Scope, value: Any, nested: bool) -> None:
        if not nested or not isinstance(value, Mapping):
            return
        inner = Scope(f"{scope.prefix}{key}.", value, {}, scope.model_type, parent=scope)
        for sub in value:
            self.one(sub, inner, NESTED_INDEX[key].get(sub))

    def refuse(self, full: str, value: Any, source: str, reason: str, row: Row | None) -> None:
        if self._escaped(full, self.accept_gaps):
            self.fields.append(FieldVerdict(full, "refused", value, source, reason=reason,
                                            escape="accept-semantic-gap"))
            self.diagnostics.append(Diagnostic(
                "warning", "semantics.gap-accepted", f"{full} = {_short(value)}: {reason}; converting anyway "
                "(--accept-semantic-gap): the Megatron model will not compute what transformers computes",
                file=self.file, key=full))
            return
        self.fields.append(FieldVerdict(full, "refused", value, source, reason=reason))
        origin = {"config.json": "", "model_type": " (a fact of this model_type, not in config.json)"}.get(
            source, " (absent from config.json: transformers' default)")
        self.diagnostics.append(Diagnostic(
            "error", "semantics.unsupported", f"{full} = {_short(value)}{origin}: {reason}", file=self.file,
            key=full, expected=_expected(row) if row is not None else "",
            hint=f"converting would change the model's outputs; to convert the weights anyway pass "
            f"--accept-semantic-gap {full} (recorded in mapgen.json)"))

    def facts(self, model_type: str, prefix: str, values: Mapping[str, Any]) -> None:
        conditional = [(fact, reason) for fact, reason, when in CONDITIONAL_FACTS.get(model_type, ()) if when(values)]
        for fact, reason in (*FACTS.get(model_type, ()), *conditional):
            key = f"{prefix}model_type.{fact.replace(' ', '-').lower()}"
            self.refuse(key, model_type, "model_type", f"{fact} ({reason})", None)

    def fallbacks(self, scope: Scope) -> None:
        """Mapped fields the config leaves out: the bridge's fallback must be transformers' default."""
        for name in SEMANTIC_FALLBACKS:
            names, fallback = BRIDGE_READS[name]
            if scope.lookup(*names, config_only=True) is not None:
                continue
            default = scope.lookup(*names)
            if default is None or _close(default, fallback):
                continue
            key = f"{scope.prefix}{names[0]}"
            self.refuse(key, default, "default", f"absent from config.json: transformers' default is {default}, "
                        f"the bridge would use {fallback} for {name}", TOP_INDEX.get(names[0]))


def _close(a: Any, b: Any) -> bool:
    try:
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    except (TypeError, ValueError):
        return bool(a == b)


def _semantic(row: Row | None) -> bool:
    return row is not None and row.transformers_default


def _expected(row: Row | None) -> str:
    if row is None:
        return ""
    if row.verdict == "mapped":
        return f"a value the bridge maps to {', '.join(row.feeds)}"
    return row.why if row.verdict == "inert" else "a value that computes what the bridge builds"


def check_config(config: Mapping[str, Any], *, assume_inert: Iterable[str] = (), accept_gaps: Iterable[str] = (),
                 file: str = "config.json") -> ConfigReport:
    """Classify every key of ``config`` (and of its ``text_config``); collect the diagnostics.

    ``assume_inert``: unknown keys the user declares inert (``--assume-inert KEY``); ``accept_gaps``: refused
    fields to convert anyway (``--accept-semantic-gap FIELD``). Both are matched on the dotted key or, under
    ``text_config``, on the bare key."""
    checker = _Checker(file, assume_inert, accept_gaps)
    problem = scope_problem(config)
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else ""
    text_values = config.get(TEXT_CONFIG)
    text_type = ""
    if problem is not None:
        code, message = problem
        return ConfigReport((), (Diagnostic("error", code, message, file=file),), scope_error=True,
                            model_type=str(model_type or ""))
    assert isinstance(model_type, str)
    top = Scope("", config, defaults_for(model_type), model_type)
    scopes = [top]
    if isinstance(text_values, Mapping):
        declared = text_values.get("model_type")
        text_type = declared if isinstance(declared, str) else str(
            transformers_defaults()["text_model_types"].get(model_type, ""))
        scopes.append(Scope(TEXT_CONFIG + ".", text_values, defaults_for(text_type), text_type, parent=top))
    for scope in scopes:
        checker.scope(scope)
    # a wrapper's facts are its language model's: report them once, on the text config when it has its own
    fact_scope = scopes[-1] if FACTS.get(scopes[-1].model_type) else top
    checker.facts(fact_scope.model_type, fact_scope.prefix, fact_scope.values)
    checker.fallbacks(scopes[-1])
    for flag, given, what in (("--assume-inert", checker.assume_inert, "unknown"),
                              ("--accept-semantic-gap", checker.accept_gaps, "refused")):
        for name in given:
            if name not in checker.used_flags:
                checker.diagnostics.append(Diagnostic(
                    "warning", "config.unused-flag", f"{flag} {name}: no such {what} field in this config",
                    file=file, key=name))
    return ConfigReport(
        fields=tuple(checker.fields),
        diagnostics=tuple(checker.diagnostics),
        assumed_inert=checker.assume_inert,
        accepted_gaps=checker.accept_gaps,
        model_type=model_type,
        text_model_type=text_type,
    )


@dataclass(frozen=True)
class CatalogSize:
    mapped: int = 0
    inert: int = 0
    refused: int = 0
    by_table: dict[str, int] = field(default_factory=dict)


def catalog_size() -> CatalogSize:
    """Rows per verdict, for the report and README."""
    rows = list(TOP_INDEX.values()) + [r for table in NESTED_INDEX.values() for r in table.values()]
    count = {v: sum(1 for r in rows if r.verdict == v) for v in ("mapped", "inert", "refused")}
    return CatalogSize(count["mapped"], count["inert"], count["refused"],
                       {"top": len(TOP_INDEX), **{k: len(v) for k, v in NESTED_INDEX.items()}, "model_types":
                        len(FACTS)})


__all__ = ["ConfigReport", "FieldVerdict", "bridge_value", "catalog_size", "check_config", "transformers_defaults"]
