"""Work measured by ``benchmarks/run.py``, each call in a fresh process (``python -m benchmarks._workers``).

Every subcommand prints one JSON line (prefixed ``RESULT``) on rank 0: wall times of the phases, the bytes
read, and each rank's peak RSS (``ru_maxrss`` of that process, KiB). Kept apart from ``run.py`` so that
the peak RSS of a measurement is never inflated by an earlier one in the same process.

    floor-st SRC        safetensors safe_open + get_tensor(...).clone() of every key (the read floor)
    floor-file SRC      plain read() of every shard file in 16 MiB chunks
    mapgen-load SRC --tp N --ep N      mapgen.runtime.api.load_hf (build + fill, no dist checkpoint)
    mapgen-export SRC OUT              load_hf, then export_hf to OUT (in-memory Megatron -> HF only timed)
    mbridge-stock SRC                  mbridge 0.15.1 as documented: AutoBridge + get_model(weight_path=SRC)
    mbridge-load SRC --tp N --ep N     mbridge's load_weights on the same local-spec model mapgen builds
    mbridge-export SRC OUT             mbridge's save_weights from that model
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

CHUNK = 16 * 2**20


def _maxrss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _rss_split() -> dict[str, int]:
    """Current RssAnon / RssFile (bytes): file-backed pages are the mmap'd checkpoint, reclaimable."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                name, value, _ = line.split()
                out[name.rstrip(":")] = int(value) * 1024
    return out


def _shards(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return [src / s for s in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    return [src / "model.safetensors"]


# ---------------------------------------------------------------------------------------------------------
# The floor
# ---------------------------------------------------------------------------------------------------------
def floor_st(src: Path) -> dict[str, Any]:
    import torch  # noqa: F401 -- imported before the clock starts (safe_open imports it lazily)
    from safetensors import safe_open

    start = time.perf_counter()
    nbytes = 0
    largest = 0
    for shard in _shards(src):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 -- safe_open handles are not mappings
                # safetensors >= 0.8 returns a tensor over the mmap: clone() makes the bytes actually
                # come into this process's memory, as a conversion must
                t = f.get_tensor(key).clone()
                size = t.numel() * t.element_size()
                nbytes += size
                largest = max(largest, size)
                del t
    return {"seconds": time.perf_counter() - start, "bytes": nbytes, "largest": largest, "maxrss": [_maxrss_kib()]}


def floor_file(src: Path, part: int = 0, parts: int = 1) -> dict[str, Any]:
    """Plain read() of the shard files (``part`` of ``parts``: every ``parts``-th shard from ``part``)."""
    began = time.time()
    start = time.perf_counter()
    nbytes = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for shard in _shards(src)[part::parts]:
        with open(shard, "rb", buffering=0) as f:
            while n := f.readinto(view):
                nbytes += n
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": nbytes, "maxrss": [_maxrss_kib()], "began": began, "ended": began + seconds}


# ---------------------------------------------------------------------------------------------------------
# mapgen
# ---------------------------------------------------------------------------------------------------------
def _mapgen_load_rank(src: str, tp: int, ep: int, out: str | None) -> dict[str, Any]:
    from mapgen.runtime.api import HFSource, Parallel, export_hf, load_hf, parallel_context

    par = Parallel(tp=tp, ep=ep)
    t0 = time.perf_counter()
    source = HFSource.open(src)
    t1 = time.perf_counter()
    with parallel_context(par):
        t2 = time.perf_counter()
        model, binding, stats = load_hf(source, par)
        t3 = time.perf_counter()
        rss_after_load = _maxrss_kib()
        res: dict[str, Any] = {"rss_split": _rss_split(), "open": t1 - t0, "build_and_fill": t3 - t2,
                               "fill": stats.seconds, "bytes_read": stats.bytes_read, "bytes_written": stats.bytes,
                               "rss_after_load": rss_after_load}
        if out is not None:
            t4 = time.perf_counter()
            export_hf(model, binding, Path(out), target=source.to_meta(), overwrite=True)
            res["export"] = time.perf_counter() - t4
    res["maxrss"] = _maxrss_kib()
    return res


def mapgen_load(src: str, tp: int, ep: int, out: str | None = None) -> dict[str, Any]:
    from mapgen.cli._parallel import run_spmd
    from mapgen.runtime.api import Parallel

    par = Parallel(tp=tp, ep=ep)
    ranks = run_spmd(_mapgen_load_rank, par, None, src, tp, ep, out)
    return _merge(ranks)


def _merge(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key in ranks[0]:
        values = [r[key] for r in ranks]
        merged[key] = (values if key in ("bytes_read", "maxrss", "rss_after_load", "bytes_written", "rss_split")
                       else max(values))
    return merged


# ---------------------------------------------------------------------------------------------------------
# mbridge 0.15.1
# ---------------------------------------------------------------------------------------------------------
def _mbridge_frame(exc: BaseException) -> str:
    """The innermost traceback frame inside mbridge, as ``file:line: code``."""
    tb = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in tb if "mbridge" in f.filename]
    if frames and tb[-1] is not frames[-1]:
        frames.append(tb[-1])
    return " -> ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}: {f.line}" for f in frames[-2:])


def _mbridge_stock_rank(src: str) -> dict[str, Any]:
    """mbridge exactly as its README uses it (with mapgen's CPU shims installed and parallel state set up)."""
    from mapgen.runtime._cpu import install_cpu_shims
    from mapgen.runtime.megatron import init_parallel

    install_cpu_shims()
    init_parallel(tp=1, ep=1)
    try:
        from mbridge import AutoBridge

        bridge = AutoBridge.from_pretrained(src)
        bridge.get_model(weight_path=src)
    except BaseException as exc:  # the point is to record exactly what fails
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:400],
                "where": _mbridge_frame(exc)}
    return {"ok": True}


