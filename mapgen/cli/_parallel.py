"""Shared CLI plumbing for the distributed commands (convert, export, verify).

Under ``torchrun`` (``WORLD_SIZE`` set) the command runs on every rank as launched. As a single process it
starts the smallest world the parallel layout needs (``lcm(TP*PP, EP*ETP*PP)``, or ``--nproc``) as local
gloo workers itself.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallel layout")
    group.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    group.add_argument("--ep", type=int, default=1, help="expert parallel size")
    group.add_argument("--etp", type=int, default=None,
                       help="expert tensor parallel size (default: TP when EP is 1, else 1)")
    group.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    group.add_argument("--nproc", type=int, default=None,
                       help="processes to start when not launched by torchrun (default: the smallest world)")


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # mapgen.runtime.api.DTYPE_CHOICES (no torch here)


def add_dtype_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help=f"{what} (default auto: the source's own dtypes, per tensor)")


def parallel_from_args(args: argparse.Namespace) -> Any:
    from mapgen.errors import error
    from mapgen.runtime.api import Parallel

    for name in ("tp", "ep", "pp", "etp", "nproc"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise error("cli.parallel", f"--{name} must be at least 1 (got {value})")
    return Parallel(tp=args.tp, ep=args.ep, etp=args.etp, pp=args.pp)


def minimal_world(par: Any) -> int:
    return int(par.minimal_world)


def launcher_world(par: Any, nproc: int | None) -> int | None:
    """The world this process will start (``None`` under torchrun, where every rank checks for itself)."""
    if "WORLD_SIZE" in os.environ:
        return None
    return nproc or minimal_world(par)


def run_spmd(fn: Callable[..., Any], par: Any, nproc: int | None, *args: Any) -> list[Any]:
    """Run ``fn(*args)`` on every rank; returns per-rank results (just rank 0's under torchrun)."""
    if "WORLD_SIZE" in os.environ:
        return [fn(*args)]
    world = nproc or minimal_world(par)
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        return [fn(*args)]
    from mapgen.runtime.api import spawn

    return spawn(fn, world, *args)


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"
