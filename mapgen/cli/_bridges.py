"""``--bridges DIR`` for the commands that load a bridge (convert, export, verify)."""

from __future__ import annotations

import argparse


def add_bridges_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bridges", action="append", default=[], metavar="DIR",
        help="a directory written by `mapgen emit --out DIR`, searched before $MAPGEN_BRIDGES, ./generated, "
        "bridge packages and the bridges mapgen ships (repeatable)",
    )


def use_bridges(args: argparse.Namespace) -> None:
    """Put ``--bridges`` first on the search path (through ``MAPGEN_BRIDGES``, so spawned workers inherit it)."""
    from mapgen.runtime.discovery import use_directories

    use_directories(list(args.bridges))


def add_numerics_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-unproven-numerics", action="store_true",
        help="run a bridge whose `mapgen emit` could not prove logits parity with transformers (no reference "
        "model, e.g. remote-code architectures): names and shapes are proven, numerics are not; recorded in "
        "the output's mapgen.json",
    )
