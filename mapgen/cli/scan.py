"""``mapgen scan SOURCE [--json PATH] [--headers|--no-headers]``: classify every tensor of a checkpoint.

Exit codes: 0 every key classified; 2 some keys fit no family (listed, grouped by pattern); 1 bad input
(diagnostics on stderr). Never imports torch, megatron-core or transformers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    source = read_source(args.source, headers=args.headers)
    layout = infer(source)
    if args.json == "-":
        sys.stdout.write(layout_to_json(layout))
    elif args.json:
        Path(args.json).write_text(layout_to_json(layout), encoding="utf-8", newline="\n")
    if not args.quiet and args.json != "-":
        print(render_summary(layout, source.origin), end="")
    for d in layout.diagnostics:
        print(f"{d.severity}: {d.code}: {d.message}" + (f"  [{d.key}]" if d.key else ""), file=sys.stderr)
    if layout.unclassified:
        if args.quiet or args.json == "-":
            print(f"error: {layout.summary.unclassified_keys} unclassified key(s):", file=sys.stderr)
            for u in layout.unclassified:
                print(f"  {u.pattern}  ({u.count} keys)", file=sys.stderr)
        return 2
    return 0