class _TENamedView:
    """mapgen's local-spec GPTModel seen under the Transformer-Engine parameter names mbridge maps.

    Local spec -> TE spec: ``input_layernorm.weight`` is ``self_attention.linear_qkv.layer_norm_weight``
    (TE fuses the norm into the QKV linear), ``mlp.experts.local_experts.{e}.linear_fc{n}.weight`` is
    ``mlp.experts.linear_fc{n}.weight{e}`` (TEGroupedMLP). The tensors are the model's own (shared storage),
    so mbridge's ``param.copy_`` writes into the model.
    """

    def __init__(self, model: Any) -> None:
        import re

        self.model = model
        self.decoder = model.decoder
        self.names: dict[str, str] = {}
        for local in model.state_dict():
            te = local.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
            te = re.sub(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc\d)\.weight", r"mlp.experts.\2.weight\1", te)
            self.names[te] = local

    def state_dict(self) -> dict[str, Any]:
        sd = self.model.state_dict()
        return {te: sd[local] for te, local in self.names.items()}

    def named_parameters(self) -> Any:
        params = dict(self.model.named_parameters())
        for te, local in self.names.items():
            if local in params:
                yield te, params[local]


def _mbridge_rank(src: str, tp: int, ep: int, out: str | None) -> dict[str, Any]:
    import torch

    from mapgen.runtime._cpu import install_cpu_shims
    from mapgen.runtime.api import HFSource, Parallel, bind, build, parallel_context

    install_cpu_shims()
    par = Parallel(tp=tp, ep=ep)
    source = HFSource.open(src)
    with parallel_context(par):
        from mbridge import AutoBridge

        t0 = time.perf_counter()
        bridge = AutoBridge.from_pretrained(src, dtype=torch.float32)  # mapgen's model is fp32: same work
        model = build(bind(source.layout), par)
        view = _TENamedView(model)
        # what mbridge's own model provider would set: the vocabulary padded as the model's is
        bridge.vocab_size = source.layout.config.get("vocab_size")
        bridge.padded_vocab_size = model.state_dict()["embedding.word_embeddings.weight"].shape[0] * tp
        bridge.make_vocab_size_divisible_by = bridge.padded_vocab_size
        t1 = time.perf_counter()
        bridge.load_weights([view], src)
        t2 = time.perf_counter()
        res: dict[str, Any] = {"build": t1 - t0, "fill": t2 - t1, "rss_after_load": _maxrss_kib(),
                               "rss_split": _rss_split()}
        if out is not None:
            t3 = time.perf_counter()
            bridge.save_weights([view], out)
            res["export"] = time.perf_counter() - t3
    res["maxrss"] = _maxrss_kib()
    return res


def mbridge_run(src: str, tp: int, ep: int, out: str | None = None) -> dict[str, Any]:
    from mapgen.cli._parallel import run_spmd
    from mapgen.runtime.api import Parallel

    return _merge(run_spmd(_mbridge_rank, Parallel(tp=tp, ep=ep), None, src, tp, ep, out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("floor-st", "floor-file", "mapgen-load", "mapgen-export", "mbridge-stock",
                                     "mbridge-load", "mbridge-export"))
    ap.add_argument("src")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--part", type=int, default=0, help="floor-file: read every --parts-th shard from this one")
    ap.add_argument("--parts", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from benchmarks import _workers as w  # spawned ranks must find the functions under this module name

    if args.what == "floor-st":
        res = w.floor_st(Path(args.src))
    elif args.what == "floor-file":
        res = w.floor_file(Path(args.src), args.part, args.parts)
    elif args.what in ("mapgen-load", "mapgen-export"):
        res = w.mapgen_load(args.src, args.tp, args.ep, args.out if args.what == "mapgen-export" else None)
    elif args.what == "mbridge-stock":
        res = w._mbridge_stock_rank(args.src)
    else:
        res = w.mbridge_run(args.src, args.tp, args.ep, args.out if args.what == "mbridge-export" else None)
    print("RESULT " + json.dumps(res), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
