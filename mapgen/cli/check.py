"""``mapgen check [--dir generated]``: is the generated tree exactly what its stored inputs produce?

Regenerates in memory from ``<dir>/inputs/*.json`` through the same code path as ``mapgen emit`` (plan,
prove, render) and compares byte for byte. Offline: no checkpoint or weights are read. Rendering is always
redone; the bijection and numerical proofs of an input are skipped when ``<dir>/proofs.json`` records them for
the same input, plan and mapgen/megatron-core/transformers versions (no torch is imported then);
``--reprove`` re-runs every proof, the tiny twins' logits parity included (CI does).

Exit codes: 0 identical; 1 drift (changed files with a unified diff, missing and orphaned files, and the
command that fixes it) or the inputs no longer plan/prove.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mapgen.cli.emit import add_reprove, fix_command, generate_dir
from mapgen.emit.check import compare
from mapgen.errors import MapgenError, error
from mapgen.runtime.discovery import DEFAULT_DIR, ENV_VAR, directory_locations, read_registry


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "check",
        help="fail if generated/ differs from what its stored inputs generate",
        description="Regenerate the generated tree in memory from its stored inputs (same code path as "
        "`mapgen emit`) and compare: exit 1 with a diff and the fixing command if anything differs.",
    )
    p.add_argument("--dir", "--bridges", dest="dirs", action="append", default=[], metavar="DIR",
                   help=f"a generated tree (repeatable; default: the directories in ${ENV_VAR}, then "
                   f"./{DEFAULT_DIR} -- the directories convert/export/verify search)")
    add_reprove(p)
    p.set_defaults(func=run)


def _directories(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(display name, path) of every tree to check: ``--dir`` as given, else the search path's directories
    that hold a mapgen registry."""
    if args.dirs:
        out = []
        for d in args.dirs:
            if not Path(d).is_dir():
                flag = f" --out {d}" if d != DEFAULT_DIR else ""
                raise error("check.no-dir", f"{d} does not exist", file=d,
                            hint=f"generate it with `mapgen emit SOURCE{flag}`")
            out.append((d, Path(d)))
        return out
    looked: list[str] = []
    found: list[tuple[str, Path]] = []
    for loc in directory_locations():
        reg = read_registry(loc)
        looked.append(f"  {loc.describe()}: {reg.status}")
        if reg.directory is not None and all(p.resolve() != reg.directory for _, p in found):
            found.append((DEFAULT_DIR if loc.origin == f"./{DEFAULT_DIR}" else loc.target, Path(loc.target)))
    if not found:
        raise MapgenError(
            error("check.no-dir", "no generated tree to check",
                  hint="generate one with `mapgen emit SOURCE [--out DIR]`, or pass --dir DIR").diagnostics,
            extra="searched, in order:\n" + "\n".join(looked),
        )
    return found


def run(args: argparse.Namespace) -> int:
    code = 0
    for display, directory in _directories(args):
        gen = generate_dir(directory, reprove=args.reprove)
        drift = compare(gen.files, directory)
        if drift.clean:
            proven = len(gen.plans) - len(gen.cached)
            print(f"{display}: up to date ({len(gen.plans)} input(s), {len(gen.files)} file(s); "
                  f"{proven} proven now, {len(gen.cached)} by their recorded proof)")
            continue
        print(drift.render(display, fix_command(display)))
        code = 1
    return code
