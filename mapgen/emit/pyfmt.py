"""A tiny deterministic layout engine for the expressions mapgen generates.

Generated modules contain only literals, names, tuples and calls, so a black-like layout needs no more than
this: an expression goes on one line when it fits, otherwise its brackets open and each element goes on its
own line with a trailing comma; an over-long string becomes an implicit concatenation of ``ascii()`` chunks
inside parentheses. :func:`fill` packs short arguments onto aligned lines instead (table rows, ``Group``,
``Facts``). Nothing depends on black being installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mapgen.emit.names import PythonIdentifier, py_literal

INDENT = "    "
WIDTH = 100  # generated code stays well inside the project's ruff line length


@dataclass(frozen=True)
class Lit:
    """A literal: ``None``, ``bool``, ``int``, finite ``float`` or ``str`` (written with ``ascii()``)."""

    value: object


@dataclass(frozen=True)
class Name:
    """An identifier (validated)."""

    name: PythonIdentifier


@dataclass(frozen=True)
class Tup:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Call:
    """``func(*args, **kwargs)``; ``func`` is a validated (possibly dotted) name."""

    func: tuple[PythonIdentifier, ...]
    args: tuple[Node, ...] = ()
    kwargs: tuple[tuple[PythonIdentifier, Node], ...] = ()


Node = Lit | Name | Tup | Call


def call(func: str, *args: Node, **kwargs: Node) -> Call:
    """Build a :class:`Call`; keyword order is the order given."""
    parts = tuple(PythonIdentifier(p, what="callable name") for p in func.split("."))
    return Call(parts, args, tuple((PythonIdentifier(k, what="keyword"), v) for k, v in kwargs.items()))


def flat(node: Node) -> str:
    """The one-line spelling of ``node``."""
    if isinstance(node, Lit):
        return py_literal(node.value)
    if isinstance(node, Name):
        return str(node.name)
    if isinstance(node, Tup):
        if len(node.items) == 1:
            return f"({flat(node.items[0])},)"
        return "(" + ", ".join(flat(i) for i in node.items) + ")"
    parts = [flat(a) for a in node.args] + [f"{k}={flat(v)}" for k, v in node.kwargs]
    return ".".join(node.func) + "(" + ", ".join(parts) + ")"


def layout(node: Node, *, indent: int, prefix: str = "", suffix: str = "", width: int = WIDTH) -> list[str]:
    """Lines (without newlines) spelling ``prefix + node + suffix`` at ``indent`` levels."""
    pad = INDENT * indent
    one = f"{pad}{prefix}{flat(node)}{suffix}"
    if len(one) <= width or isinstance(node, Name):
        return [one]
    if isinstance(node, Lit):
        if not isinstance(node.value, str):
            return [one]
        chunks = _chunks(node.value, width - len(pad) - len(INDENT))
        if len(chunks) == 1:
            return [one]
        return [f"{pad}{prefix}(", *(f"{pad}{INDENT}{c}" for c in chunks), f"{pad}){suffix}"]
    if isinstance(node, Tup):
        if not node.items:
            return [one]
        return [f"{pad}{prefix}(", *_items(node.items, (), indent + 1, width), f"{pad}){suffix}"]
    head = ".".join(node.func)
    return [f"{pad}{prefix}{head}(", *_items(node.args, node.kwargs, indent + 1, width), f"{pad}){suffix}"]


def fill(head: str, parts: Sequence[str], tail: str, width: int = WIDTH) -> list[str] | None:
    """``head + ", ".join(parts) + tail`` filled greedily onto lines whose continuations align under the
    first part (``head`` ends with the opening bracket); None when a part alone does not fit."""
    cont = " " * len(head)
    lines: list[str] = []
    current = head
    for i, part in enumerate(parts):
        piece = part + (tail if i == len(parts) - 1 else ",")
        fresh = current in (head, cont)
        candidate = current + ("" if fresh else " ") + piece
        if len(candidate) > width and not fresh:
            lines.append(current)
            candidate = cont + piece
        current = candidate
    lines.append(current)
    return lines if all(len(line) <= width for line in lines) else None


def _items(
    args: Sequence[Node], kwargs: Sequence[tuple[PythonIdentifier, Node]], indent: int, width: int
) -> list[str]:
    lines: list[str] = []
    for arg in args:
        lines += layout(arg, indent=indent, suffix=",", width=width)
    for key, value in kwargs:
        lines += layout(value, indent=indent, prefix=f"{key}=", suffix=",", width=width)
    return lines


def _chunks(value: str, budget: int) -> list[str]:
    """Split ``value`` so that each chunk's ``ascii()`` spelling fits ``budget`` (at least one character
    per chunk, and escapes are never split because chunks are cut between characters)."""
    budget = max(budget, 16)
    chunks: list[str] = []
    current = ""
    for ch in value:
        candidate = current + ch
        if current and len(py_literal(candidate)) > budget:
            chunks.append(current)
            current = ch
        else:
            current = candidate
    chunks.append(current)
    return [py_literal(c) for c in chunks]
