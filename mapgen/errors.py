"""Errors as data: diagnostics are collected, then reported together.

Every diagnostic says which file, which key (or key pattern), what was expected and what to do. The CLI
prints them without a traceback and exits non-zero; library callers catch :class:`MapgenError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One finding. ``code`` is a stable, greppable identifier (e.g. ``index.missing-shard``)."""

    severity: Severity
    code: str
    message: str
    file: str = ""
    key: str = ""
    expected: str = ""
    hint: str = ""

    def render(self) -> str:
        where = " ".join(part for part in (self.file, f"[{self.key}]" if self.key else "") if part)
        lines = [f"{self.severity}: {self.code}: {self.message}" + (f"  ({where})" if where else "")]
        if self.expected:
            lines.append(f"  expected: {self.expected}")
        if self.hint:
            lines.append(f"  fix: {self.hint}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, str]:
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "file": self.file,
            "key": self.key,
            "expected": self.expected,
            "hint": self.hint,
        }


@dataclass
class MapgenError(Exception):
    """Raised with every diagnostic that made an operation impossible. ``exit_code`` is the CLI's."""

    diagnostics: tuple[Diagnostic, ...]
    exit_code: int = 1
    extra: str = field(default="")

    def __init__(self, diagnostics: Iterable[Diagnostic] | Diagnostic, exit_code: int = 1, extra: str = ""):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = (diagnostics,)
        self.diagnostics = tuple(diagnostics)
        self.exit_code = exit_code
        self.extra = extra
        super().__init__(self.render())

    def render(self) -> str:
        text = "\n".join(d.render() for d in self.diagnostics)
        return f"{text}\n{self.extra}" if self.extra else text

    def __str__(self) -> str:
        return self.render()


def error(code: str, message: str, **kw: str) -> MapgenError:
    """Shorthand for a single-diagnostic error."""
    return MapgenError(Diagnostic("error", code, message, **kw))
