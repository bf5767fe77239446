"""Render bridge plans to Python source: ``render(plans, inputs) -> {relative_path: text}``. No disk writes.

The output is the whole ``generated/`` tree:

* ``<module_name>.py``      one bridge module per layout fingerprint (``templates/bridge_module.py.jinja``);
* ``__init__.py``           the fingerprint registry with a lazy ``get_bridge`` (``templates/registry.py.jinja``);
* ``SUPPORTED.md``          the table of supported layouts and rule families (``templates/supported.md.jinja``);
* ``inputs/<name>.json``    the canonical inputs (``layout_to_json``), so ``mapgen check`` runs offline.

Everything is computed here, in Python, into a small *render model* of pre-formatted strings (literals via
``ascii()``, prose via :func:`~mapgen.emit.names.plain_text`, expressions laid out by
:mod:`mapgen.emit.pyfmt`); the templates only loop over it. Every Python file is parsed with libcst and
compiled before it is returned, and bridge modules are checked to call nothing but the runtime API.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import libcst

from mapgen import __version__
from mapgen.emit import pyfmt
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
from mapgen.emit.pyfmt import Lit, Name, Node, Tup, call
from mapgen.errors import Diagnostic, MapgenError, error
from mapgen.infer.ir import Layout, layout_to_json
from mapgen.plan.plan import BridgePlan, ConfigField
from mapgen.plan.rules import Op, Rule, Sharding
from mapgen.plan.spec import ModelSpec

REGENERATE_COMMAND = "mapgen emit --from-inputs"
REGISTRY_PATH = "__init__.py"
SUPPORTED_PATH = "SUPPORTED.md"
INPUTS_DIR = "inputs"
REGISTRY_ATTRIBUTE = "BRIDGE"  # the name a bridge module binds its Bridge to (the registry says (module, name))

BRIDGE_TEMPLATE = "bridge_module.py.jinja"
REGISTRY_TEMPLATE = "registry.py.jinja"
SUPPORTED_TEMPLATE = "supported.md.jinja"
GENERIC_SECTION = "_generic"

# Rule sections, in the order a bridge module lists them. A rule goes to the section whose family prefix
# is the longest match for ``rule.family`` (``moe.shared.fc1`` -> ``shared_expert``); every rule whose
# domain is MTP (``mtp`` / ``mtp:<group>``) goes to the MTP section, so the MTP block reads as one unit.
# A family with no section here renders through ``sections/_generic.py.jinja`` under its own name.
# Adding a family = one entry here + one ``templates/sections/<name>.py.jinja``.
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embedding", ("embedding", "output", "lm_head")),
    ("norm", ("norm", "final_norm", "norms")),
    ("attention", ("attention",)),
    ("gated_delta_net", ("gdn", "gated_delta_net", "linear_attn")),
    ("dense_mlp", ("mlp", "dense_mlp")),
    ("moe", ("moe", "experts", "router")),
    ("shared_expert", ("moe.shared", "shared_expert", "shared_experts")),
    ("mtp", ("mtp",)),
)

# ConfigField.expr -> (runtime helper the module imports, argument). ``const``/``config`` are literal calls.
_DERIVED: dict[str, tuple[str, str]] = {
    "head_dim": ("head_dim", "hf"),
    "rope_scaling": ("rope_scaling", "hf"),
    "rope_scaling_factor": ("rope_scaling_factor", "hf"),
    "layer_kinds": ("layer_kinds", "layout"),
    "mlp_kinds": ("mlp_kinds", "layout"),
    "mtp_depth": ("mtp_depth", "layout"),
    "mtp_layer_kind": ("mtp_layer_kind", "layout"),
    "mtp_mlp_kind": ("mtp_mlp_kind", "layout"),
}
_BASE_IMPORTS = ("Bridge", "HFConfig", "Layout", "ModelSpec", "Rule")
_OPS = frozenset(typing.get_args(Op))
_SHARDINGS = frozenset(typing.get_args(Sharding))
_SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelSpec))
_SPEC_TYPES: dict[str, Any] = typing.get_type_hints(ModelSpec)
# Calls a bridge module may contain (checked on the AST of every rendered module).
_ALLOWED_CALLS = frozenset({"Bridge", "ModelSpec", "Rule", "hf.get", *(h for h, _ in _DERIVED.values())})
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


def _heading(title: str) -> str:
    text = f"-- {plain_text(title)} "
    return text + "-" * max(3, pyfmt.WIDTH - len("    # ") - len(text))


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
    env.filters["heading"] = _heading
    return env


# ---------------------------------------------------------------------------------------------------------
# The render model
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleView:
    comment: tuple[str, ...]
    lines: tuple[str, ...]


@dataclass(frozen=True)
class SectionView:
    name: str
    template: str
    title: str
    rules: tuple[RuleView, ...]


@dataclass(frozen=True)
class FieldView:
    comment: tuple[str, ...]
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Module:
    """One bridge module: a plan and the inputs it serves."""

    plan: BridgePlan
    module: PythonIdentifier
    inputs: tuple[str, ...]  # input names, sorted


def header_lines(template: str, inputs: Sequence[tuple[str, str]]) -> list[str]:
    """The fixed header (without comment markers): tool, template, input digests, regeneration command."""
    lines = [
        f"@generated by mapgen {__version__} -- DO NOT EDIT.",
        f"template: templates/{template}",
    ]
    if inputs:
        lines.append("inputs (sha256 of json.dumps(input, sort_keys=True)):")
        lines += [f"  {input_path(name)}  {digest}" for name, digest in inputs]
    else:
        lines.append("inputs: none")
    lines.append(f"regenerate: {REGENERATE_COMMAND}")
    return lines


def _rule_call(rule: Rule) -> Node:
    kwargs: dict[str, Node] = {
        "family": Lit(rule.family),
        "megatron": Lit(rule.megatron),
        "hf": Tup(tuple(Lit(k) for k in rule.hf)),
        "op": Lit(rule.op),
        "sharding": Lit(rule.sharding),
    }
    if rule.domain != "global":
        kwargs["domain"] = Lit(rule.domain)
    if rule.experts:
        kwargs["experts"] = Lit(True)
    if rule.options:
        kwargs["options"] = Tup(tuple(Tup((Lit(k), Lit(v))) for k, v in rule.options))
    return call("Rule", explode=True, **kwargs)


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


def _section_of(rule: Rule) -> str:
    if rule.domain == "mtp" or rule.domain.startswith("mtp:"):
        return "mtp"
    best, best_len = "", -1
    for name, prefixes in SECTIONS:
        for prefix in prefixes:
            if (rule.family == prefix or rule.family.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = name, len(prefix)
    return best or rule.family.split(".", 1)[0]


def _sections(rules: Sequence[Rule], env: jinja2.Environment) -> list[SectionView]:
    buckets: dict[str, list[Rule]] = {}
    for rule in rules:
        buckets.setdefault(_section_of(rule), []).append(rule)
    known = [name for name, _ in SECTIONS]
    order = [n for n in known if n in buckets] + [n for n in buckets if n not in known]
    available = set(env.list_templates())
    out = []
    for name in order:
        has_template = name in known and f"sections/{name}.py.jinja" in available
        views = tuple(
            RuleView(
                comment=tuple(comment_lines(r.comment, _COMMENT_WIDTH)),
                lines=tuple(pyfmt.layout(_rule_call(r), indent=1, suffix=",")),
            )
            for r in buckets[name]
        )
        template = f"sections/{name}.py.jinja" if has_template else f"sections/{GENERIC_SECTION}.py.jinja"
        out.append(SectionView(name=name, template=template, title=plain_text(name), rules=views))
    return out


def literal_fits(value: object, annotation: Any) -> bool:
    """Does a literal ``value`` type-check against a ``ModelSpec`` annotation? (What mypy --strict will
    say about the generated keyword; unknown annotation shapes are accepted.)"""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(literal_fits(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return (origin is None and not isinstance(annotation, type)) or annotation is Any


def _config_value(f: ConfigField) -> tuple[Node, str | None]:
    """The expression for one ``ModelSpec`` keyword and the runtime helper it needs (if any)."""
    if f.expr == "const":
        annotation = _SPEC_TYPES.get(f.field, Any)
        if not literal_fits(f.default, annotation):
            raise error("emit.invalid-config",
                        f"ModelSpec.{f.field} cannot be the constant {py_literal(f.default)}",
                        expected=plain_text(str(annotation)), hint="fix the ConfigField the planner produces")
        return Lit(f.default), None
    if f.expr == "config":
        if not f.names or not all(isinstance(n, str) for n in f.names):
            raise error("emit.invalid-config", f"config field {f.field} names no HF config key",
                        hint="ConfigField(expr='config') needs names")
        names = tuple(Lit(n) for n in f.names)
        if f.has_default:
            return call("hf.get", *names, default=Lit(f.default)), None
        return call("hf.get", *names), None
    if f.expr in _DERIVED:
        helper, arg = _DERIVED[f.expr]
        return call(helper, Name(PythonIdentifier(arg))), helper
    raise error(
        "emit.invalid-config",
        f"config field {f.field}: expression kind {py_literal(str(f.expr))} has no rendering",
        expected="one of const, config, " + ", ".join(sorted(_DERIVED)),
        hint="a new ConfigExpr needs a runtime helper and an entry in mapgen.emit.render._DERIVED",
    )


def _config(fields: Sequence[ConfigField]) -> tuple[list[FieldView], list[str]]:
    seen: set[str] = set()
    views, helpers = [], set()
    for f in fields:
        name = PythonIdentifier(f.field, what="ModelSpec field")
        if name not in _SPEC_FIELDS:
            raise error("emit.invalid-config", f"ModelSpec has no field {name}",
                        expected="a field of mapgen.plan.spec.ModelSpec")
        if name in seen:
            raise error("emit.invalid-config", f"ModelSpec field {name} is set twice")
        seen.add(name)
        node, helper = _config_value(f)
        if helper:
            helpers.add(helper)
        views.append(
            FieldView(
                comment=tuple(comment_lines(f.comment, pyfmt.WIDTH - 10)),
                lines=tuple(pyfmt.layout(node, indent=2, prefix=f"{name}=", suffix=",")),
            )
        )
    # isort order (ruff I001, order-by-type): classes first, then functions; both alphabetical.
    return views, [*_BASE_IMPORTS, *sorted(helpers)]


def _docstring(plan: BridgePlan) -> tuple[str, list[str]]:
    lines = [docstring_text(line) for line in plan.description if plain_text(line).strip()]
    wrapped: list[str] = []
    for line in lines:
        wrapped += comment_lines(line, pyfmt.WIDTH) if len(line) > pyfmt.WIDTH else [line]
    if not wrapped:
        wrapped = [f"Bridge for layout fingerprint {plan.fingerprint}."]
    return wrapped[0], wrapped[1:]


def _render_module(env: jinja2.Environment, mod: Module, digests: Mapping[str, str]) -> str:
    plan = mod.plan
    config, imports = _config(plan.config)
    summary, body = _docstring(plan)
    model = {
        "header": header_lines(BRIDGE_TEMPLATE, [(n, digests[n]) for n in mod.inputs]),
        "summary": summary,
        "body": body,
        "inputs": [input_path(n) for n in mod.inputs],
        "imports": imports,
        "fingerprint": py_literal(plan.fingerprint),
        "config": config,
        "sections": _sections(plan.rules, env),
        "model_type_lines": pyfmt.layout(Lit(plan.model_type), indent=1, prefix="model_type=", suffix=","),
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
            "comment": comment_lines(f"{m.plan.model_type}: " + ", ".join(m.inputs), _COMMENT_WIDTH),
            "fingerprint": py_literal(m.plan.fingerprint),
            "module": py_literal(str(m.module)),
            "attribute": py_literal(REGISTRY_ATTRIBUTE),
        }
        for m in modules
    ]
    header = header_lines(REGISTRY_TEMPLATE, sorted(digests.items()))
    return _finish(env.get_template(REGISTRY_TEMPLATE).render(header=header, entries=entries))


def _supported(
    env: jinja2.Environment, modules: Sequence[Module], inputs: Mapping[str, Layout], digests: Mapping[str, str]
) -> str:
    layouts = []
    families: dict[str, dict[str, set[str]]] = {}
    for m in modules:
        first = inputs[m.inputs[0]]
        fams = sorted({r.family for r in m.plan.rules})
        for r in m.plan.rules:
            entry = families.setdefault(r.family, {"ops": set(), "modules": set()})
            entry["ops"].add(f"{r.op}/{r.sharding}")
            entry["modules"].add(str(m.module))
        layouts.append(
            {
                "module": markdown_cell(str(m.module)),
                "fingerprint": markdown_cell(m.plan.fingerprint),
                "model_type": markdown_cell(m.plan.model_type),
                "architectures": markdown_cell(", ".join(first.architectures) or "-"),
                "rules": len(m.plan.rules),
                "families": markdown_cell(", ".join(fams)),
            }
        )
    by_input = {name: m for m in modules for name in m.inputs}
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
    """Inputs sharing a fingerprint share one module; their plans must be identical. Sorted by module."""
    by_fp: dict[str, list[str]] = {}
    problems: list[Diagnostic] = []
    for name in sorted(plans):
        by_fp.setdefault(fingerprint_text(plans[name].fingerprint), []).append(name)
    modules = []
    for fp in sorted(by_fp):
        names = by_fp[fp]
        plan = plans[names[0]]
        problems += [
            Diagnostic("error", "emit.plan-conflict",
                       f"inputs {names[0]} and {other} share fingerprint {fp} but were planned differently",
                       file=input_path(other), hint="the fingerprint must capture everything the plan depends "
                       "on; fix mapgen.plan.planner.fingerprint")
            for other in names[1:]
            if plans[other] != plan
        ]
        modules.append(Module(plan, module_identifier(plan.module_name), tuple(names)))
    seen: dict[str, str] = {}
    for m in modules:
        if m.module in seen:
            problems.append(Diagnostic("error", "emit.module-clash",
                                       f"fingerprints {seen[m.module]} and {m.plan.fingerprint} both want module "
                                       f"{m.module}", hint="module names must be unique per fingerprint"))
        seen[m.module] = m.plan.fingerprint
    if problems:
        raise MapgenError(problems)
    return sorted(modules, key=lambda m: str(m.module))


def render(plans: Mapping[str, BridgePlan], inputs: Mapping[str, Layout]) -> dict[str, str]:
    """Render the whole generated tree. ``plans`` and ``inputs`` are keyed by input name (the stem of
    ``inputs/<name>.json``); ``plans[name]`` is the plan of ``inputs[name]``.

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
        text = _render_module(env, mod, digests)
        validate_python(path, text, allowed_calls=_ALLOWED_CALLS)
        files[path] = text
    files[REGISTRY_PATH] = _registry(env, modules, digests)
    validate_python(REGISTRY_PATH, files[REGISTRY_PATH])
    files[SUPPORTED_PATH] = _supported(env, modules, inputs, digests)
    return {path: files[path] for path in sorted(files)}


def module_files(files: Mapping[str, Any]) -> list[str]:
    """The bridge module paths of a rendered tree (for summaries)."""
    return sorted(p for p in files if p.endswith(".py") and "/" not in p and p != REGISTRY_PATH)
