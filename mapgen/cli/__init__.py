"""The command line: the only layer that reads arguments, prints, and writes files.

Each sub-command lives in its own module (``mapgen/cli/<name>.py``) exposing ``register(subparsers)``;
``register`` adds the parser and sets ``func`` to a callable ``(args) -> int``. Errors raised as
:class:`mapgen.errors.MapgenError` are printed as diagnostics, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from mapgen import __version__
from mapgen.errors import MapgenError

VERBOSE = "--verbose"
COMMANDS = ("scan", "emit", "check", "synth", "diff", "convert", "export", "verify", "adapter", "merge")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or only ``only`` (so ``mapgen scan`` never imports emit's libcst/jinja2
    or the runtime's torch: a command's module is imported only when that command runs)."""
    parser = argparse.ArgumentParser(
        prog="mapgen",
        description="Code-generating mapping compiler: Hugging Face checkpoints <-> Megatron-Core.",
    )
    parser.add_argument("--version", action="version", version=f"mapgen {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show third-party warnings and load reports (megatron-core, torch.distributed, "
                        "transformers); accepted anywhere on the command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(f"mapgen.cli.{name}")
        except ModuleNotFoundError as exc:  # a command not built yet
            if exc.name != f"mapgen.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


# Set by a command for the workers it spawns (--verbose, --bridges); restored when main returns, so an in-process
# caller (a test, a script) is not left with a search path or verbosity it did not ask for.
COMMAND_ENV = ("MAPGEN_VERBOSE", "MAPGEN_BRIDGES", "CUDA_VISIBLE_DEVICES")


def main(argv: Sequence[str] | None = None) -> int:
    saved = {name: os.environ.get(name) for name in COMMAND_ENV}
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _main(argv: list[str]) -> int:
    if VERBOSE in argv:  # global, anywhere: the workers a command spawns inherit it through the environment
        argv = [a for a in argv if a != VERBOSE]
        os.environ["MAPGEN_VERBOSE"] = "1"
    # The CLI converts in host memory on CPUs (gloo, one process per rank) and never takes a GPU, also on a GPU
    # host: a training job may own them, and N ranks on a host with fewer GPUs would ask CUDA for devices it
    # lacks. Hidden before torch first initialises CUDA; the spawned workers inherit it.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except MapgenError as exc:
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
