"""``mapgen adapter import|export``: LoRA adapters between Hugging Face PEFT and Megatron(-Bridge).

``import PEFT_DIR OUT --base HF_BASE [--tp --ep --etp --pp]`` writes the Megatron adapter (one safetensors file
per TP/EP piece, Megatron-Bridge names, ``adapter_meta.json``); ``export MEG_ADAPTER OUT --base HF_BASE`` writes
the PEFT directory (``adapter_config.json``, ``adapter_model.safetensors``) peft loads on the base. Both derive
every tensor's mapping from the base bridge's rules (:mod:`mapgen.lora.plan`), check everything before writing,
and write atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mapgen.cli._bridges import add_bridges_arg, use_bridges
from mapgen.cli._io import write_tree_atomically
from mapgen.cli._parallel import minimal_world, parallel_from_args


def register(sub: Any) -> None:
    p = sub.add_parser("adapter", help="LoRA adapters: PEFT <-> Megatron",
                       description="Convert LoRA adapters between Hugging Face PEFT and Megatron-Bridge's layout.")
    inner = p.add_subparsers(dest="adapter_command", metavar="{import,export}")
    inner.required = True
    imp = inner.add_parser("import", help="PEFT adapter -> Megatron adapter at a parallel layout")
    imp.add_argument("adapter", help="PEFT adapter directory")
    imp.add_argument("out", help="output directory (must not exist or be empty)")
    imp.add_argument("--base", required=True, help="the HF base checkpoint the adapter was trained on")
    imp.add_argument("--canonical", action="store_true",
                     help="fused layers keep one adapter per HF module (Megatron-Bridge's canonical LoRA: "
                     "adapter_q/k/v, adapter_gate/up); default: one adapter per fused layer (shared A, or the exact "
                     "rank-expanded block form)")
    imp.add_argument("--format", choices=("mapgen", "bridge"), default="mapgen",
                     help="bridge: Megatron-Bridge's own PEFT checkpoint (torch_dist, adapter tensors only, "
                     "release/ + run_config.yaml), which Megatron-Bridge loads; mapgen (default): mapgen's container "
                     "(adapter_meta.json + per-rank safetensors)")
    grp = imp.add_argument_group("parallel layout")
    grp.add_argument("--tp", type=int, default=1)
    grp.add_argument("--ep", type=int, default=1)
    grp.add_argument("--etp", type=int, default=None)
    grp.add_argument("--pp", type=int, default=1)
    grp.add_argument("--nproc", type=int, default=None, help=argparse.SUPPRESS)
    add_bridges_arg(imp)
    imp.set_defaults(func=run_import)
    exp = inner.add_parser("export", help="Megatron adapter (any layout) -> PEFT adapter")
    exp.add_argument("adapter", help="Megatron adapter directory (from `mapgen adapter import` or the same layout)")
    exp.add_argument("out", help="output directory (must not exist or be empty)")
    exp.add_argument("--base", required=True, help="the HF base checkpoint")
    add_bridges_arg(exp)
    exp.set_defaults(func=run_export)


def run_import(args: argparse.Namespace) -> int:
    from mapgen.lora.plan import import_adapter
    from mapgen.runtime.adapters import megatron_tree, open_base, read_peft

    use_bridges(args)
    par = parallel_from_args(args)
    source, binding, shapes = open_base(args.base)
    peft = read_peft(args.adapter, binding)
    meg = import_adapter(peft, binding.instances, binding.spec, shapes, canonical=args.canonical)
    if args.format == "bridge":
        from mapgen.cli._parallel import run_spmd
        from mapgen.runtime.adapter_dist import save_bridge
        from mapgen.runtime.api import check_parallel

        check_parallel(binding.spec, par, minimal_world(par) if args.nproc is None else args.nproc)
        run_spmd(save_bridge, par, args.nproc, meg, str(args.base), str(args.out), par)
        print(f"adapter import [{par.describe()}]: {len(peft.modules)} PEFT modules -> {len(meg.modules)} Megatron "
              f"adapters -> {args.out} (Megatron-Bridge torch_dist)")
        return 0
    tree = megatron_tree(meg, binding, source, par, minimal_world(par))
    write_tree_atomically(Path(args.out), tree, replace_existing=False)
    forms = sorted({lora.form for lora in meg.modules.values()})
    print(f"adapter import [{par.describe()}]: {len(peft.modules)} PEFT modules -> {len(meg.modules)} Megatron "
          f"adapters ({', '.join(forms)}), {len(tree) - 1} piece files -> {args.out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from mapgen.lora.plan import export_adapter
    from mapgen.runtime.adapters import open_base, peft_tree, read_any, read_megatron

    use_bridges(args)
    source, binding, _ = open_base(args.base)
    from mapgen.runtime.adapter_dist import is_bridge_checkpoint

    if is_bridge_checkpoint(Path(args.adapter)):
        peft, meg = read_any(args.adapter, binding, source)  # Megatron-Bridge's torch_dist, read at TP=1
    else:
        meg = read_megatron(args.adapter, binding, source)
        peft = export_adapter(meg, binding.instances, binding.spec)
    write_tree_atomically(Path(args.out), peft_tree(peft, binding, str(args.base)), replace_existing=False)
    n = len(meg.modules) if meg is not None else 0
    print(f"adapter export: {n} Megatron adapters -> {len(peft.modules)} PEFT modules -> {args.out}")
    return 0
