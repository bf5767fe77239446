"""Render bridge plans to Python source: ``render(plans, inputs) -> {relative_path: text}``. No disk writes.

The output is the whole ``generated/`` tree:

* ``<model_type>.py``       one bridge module per model type, one ``Bridge`` per layout fingerprint in it, written
                            as tables (``templates/bridge_module.py.jinja``, laid out by :mod:`mapgen.emit.tables`);
* ``__init__.py``           the fingerprint -> (module, attribute) registry with a lazy ``get_bridge``
                            (``templates/registry.py.jinja``);
* ``SUPPORTED.md``          the table of supported layouts and rule families (``templates/supported.md.jinja``);
* ``inputs/<name>.json``    the canonical inputs (``layout_to_json``), so ``mapgen check`` runs offline.

Everything is computed here, in Python, into a small *render model* of pre-formatted strings (literals via
``ascii()``, prose via :func:`~mapgen.emit.names.plain_text`, expressions laid out by
:mod:`mapgen.emit.pyfmt`); the templates only loop over it. Every Python file is parsed with libcst and
compiled before it is returned, bridge modules are checked to call nothing but the contract's table API,
and their tables are checked to flatten back to exactly the planned rules.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import libcst

from mapgen import __version__
from mapgen.contract.bridge import PARITY
from mapgen.contract.config import Facts
from mapgen.contract.rules import Op, Rule, Sharding
from mapgen.contract.table import CONSTRUCTORS
from mapgen.emit import pyfmt, tables
from mapgen.emit.names import (
    PythonIdentifier,
    comment_lines,
    docstring_text,
    fingerprint_text,
    input_name,
    markdown_cell,
    module_identifier,
    plain_text,
    py_literal,
)
from mapgen.emit.pyfmt import Call, Lit, Node
from mapgen.emit.tables import literal_fits
from mapgen.errors import Diagnostic, MapgenError, error
from mapgen.ir import Layout, layout_to_json
from mapgen.plan.plan import BridgePlan

REGENERATE_COMMAND = "mapgen emit --from-inputs"
REGISTRY_PATH = "__init__.py"
SUPPORTED_PATH = "SUPPORTED.md"
INPUTS_DIR = "inputs"
REGISTRY_ATTRIBUTE = "BRIDGE"  # the name a bridge module binds its Bridge to (the registry says (module, name))

BRIDGE_TEMPLATE = "bridge_module.py.jinja"
REGISTRY_TEMPLATE = "registry.py.jinja"
SUPPORTED_TEMPLATE = "supported.md.jinja"
_OPS = frozenset(typing.get_args(Op))
_SHARDINGS = frozenset(typing.get_args(Sharding))
_FACT_TYPES: dict[str, Any] = typing.get_type_hints(Facts)
# Calls a bridge module may contain (checked on the AST of every rendered module).
_ALLOWED_CALLS = frozenset({"Bridge", "Facts", "Group", "op", *(fn.__name__ for fn in CONSTRUCTORS.values())})
_COMMENT_WIDTH = pyfmt.WIDTH - 6  # after "    # "


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------
def input_sha256(text: str) -> str:
    """sha256 of the canonical form of a JSON document: parsed, dumped with sorted keys (the project's
    ``json.dumps(obj, sort_keys=True)`` convention), UTF-8. Whitespace and key order do not matter."""
    return hashlib.sha256(json.dumps(json.loads(text), sort_keys=True).encode("utf-8")).hexdigest()


def input_path(name: str) -> str:
    return f"{INPUTS_DIR}/{input_name(name)}.json"


# ---------------------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------------------
def templates_dir() -> Path:
    """``templates/`` at the repository root (a source checkout or an editable install); an installed wheel
    ships them as ``mapgen/templates`` package data."""
    repo = Path(__file__).resolve().parents[2] / "templates"
    if (repo / BRIDGE_TEMPLATE).is_file():
        return repo
    packaged = Path(str(resources.files("mapgen") / "templates"))
    if (packaged / BRIDGE_TEMPLATE).is_file():
        return packaged
    raise error(
        "emit.no-templates",
        "cannot find the bridge templates",
        file=str(repo),
        expected=f"{BRIDGE_TEMPLATE} in templates/ at the repository root or in mapgen/templates",
        hint="reinstall mapgen (pip install -e .) from a checkout that has templates/",
    )


def _finish(text: str) -> str:
    """LF line endings, no trailing whitespace, exactly one final newline. Safe for generated Python: no
    string literal in it spans lines (``ascii()`` escapes newlines) and prose is sanitised to one line."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).rstrip("\n") + "\n"


