"""Bridges as tables: flat planned rules -> groups of rows, shared blocks, typed op spellings (pure).

A plan's rules are cut into *sections* (maximal runs with one domain, in rule order). Each section gets the
Megatron and HF roots its names share (up to the last ``{placeholder}.``) and becomes a ``Group`` whose rows
are ``(megatron suffix, hf suffix or suffixes, op)``. A decoder-style section is cut once more where its MLP
rows start, so the mixer block and the MLP block can each be shared: identical blocks (across the groups
and the bridges of one module) are written once, as module constants. Everything here returns pre-formatted
text; checkpoint strings reach it only through :func:`~mapgen.emit.names.py_literal` and names only through
:class:`~mapgen.emit.names.PythonIdentifier`.
"""

from __future__ import annotations

import inspect
import keyword
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mapgen.contract.rules import Rule
from mapgen.contract.table import CONSTRUCTORS, OpSpec, flatten
from mapgen.emit import pyfmt
from mapgen.emit.names import PythonIdentifier, py_literal
from mapgen.emit.pyfmt import Call, Lit, Node, Tup
from mapgen.plan.plan import BridgePlan

WIDTH = 120  # the project's ruff line length: table rows read best on one line
_PLACEHOLDER_ROOT = re.compile(r"^.*\}\.")
_RESERVED = frozenset({"BRIDGES"})


@dataclass(frozen=True)
class Block:
    name: PythonIdentifier
    rows: tuple[tuple[str, tuple[str, ...], Node], ...]  # (megatron suffix, hf suffixes, op spelling)
    key: tuple[object, ...]  # what makes two blocks the same


@dataclass(frozen=True)
class GroupView:
    domain: str
    megatron: str
    hf: str
    blocks: tuple[PythonIdentifier, ...]


@dataclass(frozen=True)
class BridgeTables:
    plan: BridgePlan
    groups: tuple[GroupView, ...]


def _root(names: Sequence[str]) -> str:
    """The longest common prefix of ``names`` that ends right after a ``{placeholder}.``, else ''."""
    common = names[0]
    for name in names[1:]:
        i = 0
        while i < min(len(common), len(name)) and common[i] == name[i]:
            i += 1
        common = common[:i]
    m = _PLACEHOLDER_ROOT.match(common)
    return m.group(0) if m else ""


def _sections(rules: Sequence[Rule]) -> list[list[Rule]]:
    out: list[list[Rule]] = []
    for rule in rules:
        if out and out[-1][0].domain == rule.domain:
            out[-1].append(rule)
        else:
            out.append([rule])
    return out


def literal_fits(value: object, annotation: Any) -> bool:
    """Does a literal ``value`` type-check against an annotation? (What mypy --strict will say about the
    generated argument; unknown annotation shapes are accepted.)"""
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


def _literal_args(fn: Callable[..., OpSpec], values: dict[str, object]) -> bool:
    hints = typing.get_type_hints(fn)
    return all(literal_fits(v, hints.get(k, Any)) for k, v in values.items())


