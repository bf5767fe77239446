"""``mapgen export MEGATRON_CKPT OUT``: Megatron-Core distributed checkpoint -> HF checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mapgen.cli._bridges import add_bridges_arg, add_numerics_arg, use_bridges
from mapgen.cli._parallel import (
    add_dtype_arg,
    add_parallel_args,
    is_rank0,
    launcher_world,
    parallel_from_args,
    run_spmd,
)


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="Megatron-Core distributed checkpoint -> HF checkpoint",
                       description="Read a Megatron-Core distributed checkpoint at any parallel layout "
                       "(dist_checkpointing reshards it to the layout given here) and write a HF checkpoint. "
                       "With --source, or with the metadata `mapgen convert` stored, the output reproduces "
                       "the source's key names, dtypes, expert packing and shard files.")
    p.add_argument("ckpt", type=Path, help="Megatron checkpoint directory (written by `mapgen convert`)")
    p.add_argument("out", type=Path, help="output HF directory (must not exist unless --overwrite)")
    p.add_argument("--source", default=None, help="the original HF checkpoint (layout, towers, side files)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once complete)")
    p.add_argument("--in-memory", action="store_true",
                   help="load the whole model at --tp/--ep/--pp and gather it to rank 0 (default: stream; each "
                   "of the --nproc (or TP*PP...) ranks writes its share of the output shards, no model in memory)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what each rank would read, write and hold, the disk needed and an estimate; "
                   "write nothing")
    p.add_argument("--quantize", action="store_true",
                   help="write block-scaled FP8 weights and MXFP4 experts as the --source checkpoint stores them "
                   "(e4m3 with its tiles and scales, uint8 blocks with their E8M0 scales: an unchanged model "
                   "reproduces every source tensor byte for byte); default: "
                   "dequantized, in the source's unquantized dtype")
    add_dtype_arg(p, "dtype of the HF tensors written (auto: the source's, as recorded in mapgen.json)")
    add_parallel_args(p)
    add_bridges_arg(p)
    add_numerics_arg(p)
    p.set_defaults(func=run)


def _work(ckpt: Path, out: Path, par: Any, source: str | None, overwrite: bool,
          dtype: str = "auto", streaming: bool = True, quantize: bool = False,
          allow_unproven: bool = False) -> dict[str, Any]:
    from mapgen.runtime.api import export_megatron

    stats = export_megatron(ckpt, out, par, source_path=source, overwrite=overwrite, dtype=dtype,
                            streaming=streaming, quantize=quantize, allow_unproven_numerics=allow_unproven)
    return {"tensors": stats.tensors, "bytes": stats.bytes, "seconds": stats.seconds}


def _dry(ckpt: Path, par: Any, source: str | None) -> dict[str, Any]:
    from mapgen.runtime.api import dry_run_export

    return dry_run_export(ckpt, par, source_path=source)


def run(args: argparse.Namespace) -> int:
    use_bridges(args)
    par = parallel_from_args(args)
    world = launcher_world(par, args.nproc)
    if world is not None:  # every check that needs no worker, before workers start or a byte is written
        from mapgen.runtime.api import preflight

        preflight(args.source, par, world, out=args.out, overwrite=args.overwrite, ckpt=args.ckpt,
                  numerics=(args.allow_unproven_numerics, "export"))
    if args.dry_run:
        results = run_spmd(_dry, par, args.nproc, args.ckpt, par, args.source)
        if is_rank0():
            from mapgen.cli._dryrun import report as dry_report

            release = args.ckpt / "release" if (args.ckpt / "release").is_dir() else args.ckpt
            dry_report(f"export {args.ckpt} -> {args.out} [streaming, {len(results)} rank(s); items = output shards]",
                   results, release, args.out)
        return 0
    results = run_spmd(_work, par, args.nproc, args.ckpt, args.out, par, args.source, args.overwrite, args.dtype,
                       not args.in_memory, args.quantize, args.allow_unproven_numerics)
    if is_rank0():
        tensors, nbytes = sum(r["tensors"] for r in results), sum(r["bytes"] for r in results)
        how = par.describe() if args.in_memory else f"streaming, {len(results)} rank(s)"
        print(f"exported {args.ckpt} -> {args.out} [{how}]: {tensors} tensors, "
              f"{nbytes / 2**20:.1f} MiB, {max(r['seconds'] for r in results):.2f} s")
    return 0