def _environment() -> jinja2.Environment:
    # autoescape is for HTML; these templates produce Python and markdown whose every checkpoint-controlled
    # string is already escaped in Python (py_literal / plain_text / markdown_cell) before it gets here.
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
        newline_sequence="\n",
    )
    return env


# ---------------------------------------------------------------------------------------------------------
# The render model
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Module:
    """One bridge module: the plans of one model type (sorted by fingerprint) and the inputs they serve."""

    module: PythonIdentifier
    plans: tuple[BridgePlan, ...]
    inputs: tuple[tuple[str, ...], ...]  # per plan: its input names, sorted

    @property
    def all_inputs(self) -> tuple[str, ...]:
        return tuple(sorted(n for names in self.inputs for n in names))


def bridge_attribute(fingerprint: str) -> PythonIdentifier:
    """The module attribute holding the bridge of a fingerprint."""
    return PythonIdentifier(f"BRIDGE_{fingerprint_text(fingerprint)}", what="bridge name")


def header_lines(template: str, inputs: Sequence[tuple[str, str]],
                 numerics: Sequence[tuple[str, str]] = ()) -> list[str]:
    """The fixed header (without comment markers): tool, template, input digests, the numerical proof of
    each input (bridge modules), regeneration command."""
    lines = [
        f"@generated by mapgen {__version__} -- DO NOT EDIT.",
        f"template: templates/{template}",
    ]
    if inputs:
        lines.append("inputs (sha256 of json.dumps(input, sort_keys=True)):")
        lines += [f"  {input_path(name)}  {digest}" for name, digest in inputs]
    else:
        lines.append("inputs: none")
    if numerics:
        lines.append("numerical proof (each input's tiny twin through this bridge and through transformers):")
        for name, line in numerics:
            wrapped = comment_lines(f"{input_path(name)}: {line}", pyfmt.WIDTH - 6)
            lines += [f"  {wrapped[0]}", *(f"    {w}" for w in wrapped[1:])]
    lines.append(f"regenerate: {REGENERATE_COMMAND}")
    return lines


def _check_rule(rule: Rule, where: str) -> list[Diagnostic]:
    problems: list[str] = []
    if not isinstance(rule.family, str) or not rule.family:
        problems.append("family must be a non-empty string")
    if not isinstance(rule.megatron, str) or not isinstance(rule.domain, str):
        problems.append("megatron and domain must be strings")
    if not isinstance(rule.hf, tuple) or not rule.hf or not all(isinstance(k, str) for k in rule.hf):
        problems.append("hf must be a non-empty tuple of strings")
    if rule.op not in _OPS:
        problems.append(f"op {py_literal(str(rule.op))} is not one of {', '.join(sorted(_OPS))}")
    if rule.sharding not in _SHARDINGS:
        problems.append(f"sharding {py_literal(str(rule.sharding))} is not one of {', '.join(sorted(_SHARDINGS))}")
    if not isinstance(rule.experts, bool):
        problems.append("experts must be a bool")
    for option in rule.options:
        ok = (
            isinstance(option, tuple)
            and len(option) == 2
            and isinstance(option[0], str)
            and isinstance(option[1], str | int | bool)
        )
        if not ok:
            problems.append(f"option {py_literal(repr(option))} is not a (name, str|int|bool) pair")
    return [
        Diagnostic("error", "emit.invalid-rule", p, key=plain_text(str(rule.megatron)), file=where,
                   hint="rules come from mapgen.plan.planner; fix the rule it produces")
        for p in problems
    ]


