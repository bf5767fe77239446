"""``mapgen scan SOURCE [--json PATH] [--headers|--no-headers]``: classify every tensor of a checkpoint.

Exit codes: 0 every key classified; 2 some keys fit no family (listed, grouped by pattern); 1 bad input
(diagnostics on stderr). Never imports torch, megatron-core or transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from mapgen.cli._config import add_config_args, check
from mapgen.errors import MapgenError
from mapgen.infer import infer, render_summary
from mapgen.ir import layout_to_json
from mapgen.source import read_source


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "scan",
        help="read a checkpoint's metadata and classify every layer family",
        description="Read config.json + the safetensors index (and shard headers where present) of a local "
        "directory, a single .safetensors file, or a hub id Org/Name[@revision]; print a summary.",
    )
    p.add_argument("source", help="checkpoint directory, model.safetensors file, or hub id Org/Name[@rev]")
    p.add_argument("--json", metavar="PATH", help="write the layout IR as JSON to PATH ('-' for stdout)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--headers",
        dest="headers",
        action="store_const",
        const=True,
        default=None,
        help="read shapes from shard headers (hub ids: via the hub's safetensors-metadata API)",
    )
    group.add_argument(
        "--no-headers", dest="headers", action="store_const", const=False, help="never read shard headers"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but diagnostics")
    p.add_argument("--fields", action="store_true", help="list the verdict of every config key, not only the "
                   "refused and unknown ones")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    source = read_source(args.source, headers=args.headers)
    report = check(source.config, args, config_file(source.origin))
    if report.scope_error:  # one line instead of misleading key errors
        raise MapgenError(report.errors)
    layout = dataclasses.replace(infer(source), config_fields=report.to_json())
    if args.json == "-":
        sys.stdout.write(layout_to_json(layout))
    elif args.json:
        Path(args.json).write_text(layout_to_json(layout), encoding="utf-8", newline="\n")
    if not args.quiet and args.json != "-":
        print(render_summary(layout, source.origin), end="")
        print(report.render(verbose=args.fields), end="")
    for d in layout.diagnostics:
        print(f"{d.severity}: {d.code}: {d.message}" + (f"  [{d.key}]" if d.key else ""), file=sys.stderr)
    if layout.unclassified:
        if args.quiet or args.json == "-":
            print(f"error: {layout.summary.unclassified_keys} unclassified key(s):", file=sys.stderr)
            for u in layout.unclassified:
                print(f"  {u.pattern}  ({u.count} keys)", file=sys.stderr)
        return 2
    if report.errors:
        print("\n".join(d.render() for d in report.errors), file=sys.stderr)
        return 1
    return 0


def config_file(origin: str) -> str:
    """Where the config came from, for diagnostics."""
    if origin.endswith(".safetensors"):
        return str(Path(origin).parent / "config.json")
    return f"{origin.rstrip('/')}/config.json"
