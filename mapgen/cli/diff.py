"""``mapgen diff A B``: how two checkpoints' layouts differ, and whether they share one bridge.

A and B are checkpoint directories, ``.safetensors`` files, hub ids, or layout JSON files written by
``mapgen scan --json``. Exit codes, as diff(1): 0 identical layouts, 1 they differ, 2 trouble (diagnostics
on stderr). ``--structure-only`` ignores the dimensions section for the exit code.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mapgen.diff import diff_layouts, render_diff
from mapgen.errors import Diagnostic, MapgenError
from mapgen.infer import infer
from mapgen.ir import Layout, layout_from_json
from mapgen.source import read_source


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "diff",
        help="compare two checkpoints' layouts (structure, then dimensions)",
        description="Scan A and B (paths, hub ids, or layout JSON from `mapgen scan --json`) and print the "
        "structural differences (families, storage, key names, MTP scheme, towers), then the dimensions, "
        "and whether both are served by one bridge. Exit 0 identical, 1 different, 2 trouble.",
    )
    p.add_argument("a", help="checkpoint, hub id, or layout JSON")
    p.add_argument("b", help="checkpoint, hub id, or layout JSON")
    p.add_argument("--structure-only", action="store_true", help="exit 0 when only dimensions differ (same bridge)")
    p.set_defaults(func=run)


def load_layout(spec: str) -> Layout:
    """A layout JSON file (``mapgen scan --json``) or anything ``mapgen scan`` reads."""
    path = Path(spec).expanduser()
    if (
        path.is_file()
        and path.suffix == ".json"
        and path.name != "config.json"
        and not path.name.endswith(".index.json")
    ):
        try:
            return layout_from_json(path.read_text(encoding="utf-8"))
        except (ValueError, KeyError, TypeError) as exc:
            raise MapgenError(
                Diagnostic(
                    "error",
                    "diff.bad-layout-json",
                    f"not a layout JSON written by `mapgen scan --json`: {exc}",
                    file=spec,
                )
            ) from None
    return infer(read_source(spec))


def run(args: argparse.Namespace) -> int:
    try:
        a, b = load_layout(args.a), load_layout(args.b)
    except MapgenError as exc:
        raise MapgenError(exc.diagnostics, exit_code=2, extra=exc.extra) from None
    diff = diff_layouts(a, b)
    print(render_diff(diff, args.a, args.b), end="")
    if args.structure_only:
        return 0 if diff.same_bridge and not diff.structure else 1
    return 0 if diff.identical else 1