def _facts(facts: Facts) -> Call:
    """``Facts(...)`` with the fields that differ from their defaults (type-checked: mypy checks the module)."""
    if not isinstance(facts, Facts):
        raise error("emit.invalid-facts", f"the plan's facts are a {type(facts).__name__}, not Facts",
                    hint="mapgen.plan.planner builds BridgePlan.facts")
    kwargs: list[tuple[PythonIdentifier, Node]] = []
    for f in dataclasses.fields(Facts):
        value = getattr(facts, f.name)
        if not literal_fits(value, _FACT_TYPES[f.name]):
            raise error("emit.invalid-facts", f"Facts.{f.name} cannot be {py_literal(value)}",
                        expected=plain_text(str(_FACT_TYPES[f.name])), hint="fix the facts the planner produces")
        if value != f.default:
            kwargs.append((PythonIdentifier(f.name), Lit(value)))
    return Call((PythonIdentifier("Facts"),), (), tuple(kwargs))


def _docstring(mod: Module) -> tuple[str, list[str]]:
    types_ = ", ".join(py_literal(t) for t in sorted({p.model_type for p in mod.plans}))
    summary = docstring_text(f"Bridges for model_type {types_}: one Bridge per layout fingerprint.")
    if len(summary) > pyfmt.WIDTH:
        summary = "Bridges for one model type: one Bridge per layout fingerprint."
    body: list[str] = []
    for plan, names in zip(mod.plans, mod.inputs, strict=True):
        sources = ", ".join(input_path(n) for n in names)
        body += ["", docstring_text(f"{bridge_attribute(plan.fingerprint)} ({sources}):")]
        for line in plan.description:
            text = docstring_text(line)
            if not plain_text(line).strip():
                continue
            wrapped = comment_lines(text, pyfmt.WIDTH - 4) if len(text) > pyfmt.WIDTH - 4 else [text]
            body += [f"    {w}" for w in wrapped]
    return summary, body


def _imports(blocks: Sequence[tables.Block]) -> list[str]:
    """What the module imports from mapgen.contract, in isort order (classes, then functions)."""
    used = {pyfmt.flat(op).partition("(")[0] for b in blocks for _, _, op in b.rows}
    return ["Bridge", "Facts", "Group", *sorted(used)]


def _import_lines(names: Sequence[str]) -> list[str]:
    one = f"from mapgen.contract import {', '.join(names)}"
    if len(one) <= tables.WIDTH:
        return [one]
    return ["from mapgen.contract import (", *(f"    {n}," for n in names), ")"]


def bridge_numerics(names: Sequence[str], numerics: Mapping[str, str]) -> str:
    """A bridge's numerical proof: the parity line of its first input that has one (every input with a twin
    passed, or nothing is rendered), else its first input's line."""
    found = [numerics[n] for n in names if n in numerics]
    return next((line for line in found if line.startswith(PARITY)), found[0] if found else "")


def _bridge_lines(plan: BridgePlan, groups: Sequence[tables.GroupView], numerics: str) -> list[str]:
    lines = [f"{bridge_attribute(plan.fingerprint)} = Bridge("]
    lines += pyfmt.layout(Lit(plan.fingerprint), indent=1, prefix="fingerprint=", suffix=",")
    lines += pyfmt.layout(Lit(plan.model_type), indent=1, prefix="model_type=", suffix=",")
    lines += tables.call_lines(_facts(plan.facts), indent=1, prefix="facts=", suffix=",")
    lines.append("    groups=(")
    for group in groups:
        lines += tables.group_lines(group, indent=2)
    lines.append("    ),")
    if numerics:
        lines += pyfmt.layout(Lit(plain_text(numerics)), indent=1, prefix="numerics=", suffix=",")
    lines.append(")")
    return lines


def _render_module(env: jinja2.Environment, mod: Module, digests: Mapping[str, str],
                   numerics: Mapping[str, str]) -> str:
    blocks, bridges = tables.build(mod.plans)
    by_plan = {p.fingerprint: names for p, names in zip(mod.plans, mod.inputs, strict=True)}
    problems = tables.check_round_trip(blocks, bridges)
    if problems:
        raise error("emit.table-mismatch", "; ".join(problems), file=f"{mod.module}.py",
                    hint="mapgen.emit.tables is broken; this is a mapgen bug")
    summary, body = _docstring(mod)
    model = {
        "header": header_lines(BRIDGE_TEMPLATE, [(n, digests[n]) for n in mod.all_inputs],
                               [(n, numerics[n]) for n in mod.all_inputs if n in numerics]),
        "summary": summary,
        "body": body,
        "imports": _import_lines(_imports(blocks)),
        "blocks": [
            {"name": b.name, "lines": [line for m, h, op in b.rows for line in tables.row_lines(m, h, op)]}
            for b in blocks
        ],
        "bridges": [_bridge_lines(bt.plan, bt.groups, bridge_numerics(by_plan[bt.plan.fingerprint], numerics))
                    for bt in bridges],
    }
    return _finish(env.get_template(BRIDGE_TEMPLATE).render(**model))


