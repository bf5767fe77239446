"""Names are types: everything that reaches generated text from a checkpoint passes through here.

Checkpoint-controlled strings (key names, ``model_type``, descriptions, comments) reach generated code in
exactly three ways, each with its own gate:

* as an **identifier** (module names, ``ModelSpec`` keywords, section names): :class:`PythonIdentifier`
  validates and refuses anything else;
* as a **string literal**: :func:`py_literal` (``ascii()``: a stricter ``repr()`` that also escapes
  non-ASCII, so homoglyphs and bidi controls are visible in a review);
* as **prose** in a comment, docstring or markdown cell: :func:`plain_text` keeps printable ASCII only,
  spelling everything else as a visible escape, so no newline, ``\\u2028`` or control character can end a
  comment and start code.
"""

from __future__ import annotations

import keyword
import math
import re
import textwrap

from mapgen.errors import error

# Module names that would collide with files the renderer itself writes into ``generated/``.
RESERVED_MODULE_NAMES = frozenset({"inputs", "supported", "__init__", "__main__"})

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MODULE = re.compile(r"[a-z_][a-z0-9_]*\Z")
_INPUT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
_HEX = re.compile(r"[0-9a-f]{6,64}\Z")

# Typographic characters the planner's prose uses on purpose, spelled in ASCII for comments.
_ASCII_SPELLING = {
    "\u00d7": "x",  # multiplication sign
    "\u2194": "<->",
    "\u2192": "->",
    "\u2190": "<-",
    "\u21d4": "<=>",
    "\u2013": "-",
    "\u2014": "--",
    "\u2018": "'",
    "\u2019": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2026": "...",
    "\u00a0": " ",
}

MAX_NAME_LENGTH = 100


class PythonIdentifier(str):
    """A string proven to be a plain Python identifier (not a keyword). Construct to validate."""

    __slots__ = ()

    def __new__(cls, value: str, *, what: str = "identifier") -> PythonIdentifier:
        if (
            not isinstance(value, str)
            or not _IDENTIFIER.match(value)
            or keyword.iskeyword(value)
            or len(value) > MAX_NAME_LENGTH
        ):
            raise error(
                "emit.invalid-identifier",
                f"{what} {py_literal(str(value))} is not a plain Python identifier",
                expected=f"[A-Za-z_][A-Za-z0-9_]*, not a keyword, at most {MAX_NAME_LENGTH} characters",
                hint="identifiers in generated code come from the planner; fix the name it produces",
            )
        return super().__new__(cls, value)


def module_identifier(value: str) -> PythonIdentifier:
    """A bridge module name: lower-case identifier, not private, not a file the registry reserves."""
    ident = PythonIdentifier(value, what="module name")
    if not _MODULE.match(ident) or ident.startswith("__") or ident in RESERVED_MODULE_NAMES:
        raise error(
            "emit.invalid-module-name",
            f"module name {py_literal(value)} cannot be a generated bridge module",
            expected="[a-z_][a-z0-9_]*, not dunder, not one of " + ", ".join(sorted(RESERVED_MODULE_NAMES)),
            hint="module names come from the planner (mapgen.plan.planner.module_name)",
        )
    return ident


def input_name(value: str) -> str:
    """A stored input's name: the stem of ``generated/inputs/<name>.json``."""
    if not isinstance(value, str) or not _INPUT_NAME.match(value) or ".." in value or len(value) > MAX_NAME_LENGTH:
        raise error(
            "emit.invalid-input-name",
            f"input name {py_literal(str(value))} is not a safe file name",
            expected=f"[a-z0-9][a-z0-9._-]*, no '..', at most {MAX_NAME_LENGTH} characters",
            hint="pass --name NAME to `mapgen emit`, or rename the file under generated/inputs/",
        )
    return value


def input_name_for_source(source: str) -> str:
    """Derive a stored input name from what the user typed: a layout JSON file -> its stem; a directory
    -> its name (``models--org--name`` cache folders -> ``org--name``); a hub id ``org/name`` ->
    ``org--name``. Lower-cased, other characters replaced by ``-``."""
    text = source.strip().rstrip("/\\")
    parts = [p for p in re.split(r"[/\\]", text) if p and p != "."]
    cached = [p for p in parts if p.startswith("models--")]
    if cached:
        base = cached[-1][len("models--") :]
    elif text.endswith(".json") and parts:
        base = parts[-1][: -len(".json")]
    elif len(parts) == 2 and not text.startswith((".", "/", "~")) and ":" not in text:
        base = f"{parts[0]}--{parts[1].partition('@')[0]}"  # a hub id, Org/Name[@revision]
    else:
        base = parts[-1] if parts else "model"
    base = re.sub(r"[^a-z0-9._-]+", "-", base.lower())
    base = re.sub(r"\.{2,}", ".", base).strip("-._") or "model"
    return input_name(base[:MAX_NAME_LENGTH].rstrip("-._") or "model")


def fingerprint_text(value: str) -> str:
    if not isinstance(value, str) or not _HEX.match(value):
        raise error(
            "emit.invalid-fingerprint",
            f"fingerprint {py_literal(str(value))} is not lower-case hex",
            expected="6 to 64 characters [0-9a-f]",
        )
    return value


def py_literal(value: object) -> str:
    """Python source for a literal value: ``ascii()`` for strings, ``repr()`` for the rest.

    Only ``None``, ``bool``, ``int``, finite ``float`` and ``str`` are accepted: anything else has no safe,
    stable literal spelling.
    """
    if value is None or isinstance(value, bool | int):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise error(
                "emit.invalid-literal",
                f"{value!r} has no Python literal",
                expected="a finite float",
                hint="the planner must not put inf/nan into a config recipe",
            )
        return repr(value)
    if isinstance(value, str):
        return ascii(value)
    raise error(
        "emit.invalid-literal",
        f"a {type(value).__name__} cannot be written as a literal in generated code",
        expected="None, bool, int, float or str",
    )


def plain_text(value: str) -> str:
    """Printable ASCII only, on one line: safe inside a ``#`` comment, a docstring line or a table cell.

    Known typographic characters get an ASCII spelling; every other non-printable or non-ASCII character
    (newlines, ``\\u2028``, bidi controls, homoglyphs) is written as its visible escape (``\\n``,
    ``\\u2028``), so the text can never leave the comment it is in.
    """
    out: list[str] = []
    for ch in str(value):
        if ch in _ASCII_SPELLING:
            out.append(_ASCII_SPELLING[ch])
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(ascii(ch)[1:-1])
    return "".join(out)


def comment_lines(text: str, width: int) -> list[str]:
    """``text`` as plain, wrapped lines of at most ``width`` characters (no ``#``; the template adds it)."""
    clean = plain_text(text).strip()
    if not clean:
        return []
    return textwrap.wrap(clean, width=max(width, 20), break_long_words=True, break_on_hyphens=False)


def docstring_text(text: str) -> str:
    """Plain text that is also safe inside a ``\"\"\"`` docstring (backslashes doubled, quotes escaped)."""
    return plain_text(text).replace("\\", "\\\\").replace('"', '\\"')


def markdown_cell(text: str) -> str:
    """Plain text safe in a markdown table cell."""
    return plain_text(text).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("<", "&lt;")
