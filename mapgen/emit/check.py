"""Drift detection: compare a rendered tree with a directory on disk. Reads, never writes.

``compare(expected, actual_dir) -> Drift`` lists files whose bytes differ (with a unified diff), files
that should exist and do not, and files that exist but nothing renders any more (orphans). Caches that
tools drop into ``generated/`` (``__pycache__``, ``.mypy_cache``...) are not part of the tree.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Directory names and file suffixes that belong to tools, not to the generated tree.
IGNORED_DIRS = frozenset({"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"})
IGNORED_SUFFIXES = (".pyc", ".pyo")
IGNORED_FILES = frozenset({".DS_Store"})


def _as_bytes(content: str | bytes) -> bytes:
    return content.encode("utf-8") if isinstance(content, str) else content


def _as_text(content: bytes) -> str:
    return content.decode("utf-8", errors="replace")


def tree_files(root: Path) -> Iterator[str]:
    """Relative POSIX paths of the files under ``root`` that belong to a generated tree, sorted."""
    if not root.is_dir():
        return
    found: list[str] = []
    stack = [root]
    while stack:
        current = stack.pop()
        for entry in current.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                if entry.name not in IGNORED_DIRS:
                    stack.append(entry)
            elif entry.name not in IGNORED_FILES and not entry.name.endswith(IGNORED_SUFFIXES):
                found.append(entry.relative_to(root).as_posix())
    yield from sorted(found)


@dataclass(frozen=True)
class Drift:
    """How a directory differs from what rendering produces. Paths are relative, sorted."""

    changed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    orphaned: tuple[str, ...] = ()
    diffs: Mapping[str, str] = field(default_factory=dict)  # changed path -> unified diff (on disk -> expected)

    @property
    def clean(self) -> bool:
        return not (self.changed or self.missing or self.orphaned)

    def render(self, directory: str, fix: str, *,
               note: str = "Files under generated/ are never edited by hand. To regenerate them, run:") -> str:
        """The report ``mapgen check`` prints: a summary, every diff, and the command that fixes it."""
        if self.clean:
            return f"{directory}: up to date"
        lines = [f"{directory} is out of date with its inputs:"]
        lines += [f"  changed:  {p}" for p in self.changed]
        lines += [f"  missing:  {p}" for p in self.missing]
        lines += [f"  orphaned: {p}  (no input renders it any more)" for p in self.orphaned]
        for path in self.changed:
            lines += ["", self.diffs[path].rstrip("\n")]
        lines += ["", note, f"  {fix}"]
        return "\n".join(lines)


def diff_text(path: str, actual: bytes, expected: bytes) -> str:
    """A unified diff from the file on disk to the expected file; notes line-ending-only changes."""
    old, new = _as_text(actual), _as_text(expected)
    if old.replace("\r\n", "\n") == new.replace("\r\n", "\n"):
        return f"--- {path} (on disk)\n+++ {path} (expected)\n(only line endings differ: expected LF)\n"
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=f"{path} (on disk)",
            tofile=f"{path} (expected)",
            n=3,
        )
    ) + ("" if new.endswith("\n") and old.endswith("\n") else "\n")


def compare(expected: Mapping[str, str | bytes], actual_dir: Path) -> Drift:
    """Compare the rendered tree ``expected`` (``{relative_path: content}``) with ``actual_dir``."""
    actual_dir = Path(actual_dir)
    present = set(tree_files(actual_dir))
    changed, missing, diffs = [], [], {}
    for path in sorted(expected):
        if path not in present:
            missing.append(path)
            continue
        want = _as_bytes(expected[path])
        have = (actual_dir / path).read_bytes()
        if have != want:
            changed.append(path)
            diffs[path] = diff_text(path, have, want)
    orphaned = sorted(present - set(expected))
    return Drift(tuple(changed), tuple(missing), tuple(orphaned), diffs)
