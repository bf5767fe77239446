"""``mapgen verify SOURCE``: prove a conversion on this checkpoint, bitwise and (where possible) by logits."""

from __future__ import annotations

import argparse
from typing import Any

from mapgen.cli._bridges import add_bridges_arg, use_bridges
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
    p = sub.add_parser("verify", help="round trip HF -> Megatron -> HF bitwise, and logits parity",
                       description="Convert SOURCE to Megatron at the given parallel layout and back in memory; "
                       "check that key set, dtypes, tensors and shard layout are identical; where transformers "
                       "implements the architecture, compare logits on a fixed batch (fp32, max abs <= --atol).")
    p.add_argument("source", help="local HF checkpoint directory")
    p.add_argument("--no-logits", action="store_true", help="skip the logits comparison")
    p.add_argument("--adapter", default=None,
                   help="prove a LoRA adapter (PEFT or Megatron adapter directory) on SOURCE instead: logits of "
                   "transformers+peft, the merged HF checkpoint and megatron-core with the adapter merged from its "
                   "TP/EP pieces agree (--atol); the adapter round trip HF -> Megatron -> HF is bitwise")
    p.add_argument("--atol", type=float, default=1e-4, help="logits tolerance (default 1e-4)")
    add_dtype_arg(p, "dtype of the Megatron model in the round trip")
    add_parallel_args(p)
    add_bridges_arg(p)
    add_config_args(p)
    p.set_defaults(func=run)


def _work(source: str, par: Any, logits: bool, atol: float, dtype: str = "auto") -> dict[str, Any]:
    from mapgen.runtime.verify import verify

    return verify(source, par, logits=logits, atol=atol, dtype=dtype)


def _adapter_work(source: str, adapter: str, par: Any, atol: float) -> dict[str, Any]:
    from mapgen.runtime.adapters import verify_adapter

    return verify_adapter(source, adapter, par, atol=atol)


def _run_adapter(args: argparse.Namespace, par: Any) -> int:
    from mapgen.runtime.adapters import open_base, read_any

    source, binding, _ = open_base(args.source)  # the adapter must fit the base before workers start
    read_any(args.adapter, binding, source)
    results = run_spmd(_adapter_work, par, args.nproc, args.source, args.adapter, par, args.atol)
    if not is_rank0():
        return 0
    r = results[0]
    rt = r["round_trip"]
    ok = not rt["mismatches"]
    forms = ", ".join(f"{n} {f}" for f, n in sorted(rt["forms"].items()))
    print(f"adapter round trip HF -> Megatron [{par.describe()}, {rt['files']} piece files] -> HF: "
          f"{rt['modules']} modules ({rt['megatron_modules']} Megatron adapters: {forms}), "
          + ("bitwise identical (tensors, ranks, alphas, config)" if ok else f"{len(rt['mismatches'])} MISMATCHES"))
    for line in rt["mismatches"][:50]:
        print(f"  {line}")
    if r.get("reference"):
        print(f"logits: skipped: {r['reference']}")
        return 0 if ok else 1
    if r.get("adapter_effect") is not None:
        print(f"the adapter moves transformers' logits by max |Δ| = {r['adapter_effect']:.3g}")
    for what, key in (("merged HF checkpoint (transformers)", "merged_hf"),
                      ("megatron-core, adapter merged per rank", "megatron"),
                      ("megatron-core merged per rank, exported to HF (transformers)", "megatron_export")):
        x = r[key]
        if x.get("skipped"):
            print(f"logits {what} vs transformers+peft: skipped: {x['skipped']}")
            continue
        print(f"logits {what} vs transformers+peft: max |Δ| = {x['max_abs']:.3g} (atol {args.atol}) -> "
              f"{'OK' if x['ok'] else 'FAIL'}")
        ok = ok and bool(x["ok"])
    return 0 if ok else 1


def run(args: argparse.Namespace) -> int:
    use_bridges(args)
    par = parallel_from_args(args)
    gate_checkpoint(args.source, args)  # refused/unknown config fields: say so before any worker starts
    if args.adapter is not None:
        return _run_adapter(args, par)
    world = launcher_world(par, args.nproc)
    if world is not None:  # every check that needs no worker, before workers start or a byte is written
        from mapgen.runtime.api import preflight

        preflight(args.source, par, world)
    results = run_spmd(_work, par, args.nproc, args.source, par, not args.no_logits, args.atol, args.dtype)
    if not is_rank0():
        return 0
    r = results[0]
    ok = not r["mismatches"]
    print(f"round trip [{par.describe()}]: {r['keys']} keys, "
          + ("bitwise identical (keys, dtypes, tensors, shards)" if ok else f"{len(r['mismatches'])} MISMATCHES"))
    for line in r["mismatches"][:50]:
        print(f"  {line}")
    print(f"bridge's numerical proof (mapgen emit): {r['bridge_numerics'] or 'none recorded'}")
    reads = ", ".join(f"rank {x['rank']}: {x['bytes_read'] / 2**20:.2f} MiB" for x in results)
    print(f"bytes read per rank: {reads}")
    logit = r.get("logits")
    if logit is not None:
        status = "skipped: " + logit["skipped"] if logit.get("skipped") else (
            f"max |Δ| = {logit['max_abs']:.3g} (atol {args.atol}) -> {'OK' if logit['ok'] else 'FAIL'}")
        print(f"logits parity vs transformers: {status}")
        ok = ok and (bool(logit.get("skipped")) or bool(logit["ok"]))
    return 0 if ok else 1
