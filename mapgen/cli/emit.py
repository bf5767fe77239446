"""``mapgen emit SOURCE... [--out generated]`` / ``mapgen emit --from-inputs [--out generated]``.

Each SOURCE is a checkpoint (directory, ``.safetensors`` file, hub id ``Org/Name[@rev]``), scanned on the
spot, or a layout JSON file written by ``mapgen scan --json``. Together with the inputs already stored under
``<out>/inputs/``, every input is planned and proven (the bijection on the meta device, then logits parity of
its tiny transformers-written twin through the new bridge, :mod:`mapgen.runtime.numerics`, whose temporary
directory is its own); only if every proof holds is the whole tree rendered
and swapped in atomically (bridge modules, ``__init__.py``, ``SUPPORTED.md``, ``inputs/``). Modules that
no input needs any more disappear. ``--from-inputs`` regenerates from the stored inputs alone; to drop a
checkpoint, delete its ``inputs/<name>.json`` and run that.

Exit codes: 0 written (or already up to date); 1 a source could not be read, planned or proven (nothing
is written).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from mapgen.cli._config import add_config_args, gate
from mapgen.cli._io import read_text, write_tree_atomically
from mapgen.emit.check import compare, tree_files
from mapgen.emit.names import input_name, input_name_for_source
from mapgen.emit.pipeline import PROOFS_PATH, Generation, ProofCache, generate, parse_input, parse_proof_cache
from mapgen.emit.render import INPUTS_DIR, REGISTRY_PATH, module_files
from mapgen.errors import Diagnostic, MapgenError, error
from mapgen.ir import Layout
from mapgen.runtime.discovery import DEFAULT_DIR
from mapgen.runtime.discovery import MARK as GENERATED_MARK


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "emit",
        help="generate (and prove) bridge modules for checkpoints into generated/",
        description="Scan, plan and prove each SOURCE, then regenerate the generated/ tree from all stored "
        "inputs: one bridge module per layout fingerprint, the registry, SUPPORTED.md and the inputs.",
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="checkpoint directory, .safetensors file, hub id Org/Name[@rev], or `mapgen scan --json` file")
    p.add_argument("--from-inputs", action="store_true",
                   help="regenerate from the inputs stored under OUT/inputs/ (no scanning, works offline)")
    p.add_argument("--out", default=DEFAULT_DIR, metavar="DIR", help=f"the generated tree (default: {DEFAULT_DIR})")
    p.add_argument("--name", help="the stored input name for a single SOURCE (default: derived from SOURCE)")
    add_reprove(p)
    add_config_args(p)
    p.set_defaults(func=run)


def add_reprove(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reprove", action="store_true",
                   help=f"re-run every proof (bijection and numerics) instead of trusting {PROOFS_PATH} for "
                   "unchanged inputs")


def fix_command(directory: str) -> str:
    """The exact command that regenerates ``directory`` from its stored inputs."""
    out = "" if directory == DEFAULT_DIR else f" --out {directory}"
    return f"mapgen emit --from-inputs{out}"


def load_stored_inputs(directory: Path) -> dict[str, Layout]:
    """The inputs stored under ``<directory>/inputs/*.json``, by name."""
    folder = directory / INPUTS_DIR
    if not folder.is_dir():
        return {}
    out: dict[str, Layout] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix != ".json" or not path.is_file():
            continue
        name = input_name(path.stem)
        out[name] = parse_input(name, read_text(path))
    return out


def load_source(spec: str, args: argparse.Namespace | None = None) -> Layout:
    """A layout JSON file (``mapgen scan --json``) is read; anything else is scanned. A layout with unclassified
    keys is refused (exit 2, like ``mapgen scan``): its bridge would not cover the checkpoint."""
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        layout = parse_input("", read_text(path))
    else:
        from mapgen.infer import scan

        layout = scan(spec)
    report = gate(layout.config, args or argparse.Namespace(), f"{spec}: config")
    if report.assumed_inert or report.accepted_gaps:  # the stored input records the user's escapes
        layout = dataclasses.replace(layout, config_fields=report.to_json())
    if layout.unclassified:
        raise MapgenError(
            Diagnostic("error", "emit.unclassified", f"{sum(u.count for u in layout.unclassified)} key(s) of {spec} "
                       "fit no family; no bridge is emitted for a partial layout", file=spec,
                       hint="run `mapgen scan` on it; add a recogniser for the family, or fix the checkpoint"),
            exit_code=2,
            extra="unclassified keys:\n" + "\n".join(f"  {u.pattern!r}  ({u.count} keys)" for u in layout.unclassified),
        )
    return layout


def load_proof_cache(directory: Path) -> ProofCache:
    path = directory / PROOFS_PATH
    return parse_proof_cache(read_text(path)) if path.is_file() else ProofCache()


def generate_dir(directory: Path, extra: dict[str, Layout] | None = None, *, reprove: bool = False) -> Generation:
    """emit and check share this: stored inputs (+ new ones) -> plans -> proofs (unless recorded in
    ``proofs.json`` for the same input, plan and versions) -> rendered tree."""
    inputs = load_stored_inputs(directory)
    inputs.update(extra or {})
    return generate(inputs, cache=None if reprove else load_proof_cache(directory))


def _check_target(out: Path, display: str) -> None:
    """Refuse to replace a directory that is not a generated tree (``--out .`` must not wipe a repo)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise error("emit.bad-out", f"{display} is not a directory", file=display)
    entries = [p for p in tree_files(out) if not p.startswith(f"{INPUTS_DIR}/")]
    registry = out / REGISTRY_PATH
    if not entries:
        return
    if registry.is_file() and registry.read_bytes().startswith(GENERATED_MARK.encode()):
        return
    raise error(
        "emit.bad-out",
        f"{display} exists and is not a directory mapgen generated",
        file=display,
        expected=f"an empty directory, or one whose {REGISTRY_PATH} starts with {GENERATED_MARK!r}",
        hint="emit replaces the whole directory; point --out at generated/ or a new directory",
    )


def run(args: argparse.Namespace) -> int:
    if not args.sources and not args.from_inputs:
        raise error("emit.no-sources", "nothing to emit",
                    hint="pass SOURCE... (checkpoints or `mapgen scan --json` files) or --from-inputs")
    if args.name and len(args.sources) != 1:
        raise error("emit.bad-name", "--name needs exactly one SOURCE")
    out = Path(args.out)
    _check_target(out, args.out)

    new: dict[str, Layout] = {}
    for spec in args.sources:
        name = input_name(args.name) if args.name else input_name_for_source(spec)
        if name in new:
            raise error("emit.duplicate-input", f"two sources map to the input name {name}", file=spec,
                        hint="emit them one at a time with --name")
        new[name] = load_source(spec, args)

    gen = generate_dir(out, new, reprove=args.reprove)
    for name in sorted(gen.proofs):
        marker = "  (new)" if name in new else "  (recorded proof)" if name in gen.cached else ""
        print(f"{name}: {gen.plans[name].module_name}: {gen.proofs[name].line}{marker}")
        print(f"  {gen.numerics.get(name, '')}")

    drift = compare(gen.files, out)
    modules = module_files(gen.files)
    if drift.clean:
        print(f"{args.out}: up to date ({len(modules)} bridge module(s))")
        return 0
    write_tree_atomically(out, gen.files, replace_existing=True)
    print(f"wrote {args.out}: {len(modules)} bridge module(s), {len(gen.plans)} input(s)")
    for label, paths in (("added", drift.missing), ("updated", drift.changed), ("removed", drift.orphaned)):
        for path in paths:
            print(f"  {label}: {path}")
    sys.stdout.flush()
    return 0
