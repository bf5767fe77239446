"""``mapgen check [--dir generated]``: is the generated tree exactly what its stored inputs produce?

Regenerates in memory from ``<dir>/inputs/*.json`` through the same code path as ``mapgen emit`` (plan,
prove, render) and compares byte for byte. Offline: no checkpoint or weights are read. Rendering is always
redone; the bijection proof of an input is skipped when ``<dir>/proofs.json`` records it for the same input,
plan and mapgen/megatron-core versions (``--reprove`` re-runs every proof; CI does).

Exit codes: 0 identical; 1 drift (changed files with a unified diff, missing and orphaned files, and the
command that fixes it) or the inputs no longer plan/prove.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mapgen.cli.emit import DEFAULT_DIR, add_reprove, fix_command, generate_dir
from mapgen.emit.check import compare
from mapgen.errors import error


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "check",
        help="fail if generated/ differs from what its stored inputs generate",
        description="Regenerate the generated tree in memory from its stored inputs (same code path as "
        "`mapgen emit`) and compare: exit 1 with a diff and the fixing command if anything differs.",
    )
    p.add_argument("--dir", default=DEFAULT_DIR, metavar="DIR", help=f"the generated tree (default: {DEFAULT_DIR})")
    add_reprove(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if not directory.is_dir():
        out = f" --out {args.dir}" if args.dir != DEFAULT_DIR else ""
        raise error("check.no-dir", f"{args.dir} does not exist", file=args.dir,
                    hint=f"generate it with `mapgen emit SOURCE{out}`")
    gen = generate_dir(directory, reprove=args.reprove)
    drift = compare(gen.files, directory)
    if drift.clean:
        proven = len(gen.plans) - len(gen.cached)
        print(f"{args.dir}: up to date ({len(gen.plans)} input(s), {len(gen.files)} file(s); "
              f"{proven} proven now, {len(gen.cached)} by their recorded proof)")
        return 0
    print(drift.render(args.dir, fix_command(args.dir)))
    return 1
