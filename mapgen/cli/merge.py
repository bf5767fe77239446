"""``mapgen merge --adapter PEFT_DIR|MEG_ADAPTER --base HF_BASE OUT [--megatron --tp ...]``: a merged model.

The HF merged checkpoint has the base's exact layout (names, dtypes, shard files, index, side files) with
``W + alpha/r * B @ A`` computed in fp32 and cast once; ``--megatron`` converts that merged checkpoint to a
Megatron-Core dist checkpoint at the given layout (``mapgen convert`` of the merged model).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mapgen.cli._bridges import add_bridges_arg, use_bridges
from mapgen.cli._io import write_tree_atomically
from mapgen.cli._parallel import add_parallel_args, parallel_from_args


def register(sub: Any) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base (HF, or a Megatron dist checkpoint)")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory or Megatron adapter directory")
    p.add_argument("--base", required=True, help="the HF base checkpoint")
    p.add_argument("--megatron", action="store_true", help="write a Megatron-Core dist checkpoint instead")
    add_parallel_args(p)
    add_bridges_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mapgen.runtime.adapters import merged_hf_tree, open_base, read_any

    use_bridges(args)
    par = parallel_from_args(args)
    source, binding, _ = open_base(args.base)
    peft, _meg = read_any(args.adapter, binding, source)
    tree = merged_hf_tree(source, peft)
    if not args.megatron:
        write_tree_atomically(Path(args.out), tree, replace_existing=False)
        print(f"merged {len(peft.modules)} adapted weights into {args.base} -> {args.out}")
        return 0
    from mapgen.cli import build_parser

    out = Path(args.out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".mapgen-merge-", dir=out.parent))
    try:
        write_tree_atomically(scratch / "hf", tree, replace_existing=False)
        argv = ["convert", str(scratch / "hf"), str(out), "--tp", str(par.tp), "--ep", str(par.ep), "--pp",
                str(par.pp), *(["--etp", str(par.etp)] if par.etp is not None else []),
                *(["--nproc", str(args.nproc)] if args.nproc is not None else [])]
        ns = build_parser("convert").parse_args(argv)
        return int(ns.func(ns))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