# ---------------------------------------------------------------------------------------------------------
# Validation of the rendered Python
# ---------------------------------------------------------------------------------------------------------
def _call_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_call_name(node.value)}.{node.attr}"
    return "<expression>"


def validate_python(path: str, text: str, *, allowed_calls: frozenset[str] | None = None) -> None:
    """Parse with libcst and compile; optionally require that every call is one of ``allowed_calls``."""
    try:
        libcst.parse_module(text)
        tree = ast.parse(text, path)
        compile(text, path, "exec", dont_inherit=True)
    except (libcst.ParserSyntaxError, SyntaxError, ValueError) as exc:
        raise error("emit.invalid-python", f"rendered {path} is not valid Python: {plain_text(str(exc))}",
                    file=path, hint="a template or the renderer is broken; this is a mapgen bug") from exc
    if allowed_calls is None:
        return
    calls = sorted({_call_name(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)} - allowed_calls)
    if calls:
        raise error("emit.unexpected-call", f"rendered {path} calls {', '.join(calls)}",
                    file=path, expected="only " + ", ".join(sorted(allowed_calls)),
                    hint="a template or the renderer is broken; this is a mapgen bug")


# ---------------------------------------------------------------------------------------------------------
# Registry and SUPPORTED.md
# ---------------------------------------------------------------------------------------------------------
def _layers_text(layout: Layout) -> str:
    s = layout.summary
    kinds = ", ".join(f"{count} {kind}" for kind, count in s.attention) or "-"
    return f"{s.num_layers} ({kinds})"


def _moe_text(layout: Layout) -> str:
    s = layout.summary
    if not s.moe_layers:
        return "-"
    shared = " + shared" if s.shared_experts else ""
    return f"{s.moe_layers} layers x {s.num_experts} experts ({s.expert_layout}){shared}"


def _mtp_text(layout: Layout) -> str:
    s = layout.summary
    return "-" if s.mtp_scheme == "none" or not s.mtp_depth else f"{s.mtp_depth} ({s.mtp_scheme})"


def _registry(env: jinja2.Environment, modules: Sequence[Module], digests: Mapping[str, str]) -> str:
    entries = [
        {
            "comment": comment_lines(f"{plan.model_type}: " + ", ".join(names), _COMMENT_WIDTH),
            "fingerprint": py_literal(plan.fingerprint),
            "module": py_literal(str(m.module)),
            "attribute": py_literal(str(bridge_attribute(plan.fingerprint))),
        }
        for m in modules
        for plan, names in zip(m.plans, m.inputs, strict=True)
    ]
    header = header_lines(REGISTRY_TEMPLATE, sorted(digests.items()))
    return _finish(env.get_template(REGISTRY_TEMPLATE).render(header=header, entries=entries))