def op_node(rule: Rule) -> Node:
    """The reviewed spelling of a rule's op (``copy('row')``, ``qkv(output_gate=True)``, ...) when its
    constructor gives back exactly this op, sharding, expert range and options; else the general ``op(...)``."""
    target = OpSpec(rule.op, rule.sharding, rule.experts, rule.options)
    fn = CONSTRUCTORS.get(rule.op)
    if fn is not None:
        params = inspect.signature(fn).parameters
        values: dict[str, object] = {"sharding": rule.sharding} if "sharding" in params else {}
        names_ok = all(isinstance(k, str) and k in params and k != "sharding" for k, _ in rule.options)
        values.update(dict(rule.options))
        if names_ok and len(values) == len(rule.options) + ("sharding" in params) and _literal_args(fn, values):
            try:
                fits = fn(**values) == target
            except TypeError:
                fits = False
            if fits:
                args: list[Node] = []
                kwargs: list[tuple[PythonIdentifier, Node]] = []
                for i, (name, p) in enumerate(params.items()):
                    if name not in values or values[name] == p.default:
                        continue
                    if i == 0 and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
                        args.append(Lit(values[name]))
                    else:
                        kwargs.append((PythonIdentifier(name, what="op option"), Lit(values[name])))
                return Call((PythonIdentifier(fn.__name__),), tuple(args), tuple(kwargs))
    general: list[tuple[PythonIdentifier, Node]] = []
    if rule.experts:
        general.append((PythonIdentifier("experts"), Lit(True)))
    if rule.options:
        general.append((PythonIdentifier("options"), Tup(tuple(Tup((Lit(k), Lit(v))) for k, v in rule.options))))
    return Call((PythonIdentifier("op"),), (Lit(rule.op), Lit(rule.sharding)), tuple(general))


def _base_name(rules: Sequence[Rule]) -> str:
    """A constant name for a block from the planner's family labels: their distinct first components other
    than ``norm`` (``ATTENTION``, ``MOE``, ``FINAL_NORM_OUTPUT``, ...)."""
    families = [r.family.split(".", 1)[0] for r in rules if isinstance(r.family, str)]
    named = list(dict.fromkeys(f for f in families if f != "norm")) or families or ["block"]
    base = re.sub(r"[^A-Z0-9]+", "_", "_".join(named[:3]).upper()).strip("_")
    if not base or not base[0].isalpha() or keyword.iskeyword(base) or base in _RESERVED or base.startswith("BRIDGE"):
        return "BLOCK"
    return base[:40]


def _free_name(base: str, domain: str, used: set[str]) -> str:
    """``base``; if a different block has it, ``<DOMAIN KIND>_<base>`` (``MTP_MOE``); then numbered."""
    if base not in used:
        return base
    kind = re.sub(r"[^A-Z0-9]+", "_", domain.partition(":")[0].upper()).strip("_")
    name = f"{kind}_{base}" if kind and kind[0].isalpha() and not kind.startswith("BRIDGE") else base
    n = 1
    while name in used:
        n += 1
        name = f"{base}_{n}"
    return name


def _split(section: list[Rule], mroot: str) -> list[list[Rule]]:
    """A layer's rules -> [mixer block, MLP block] (cut where ``mlp.`` rows start); other sections stay whole."""
    for i, rule in enumerate(section):
        if i and rule.megatron[len(mroot):].startswith("mlp."):
            return [section[:i], section[i:]]
    return [section]


def build(plans: Sequence[BridgePlan]) -> tuple[list[Block], list[BridgeTables]]:
    """The blocks (in order of first use, identical ones once) and each plan's groups."""
    blocks: dict[tuple[object, ...], Block] = {}
    used: set[str] = set()
    bridges = []
    for plan in plans:
        groups = []
        for section in _sections(plan.rules):
            global_ = section[0].domain == "global"
            mroot = "" if global_ else _root([r.megatron for r in section])
            hroot = "" if global_ else _root([k for r in section for k in r.hf])
            names = []
            for part in _split(section, mroot):
                rows = tuple((r.megatron[len(mroot):], tuple(k[len(hroot):] for k in r.hf), op_node(r)) for r in part)
                key = tuple((m, h, pyfmt.flat(o)) for m, h, o in rows)
                if key not in blocks:
                    name = _free_name(_base_name(part), section[0].domain, used)
                    used.add(name)
                    blocks[key] = Block(PythonIdentifier(name, what="block name"), rows, key)
                names.append(blocks[key].name)
            groups.append(GroupView(section[0].domain, mroot, hroot, tuple(names)))
        bridges.append(BridgeTables(plan, tuple(groups)))
    return list(blocks.values()), bridges


# ---------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------
def _hf_text(keys: tuple[str, ...]) -> str:
    if len(keys) == 1:
        return py_literal(keys[0])
    return "(" + ", ".join(py_literal(k) for k in keys) + ")"


