"""``mapgen synth SOURCE OUT``: write a tiny random checkpoint with exactly SOURCE's key layout.

config.json, sharded safetensors and model.safetensors.index.json; written to a temporary directory beside
OUT and renamed into place, so OUT is either absent, the old checkpoint, or the complete new one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mapgen.errors import error
from mapgen.infer import infer
from mapgen.source import read_source
from mapgen.synth import SynthOptions  # no torch at import time

_POSITIVE = ("layers", "experts", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "moe_intermediate",
             "shared_intermediate", "vocab", "shards", "mtp_depth")  # fmt: skip


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "synth",
        help="write a tiny random checkpoint with a source's exact key layout",
        description="Scan SOURCE (directory, .safetensors file or hub id) and write to OUT a tiny random "
        "checkpoint with the same families, expert storage, key names, MTP scheme and towers, shrunk "
        "consistently (config rewritten). Deterministic for a seed.",
    )
    p.add_argument("source", help="checkpoint directory, model.safetensors file, hub id Org/Name[@rev], or a "
                   "layout JSON written by `mapgen scan --json` (e.g. generated/inputs/*.json)")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    d = SynthOptions()
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--layers", type=int, help="decoder layers (default: fewest keeping every layer group, >= 2)")
    p.add_argument("--experts", type=int, default=d.experts, help=f"routed experts per MoE block ({d.experts})")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--intermediate", type=int, default=d.intermediate, help="dense MLP size (Mixtral: experts)")
    p.add_argument("--moe-intermediate", type=int, default=d.moe_intermediate)
    p.add_argument("--shared-intermediate", type=int, default=d.shared_intermediate)
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--mtp-depth", type=int, help="MTP depth (default: the source's)")
    p.add_argument("--shards", type=int, default=d.shards)
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp32", "keep"),
        default=d.dtype,
        help="keep (default): the source's per-key dtype where headers were read, else bf16",
    )
    p.add_argument("--fp8-block", metavar="MxN", type=_tile, default=None,
                   help="for a block-scaled FP8 source (DeepSeek-V3 style weight_scale_inv): the tile of the "
                   "synthesized scales (default: the source's weight_block_size)")
    p.add_argument("--mxfp4", action="store_true",
                   help="store the packed routed experts as MXFP4 (X_blocks + X_scales, the gpt-oss releases' "
                   "layout; --hidden and the experts' width must be multiples of 32); an MXFP4 source is anyway")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def _tile(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):  # noqa: PLR2004 (rows x cols)
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS, e.g. 128x128, got {text!r}")
    return int(parts[0]), int(parts[1])


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from mapgen.synth import synthesize

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise error("synth.out-exists", f"{out} already exists", file=str(out), hint="pass --overwrite to replace it")
    for name in _POSITIVE:
        value = getattr(args, name)
        if value is not None and value < (0 if name == "mtp_depth" else 1):
            raise error("synth.bad-option", f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.source.endswith(".json") and Path(args.source).is_file():
        from mapgen.ir import layout_from_json

        try:
            layout = layout_from_json(Path(args.source).read_text(encoding="utf-8"))
        except (ValueError, KeyError, TypeError) as exc:
            raise error("synth.bad-layout", f"not a layout written by `mapgen scan --json`: {exc}",
                        file=args.source) from None
        tensors = {}
    else:
        source = read_source(args.source)
        layout = infer(source)
        tensors = dict(source.tensors)
    options = SynthOptions(
        seed=args.seed,
        layers=args.layers,
        experts=args.experts,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        intermediate=args.intermediate,
        moe_intermediate=args.moe_intermediate,
        shared_intermediate=args.shared_intermediate,
        vocab=args.vocab,
        mtp_depth=args.mtp_depth,
        shards=args.shards,
        dtype=args.dtype,
        fp8_block=args.fp8_block,
        mxfp4=args.mxfp4,
    )
    result = synthesize(layout, options, tensors=tensors)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; OUT gets ordinary permissions
        (tmp / "config.json").write_text(json.dumps(result.config, indent=2) + "\n", encoding="utf-8", newline="\n")
        for name, shard_tensors in result.shards.items():
            save_file(shard_tensors, str(tmp / name), metadata={"format": "pt"})
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps(result.index, indent=2, sort_keys=True) + "\n", encoding="utf-8", newline="\n"
        )
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_keys = len(result.index["weight_map"])
    print(
        f"wrote {out}: {n_keys} tensors in {len(result.shards)} shard(s), "
        f"{result.index['metadata']['total_size']} bytes; {result.layout.summary.layer_pattern}"
    )
    return 0