def _supported(
    env: jinja2.Environment, modules: Sequence[Module], inputs: Mapping[str, Layout], digests: Mapping[str, str]
) -> str:
    layouts = []
    families: dict[str, dict[str, set[str]]] = {}
    for m in modules:
        for plan, names in zip(m.plans, m.inputs, strict=True):
            first = inputs[names[0]]
            fams = sorted({r.family for r in plan.rules})
            for r in plan.rules:
                entry = families.setdefault(r.family, {"ops": set(), "modules": set()})
                entry["ops"].add(f"{r.op}/{r.sharding}")
                entry["modules"].add(str(m.module))
            layouts.append(
                {
                    "module": markdown_cell(f"{m.module}.{bridge_attribute(plan.fingerprint)}"),
                    "fingerprint": markdown_cell(plan.fingerprint),
                    "model_type": markdown_cell(plan.model_type),
                    "architectures": markdown_cell(", ".join(first.architectures) or "-"),
                    "rules": len(plan.rules),
                    "families": markdown_cell(", ".join(fams)),
                }
            )
    by_input = {name: m for m in modules for names in m.inputs for name in names}
    checkpoints = [
        {
            "name": markdown_cell(name),
            "module": markdown_cell(str(by_input[name].module)),
            "model_type": markdown_cell(layout.model_type),
            "layers": markdown_cell(_layers_text(layout)),
            "moe": markdown_cell(_moe_text(layout)),
            "mtp": markdown_cell(_mtp_text(layout)),
            "tied": "yes" if layout.language_model.tied_embeddings else "no",
            "towers": markdown_cell(", ".join(t.name for t in layout.towers) or "-"),
        }
        for name, layout in sorted(inputs.items())
    ]
    family_rows = [
        {
            "family": markdown_cell(fam),
            "ops": markdown_cell(", ".join(sorted(entry["ops"]))),
            "modules": markdown_cell(", ".join(sorted(entry["modules"]))),
        }
        for fam, entry in sorted(families.items())
    ]
    header = header_lines(SUPPORTED_TEMPLATE, sorted(digests.items()))
    return _finish(
        env.get_template(SUPPORTED_TEMPLATE).render(
            header=header, layouts=layouts, checkpoints=checkpoints, families=family_rows
        )
    )


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------
def group_modules(plans: Mapping[str, BridgePlan]) -> list[Module]:
    """Inputs sharing a fingerprint share one bridge (their plans must be identical); the bridges of one
    model type share one module. Sorted by module, bridges by fingerprint."""
    by_fp: dict[str, list[str]] = {}
    problems: list[Diagnostic] = []
    for name in sorted(plans):
        by_fp.setdefault(fingerprint_text(plans[name].fingerprint), []).append(name)
    by_module: dict[PythonIdentifier, list[tuple[BridgePlan, tuple[str, ...]]]] = {}
    for fp in sorted(by_fp):
        names = by_fp[fp]
        plan = plans[names[0]]
        problems += [
            Diagnostic("error", "emit.plan-conflict",
                       f"inputs {names[0]} and {other} share fingerprint {fp} but were planned differently",
                       file=input_path(other), hint="the fingerprint must capture everything the plan depends "
                       "on; fix mapgen.contract.fingerprint")
            for other in names[1:]
            if plans[other] != plan
        ]
        by_module.setdefault(module_identifier(plan.module_name), []).append((plan, tuple(names)))
    if problems:
        raise MapgenError(problems)
    return [
        Module(module, tuple(p for p, _ in entries), tuple(n for _, n in entries))
        for module, entries in sorted(by_module.items())
    ]


def render(plans: Mapping[str, BridgePlan], inputs: Mapping[str, Layout],
           numerics: Mapping[str, str] | None = None) -> dict[str, str]:
    """Render the whole generated tree. ``plans`` and ``inputs`` are keyed by input name (the stem of
    ``inputs/<name>.json``); ``plans[name]`` is the plan of ``inputs[name]``; ``numerics[name]`` its
    numerical-proof line (module headers and ``Bridge.numerics``).

    Returns ``{relative_path: text}`` sorted by path; identical inputs give identical bytes.
    """
    if set(plans) != set(inputs):
        missing = sorted(set(inputs) ^ set(plans))
        raise error("emit.plan-missing", "every input needs exactly one plan: " + ", ".join(missing))
    for name in inputs:
        input_name(name)
    problems = [d for name in sorted(plans) for r in plans[name].rules for d in _check_rule(r, input_path(name))]
    if problems:
        raise MapgenError(problems)

    env = _environment()
    stored = {input_path(name): layout_to_json(layout) for name, layout in inputs.items()}
    digests = {name: input_sha256(stored[input_path(name)]) for name in inputs}
    modules = group_modules(plans)

    files: dict[str, str] = dict(stored)
    for mod in modules:
        path = f"{mod.module}.py"
        text = _render_module(env, mod, digests, numerics or {})
        validate_python(path, text, allowed_calls=_ALLOWED_CALLS)
        files[path] = text
    files[REGISTRY_PATH] = _registry(env, modules, digests)
    validate_python(REGISTRY_PATH, files[REGISTRY_PATH])
    files[SUPPORTED_PATH] = _supported(env, modules, inputs, digests)
    return {path: files[path] for path in sorted(files)}


def module_files(files: Mapping[str, Any]) -> list[str]:
    """The bridge module paths of a rendered tree (for summaries)."""
    return sorted(p for p in files if p.endswith(".py") and "/" not in p and p != REGISTRY_PATH)