def row_lines(megatron: str, hf: tuple[str, ...], op: Node) -> list[str]:
    """One row, on one line when it fits; else the HF side on a continuation line; else one HF key a line."""
    pad = pyfmt.INDENT
    m, h, o = py_literal(megatron), _hf_text(hf), pyfmt.flat(op)
    candidates = [[f"{pad}({m}, {h}, {o}),"], [f"{pad}({m},", f"{pad} {h}, {o}),"]]
    if len(hf) > 1:
        keys = [py_literal(k) for k in hf]
        candidates.append([f"{pad}({m},", f"{pad} ({keys[0]},", *(f"{pad}  {k}," for k in keys[1:-1]),
                           f"{pad}  {keys[-1]}), {o}),"])
    for lines in candidates:
        if all(len(line) <= WIDTH for line in lines):
            return lines
    hf_node: Node = Lit(hf[0]) if len(hf) == 1 else Tup(tuple(Lit(k) for k in hf))
    return pyfmt.layout(Tup((Lit(megatron), hf_node, op)), indent=1, suffix=",", width=WIDTH)


def group_lines(group: GroupView, indent: int) -> list[str]:
    """``Group(domain, megatron root, hf root, BLOCK + BLOCK),`` on as few aligned lines as fit."""
    pad = pyfmt.INDENT * indent
    parts = [py_literal(group.domain), py_literal(group.megatron), py_literal(group.hf), " + ".join(group.blocks)]
    lines = pyfmt.fill(f"{pad}Group(", parts, "),", WIDTH)
    if lines is None:  # a very long literal: one argument a line
        return [f"{pad}Group(", *(f"{pad}{pyfmt.INDENT}{p}," for p in parts), f"{pad}),"]
    return lines


def call_lines(node: Call, indent: int, prefix: str, suffix: str) -> list[str]:
    """A call with literal arguments, filled onto aligned lines (else laid out one argument a line)."""
    pad = pyfmt.INDENT * indent
    parts = [pyfmt.flat(a) for a in node.args] + [f"{k}={pyfmt.flat(v)}" for k, v in node.kwargs]
    head = f"{pad}{prefix}{'.'.join(node.func)}("
    lines = pyfmt.fill(head, parts, ")" + suffix, WIDTH) if parts else [head + ")" + suffix]
    return lines if lines is not None else pyfmt.layout(node, indent=indent, prefix=prefix, suffix=suffix, width=WIDTH)


def check_round_trip(blocks: Sequence[Block], bridges: Sequence[BridgeTables]) -> list[str]:
    """Problems if the tables do not give back the plan's rules (the renderer's own invariant)."""
    from mapgen.contract.table import Group

    by_name = {b.name: b for b in blocks}
    problems = []
    for bt in bridges:
        groups = []
        for g in bt.groups:
            rows = []
            for name in g.blocks:
                for m, h, o in by_name[name].rows:
                    spec = _evaluate(o)
                    rows.append((m, h[0] if len(h) == 1 else h, spec))
            groups.append(Group(g.domain, g.megatron, g.hf, tuple(rows)))
        if flatten(tuple(groups)) != bt.plan.rules:
            problems.append(f"the tables of {bt.plan.fingerprint} do not flatten to its planned rules")
    return problems


def _evaluate(node: Node) -> OpSpec:
    from mapgen.contract import table

    assert isinstance(node, Call)
    fn = getattr(table, node.func[0])
    args = [_value(a) for a in node.args]
    kwargs = {k: _value(v) for k, v in node.kwargs}
    result = fn(*args, **kwargs)
    assert isinstance(result, OpSpec)
    return result


def _value(node: Node) -> Any:
    if isinstance(node, Lit):
        return node.value
    if isinstance(node, Tup):
        return tuple(_value(i) for i in node.items)
    raise TypeError(node)
