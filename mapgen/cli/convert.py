"""``mapgen convert SOURCE OUT``: HF checkpoint -> Megatron-Core distributed checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mapgen.cli._bridges import add_bridges_arg, add_numerics_arg, use_bridges
from mapgen.cli._config import add_config_args, gate_checkpoint
from mapgen.cli._parallel import (
    add_dtype_arg,
    add_parallel_args,
    is_rank0,
    launcher_world,
    parallel_from_args,
    run_spmd,
)


def register(sub: Any) -> None:
    p = sub.add_parser("convert", help="HF checkpoint -> Megatron-Core distributed checkpoint",
                       description="Load a HF checkpoint through its generated bridge at the given parallel "
                       "layout and save a Megatron-Core distributed checkpoint (torch_dist) that Megatron-LM "
                       "loads (OUT/release, OUT/latest_checkpointed_iteration.txt).")
    p.add_argument("source", help="local HF checkpoint directory")
    p.add_argument("out", type=Path, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once complete)")
    p.add_argument("--in-memory", action="store_true",
                   help="build and fill the whole Megatron model, then save it (default: stream entry by entry "
                   "from the HF slices; no model in memory)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what each rank would read, write and hold, the disk needed and an estimate; "
                   "write nothing")
    p.add_argument("--no-fsync", action="store_true",
                   help="streaming: do not fsync the data files (megatron-core's writer does, and so does mapgen by "
                   "default); faster, but the checkpoint is durable only once the kernel has written it back. "
                   "Recorded in OUT/mapgen.json (\"fsync\": false)")
    add_dtype_arg(p, "dtype of the Megatron checkpoint")
    add_parallel_args(p)
    add_bridges_arg(p)
    add_numerics_arg(p)
    add_config_args(p)
    p.set_defaults(func=run)


def _work(source: str, out: Path, par: Any, overwrite: bool, config_check: dict[str, Any] | None,
          dtype: str = "auto", streaming: bool = True, allow_unproven: bool = False,
          fsync: bool = True) -> dict[str, Any]:
    from mapgen.runtime.api import convert

    stats = convert(source, out, par, overwrite=overwrite, config_check=config_check, dtype=dtype,
                    streaming=streaming, allow_unproven_numerics=allow_unproven, fsync=fsync)
    return {"tensors": stats.tensors, "bytes": stats.bytes, "bytes_read": stats.bytes_read, "seconds": stats.seconds}


def _dry(source: str, par: Any, dtype: str) -> dict[str, Any]:
    from mapgen.runtime.api import dry_run_convert

    return dry_run_convert(source, par, dtype=dtype)


def run(args: argparse.Namespace) -> int:
    use_bridges(args)
    par = parallel_from_args(args)
    report = gate_checkpoint(args.source, args)  # refused/unknown config fields: nothing is started or written
    world = launcher_world(par, args.nproc)
    if world is not None:  # every check that needs no worker, before workers start or a byte is written
        from mapgen.runtime.api import preflight

        preflight(args.source, par, world, out=args.out, overwrite=args.overwrite,
                  numerics=(args.allow_unproven_numerics, "convert"))
    if args.dry_run:
        results = run_spmd(_dry, par, args.nproc, args.source, par, args.dtype)
        if is_rank0():
            from mapgen.cli._dryrun import report as dry_report

            dry_report(f"convert {args.source} -> {args.out} [{par.describe()}, streaming]", results,
                   Path(args.source), args.out)
        return 0
    results = run_spmd(_work, par, args.nproc, args.source, args.out, par, args.overwrite,
                       report.to_json() if report is not None else None, args.dtype, not args.in_memory,
                       args.allow_unproven_numerics, not args.no_fsync)
    if is_rank0():
        total = sum(r["tensors"] for r in results)
        nbytes = sum(r["bytes"] for r in results)
        read = ", ".join(f"rank {i}: {r['bytes_read'] / 2**20:.1f} MiB" for i, r in enumerate(results))
        print(f"converted {args.source} -> {args.out} [{par.describe()}]: {total} tensors, "
              f"{nbytes / 2**20:.1f} MiB, {max(r['seconds'] for r in results):.2f} s; read {read}")
    return 0
