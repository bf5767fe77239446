"""Streaming convert vs the in-memory path, whole CLI processes, side by side in one run; writes its section
of ``benchmarks/RESULTS.md`` and ``benchmarks/results_stream.json``.

    .venv/bin/python -m benchmarks.stream                      # 0.25, 1 and 2.5 GiB (about 15 minutes here)
    .venv/bin/python -m benchmarks.stream --sizes 16 --big   # the 16 GiB case (~36 GiB disk; deletes its source)
    .venv/bin/python -m benchmarks.stream --scaling          # 1, 2, 4, 8 ranks on a ~4 GiB checkpoint (16 cores)

Per size (synthetic bf16 Qwen3-MoE from ``mapgen synth``, shapes in ``benchmarks.run.SIZES`` plus the ones
below), alternating the kinds within each repetition, medians:

* floors: plain ``read()`` of the shard files (``benchmarks._workers floor-file``) and ``cp -r`` of the
  checkpoint directory, both whole processes, warm page cache;
* ``mapgen convert`` (streaming, the default), ``mapgen convert --no-fsync`` (the same without fsyncing the
  data files) and ``mapgen convert --in-memory`` at TP=1: wall time, the conversion work the CLI reports,
  peak RSS (``ru_maxrss`` of the process tree: its largest process);
* ``mapgen export`` (streaming, one rank) of the streamed checkpoint, checked bitwise against the
  source once;
* at 1 GiB: streaming convert at TP=2 and at EP=2 (two processes on two cores).

``--scaling`` (for a machine with >= 8 free cores; ``--scaling-gib``, ``--ranks``): one synthesized bf16
Qwen3-MoE (8 experts, 8 KV heads) of ``--scaling-gib`` GiB, the plain-read and ``cp -r`` floors, the streaming
convert at 1 rank and at N ranks with TP=N for the dense part and EP=N (ETP=1) for the experts (each rank
writes about 1/N of the checkpoint; EP alone would leave every dense tensor to rank 0), and the export of the
TP=1 checkpoint on N processes (checked bitwise against the source once). Peak disk: about 3x the checkpoint.

The in-memory rows and the export are skipped above ``--memory-limit`` GiB of checkpoint (default 1.5): the
machine is shared and they hold the whole model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.run import REPO, SIZES, GiB, med, run, worker

RESULTS = REPO / "benchmarks" / "RESULTS.md"
RAW = REPO / "benchmarks" / "results_stream.json"
RAW_BIG = REPO / "benchmarks" / "results_stream_big.json"
BEGIN = "<!-- benchmarks/stream.py: begin (generated; edit stream.py, not this section) -->"
END = "<!-- benchmarks/stream.py: end -->"

STREAM_SIZES: dict[str, dict[str, int]] = {
    **{k: v for k, v in SIZES.items() if k in ("0.25", "1")},
    "2.5": {**SIZES["1"], "layers": 14, "shards": 5},
    "16": {**SIZES["1"], "layers": 98, "shards": 32},
}


def synth(size: str, root: Path, shape: dict[str, int] | None = None, name: str = "") -> Path:
    """The synthesized bf16 Qwen3-MoE ``qwen3-moe-{name}{size}g`` in ``root`` (made once) of ``shape``
    (default: ``STREAM_SIZES[size]``)."""
    tiny = root / "tiny"
    if not (tiny / "qwen3-moe").is_dir():
        run([sys.executable, "-m", "tests.tiny", str(tiny)])
    out = root / f"qwen3-moe-{name}{size}g"
    if not out.is_dir():
        args = [a for k, v in (shape or STREAM_SIZES[size]).items() for a in (f"--{k}", str(v))]
        run([sys.executable, "-m", "mapgen", "synth", str(tiny / "qwen3-moe"), str(out), *args])
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def convert(src: Path, out: Path, *flags: str) -> tuple[float, int, float]:
    wall, rss, text = run([sys.executable, "-m", "mapgen", "convert", str(src), str(out), "--overwrite", *flags])
    work = re.search(r", ([\d.]+) s; read", text)
    return wall, rss, float(work.group(1)) if work else float("nan")


def bench(size: str, src: Path, root: Path, runs: int, memory: bool, log: Any) -> dict[str, Any]:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    r: dict[str, Any] = {"bytes": int(index["metadata"]["total_size"]), "tensors": len(index["weight_map"]),
                         "runs": runs, "memory": memory}
    worker("floor-file", str(src))  # warm the page cache, untimed
    rows: dict[str, list[Any]] = {k: [] for k in ("floor", "cp", "stream", "nosync", "memory", "export",
                                                   "export_memory")}
    out_s, out_m, cp_dir = root / f"mc-{size}-stream", root / f"mc-{size}-memory", root / f"cp-{size}"
    for i in range(runs):
        rows["floor"].append(worker("floor-file", str(src))[2]["seconds"])
        shutil.rmtree(cp_dir, ignore_errors=True)
        rows["cp"].append(run(["cp", "-r", str(src), str(cp_dir)])[0])
        shutil.rmtree(cp_dir, ignore_errors=True)
        rows["stream"].append(convert(src, out_s))
        rows["nosync"].append(convert(src, out_s, "--no-fsync"))
        if memory:
            rows["memory"].append(convert(src, out_m, "--in-memory"))
            back = root / f"hf-{size}"
            rows["export_memory"].append(export(out_s, back, "--in-memory"))
            rows["export"].append(export(out_s, back))
            if i == 0:
                from mapgen.runtime.api import compare_checkpoints

                rt = compare_checkpoints(src, back)
                r["export_bitwise"] = rt.ok
                r["export_mismatches"] = rt.mismatches[:5]
            shutil.rmtree(back, ignore_errors=True)
        log(f"{size} GiB run {i + 1}: floor {rows['floor'][-1]:.2f} s, cp {rows['cp'][-1]:.2f} s, "
            f"stream {rows['stream'][-1][0]:.2f} s / {rows['stream'][-1][1] / GiB:.2f} GiB"
            + (f", in-memory {rows['memory'][-1][0]:.2f} s / {rows['memory'][-1][1] / GiB:.2f} GiB" if memory else ""))
    r["disk_stream"] = dir_bytes(out_s / "release")
    r["rows"] = rows
    shutil.rmtree(out_m, ignore_errors=True)
    shutil.rmtree(out_s, ignore_errors=True)
    return r


def bench_parallel(src: Path, root: Path, runs: int, log: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, flags in (("tp2", ["--tp", "2"]), ("ep2", ["--ep", "2", "--etp", "1"])):
        out[name] = [convert(src, root / f"mc-{name}", *flags) for _ in range(runs)]
        shutil.rmtree(root / f"mc-{name}", ignore_errors=True)
        log(f"{name}: {med([x[0] for x in out[name]]):.2f} s, {max(x[1] for x in out[name]) / GiB:.2f} GiB")
    return out


def _rate(nbytes: int, secs: float) -> str:
    return f"{secs:.2f} s ({nbytes / GiB / secs:.2f} GiB/s)"


def render(meta: dict[str, Any], sizes: dict[str, dict[str, Any]], par: dict[str, Any] | None) -> str:
    L = [BEGIN, "", f"### Streaming convert vs in-memory (`benchmarks/stream.py`, measured {meta['date']})", "",
         f"{meta['duration_min']:.1f} min on {meta['cpus']} CPUs, Python {meta['python']}, load average "
         f"{meta['load']:.1f} at the end; whole processes, medians, page cache warm. Throughput is HF checkpoint "
         "bytes per second of wall time. The dist checkpoint is in the source dtype (bf16) now.", ""]
    names = list(sizes)
    L.append("| | " + " | ".join(f"{n} GiB" for n in names) + " |")
    L.append("|---|" + "---|" * len(names))

    def row(label: str, fn: Any) -> None:
        L.append(f"| {label} | " + " | ".join(fn(sizes[n]) for n in names) + " |")

    row("checkpoint", lambda s: f"{s['bytes'] / GiB:.2f} GiB, {s['tensors']} tensors, runs {s['runs']}")
    row("floor: plain read()", lambda s: _rate(s["bytes"], med(s["rows"]["floor"])))
    row("floor: `cp -r`", lambda s: _rate(s["bytes"], med(s["rows"]["cp"])))
    row("**`mapgen convert` (streaming), whole CLI**",
        lambda s: "**" + _rate(s["bytes"], med([x[0] for x in s["rows"]["stream"]])) + "**")
    row("  its conversion work (reported by the CLI)",
        lambda s: _rate(s["bytes"], med([x[2] for x in s["rows"]["stream"]])))
    row("**streaming work / plain-read floor**",
        lambda s: f"**{med(s['rows']['floor']) / med([x[2] for x in s['rows']['stream']]):.2f}x**")
    row("  `--no-fsync`: whole CLI / its work",
        lambda s: (f"{_rate(s['bytes'], med([x[0] for x in s['rows']['nosync']]))} / "
                   f"{_rate(s['bytes'], med([x[2] for x in s['rows']['nosync']]))}")
        if s["rows"].get("nosync") else "not run")
    row("**`--no-fsync` work / plain-read floor**",
        lambda s: (f"**{med(s['rows']['floor']) / med([x[2] for x in s['rows']['nosync']]):.2f}x**"
                   if s["rows"].get("nosync") else "not run"))
    row("whole CLI / `cp -r`", lambda s: f"{med([x[0] for x in s['rows']['stream']]) / med(s['rows']['cp']):.2f}x")
    row("whole CLI / its conversion work",
        lambda s: f"{med([x[0] for x in s['rows']['stream']]) / med([x[2] for x in s['rows']['stream']]):.2f}x")
    row("**peak RSS, streaming**", lambda s: f"**{max(x[1] for x in s['rows']['stream']) / GiB:.2f} GiB**")
    row("`mapgen convert --in-memory`, whole CLI",
        lambda s: _rate(s["bytes"], med([x[0] for x in s["rows"]["memory"]])) if s["memory"] else "not run")
    row("peak RSS, in-memory",
        lambda s: f"{max(x[1] for x in s['rows']['memory']) / GiB:.2f} GiB" if s["memory"] else "not run")
    row("dist checkpoint on disk / HF bytes", lambda s: f"{s['disk_stream'] / s['bytes']:.3f}")
    row("**`mapgen export` (streaming), whole CLI / its work**",
        lambda s: (f"**{_rate(s['bytes'], med([x[0] for x in s['rows']['export']]))}** / "
                   f"{_rate(s['bytes'], med([x[2] for x in s['rows']['export']]))}") if s["memory"] else "not run")
    row("**streaming export work / plain-read floor**",
        lambda s: f"**{med(s['rows']['floor']) / med([x[2] for x in s['rows']['export']]):.2f}x**"
        if s["memory"] else "not run")
    row("`mapgen export --in-memory`, whole CLI / its work",
        lambda s: (f"{_rate(s['bytes'], med([x[0] for x in s['rows']['export_memory']]))} / "
                   f"{_rate(s['bytes'], med([x[2] for x in s['rows']['export_memory']]))}")
        if s["memory"] and s["rows"].get("export_memory") else "not run")
    row("export peak RSS, streaming / in-memory; bitwise vs source",
        lambda s: (f"{max(x[1] for x in s['rows']['export']) / GiB:.2f} GiB / "
                   f"{max(x[1] for x in s['rows']['export_memory']) / GiB:.2f} GiB; "
                   f"{'yes' if s.get('export_bitwise') else 'NO'}") if s["memory"] else "not run")
    if par:
        L += ["", "Streaming convert of the 1 GiB checkpoint on two processes (whole CLI, medians):", "",
              "| layout | wall | work | peak RSS (largest process) |", "|---|---|---|---|"]
        for name, xs in par.items():
            L.append(f"| {name.upper()} | {med([x[0] for x in xs]):.2f} s | {med([x[2] for x in xs]):.2f} s | "
                     f"{max(x[1] for x in xs) / GiB:.2f} GiB |")
    L += ["", END]
    return "\n".join(L) + "\n"


def write(section: str, begin: str = BEGIN, end: str = END) -> None:
    text = RESULTS.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def digests(root: Path) -> dict[str, str]:
    """dtype, shape and blake2b of every tensor of an HF checkpoint, read one tensor at a time."""
    import hashlib

    import torch

    from mapgen.runtime.hfio import SafetensorsReader, read_weight_map

    weight_map, _ = read_weight_map(root)
    reader = SafetensorsReader(root, weight_map)
    out = {}
    try:
        for key in sorted(weight_map, key=lambda k: (weight_map[k], k)):
            t = reader.read(key)
            data = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
            out[key] = f"{t.dtype}{tuple(t.shape)}:{hashlib.blake2b(data).hexdigest()}"
    finally:
        reader.close()
    return out


def largest_tensor(root: Path) -> int:
    from mapgen.runtime.hfio import SafetensorsReader, read_weight_map

    weight_map, _ = read_weight_map(root)
    reader = SafetensorsReader(root, weight_map)
    try:
        return max(math.prod(reader.shape(k)) * reader.dtype(k).itemsize for k in weight_map)
    finally:
        reader.close()


def bench_big(size: str, src: Path, root: Path, log: Any) -> dict[str, Any]:
    """One run of the big case, ordered so that at most two checkpoints are on disk at once: floor, ``cp -r``
    (deleted), streaming convert at TP=1 (deleted) and at EP=2 (kept), then the source's tensor digests, the
    source deleted, the EP=2 checkpoint exported on two processes and its digests compared."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    r: dict[str, Any] = {"bytes": int(index["metadata"]["total_size"]), "tensors": len(index["weight_map"]),
                         "largest": largest_tensor(src)}
    r["floor"] = worker("floor-file", str(src))[2]["seconds"]
    cp_dir = root / f"cp-{size}"
    r["cp"] = run(["cp", "-r", str(src), str(cp_dir)])[0]
    shutil.rmtree(cp_dir, ignore_errors=True)
    log(f"{size} GiB: floor {r['floor']:.1f} s, cp {r['cp']:.1f} s")
    out = root / f"mc-{size}"
    r["tp1"] = convert(src, out)
    r["disk_tp1"] = dir_bytes(out / "release")
    shutil.rmtree(out, ignore_errors=True)
    log(f"TP=1: {r['tp1'][0]:.1f} s, work {r['tp1'][2]:.1f} s, {r['tp1'][1] / GiB:.2f} GiB")
    r["ep2"] = convert(src, out, "--ep", "2", "--etp", "1")
    r["disk_ep2"] = dir_bytes(out / "release")
    log(f"EP=2: {r['ep2'][0]:.1f} s, work {r['ep2'][2]:.1f} s, {r['ep2'][1] / GiB:.2f} GiB")
    want = digests(src)
    shutil.rmtree(src)  # room for the export: the source is known by its digests now
    back = root / f"hf-{size}"
    wall, rss, text = run([sys.executable, "-m", "mapgen", "export", str(out), str(back), "--overwrite",
                           "--nproc", "2"])
    work = re.search(r", ([\d.]+) s\s*$", text.strip())
    r["export"] = (wall, rss, float(work.group(1)) if work else float("nan"))
    got = digests(back)
    r["export_bitwise"] = got == want
    r["export_mismatches"] = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))[:5]
    shutil.rmtree(back, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    log(f"export (2 processes): {wall:.1f} s, {rss / GiB:.2f} GiB, bitwise {r['export_bitwise']}")
    return r


SCALING_BEGIN = "<!-- benchmarks/stream.py --scaling: begin (generated) -->"
SCALING_END = "<!-- benchmarks/stream.py --scaling: end -->"
RAW_SCALING = REPO / "benchmarks" / "results_stream_scaling.json"
# The scaling checkpoint: a bf16 Qwen3-MoE with 8 experts and 8 KV heads, so that TP and EP both go to 8;
# the number of layers sets its size (about 176 MiB per layer at hidden 2048, 5.2 MiB at hidden 256).
SCALING_SHAPES = {
    "big": {"hidden": 2048, "heads": 16, "kv-heads": 8, "head-dim": 128, "experts": 8, "moe-intermediate": 1536,
            "intermediate": 1536, "vocab": 32000},
    "small": {"hidden": 256, "heads": 16, "kv-heads": 8, "head-dim": 16, "experts": 8, "moe-intermediate": 256,
              "intermediate": 256, "vocab": 4096},
}


def scaling_shape(gib: float) -> dict[str, int]:
    """The synth arguments of a scaling checkpoint of about ``gib`` GiB: layers fill what the embeddings
    leave, shards of about 0.5 GiB."""
    shape = dict(SCALING_SHAPES["big" if gib >= 1 else "small"])
    h, d = shape["hidden"], shape["head-dim"]
    attn = 2 * h * shape["heads"] * d + 2 * h * shape["kv-heads"] * d
    layer = 2 * (attn + 3 * shape["experts"] * h * shape["moe-intermediate"] + shape["experts"] * h)
    embed = 2 * 2 * shape["vocab"] * h
    shape["layers"] = max(2, round((gib * GiB - embed) / layer))
    shape["shards"] = max(2, math.ceil(gib * 2))
    return shape


def export(ckpt: Path, out: Path, *flags: str) -> tuple[float, int, float]:
    wall, rss, text = run([sys.executable, "-m", "mapgen", "export", str(ckpt), str(out), "--overwrite", *flags])
    work = re.search(r", ([\d.]+) s\s*$", text.strip())
    return wall, rss, float(work.group(1)) if work else float("nan")


def scaling_layout(n: int) -> list[str]:
    """The layout at ``n`` ranks: TP=n for the dense part (attention, embeddings, output layer) and EP=n
    for the experts (ETP=1), so that every rank writes about 1/n of the checkpoint (at EP=n alone, rank 0
    would write every dense tensor)."""
    return [] if n == 1 else ["--tp", str(n), "--ep", str(n), "--etp", "1"]


def parallel_floor(src: Path, n: int) -> float:
    """Plain read() of the checkpoint by ``n`` processes at once, each its share of the shard files: from
    the first start to the last end (process start-up excluded)."""
    cmd = [sys.executable, "-m", "benchmarks._workers", "floor-file", str(src), "--parts", str(n)]
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(n)]
        procs = [subprocess.Popen([*cmd, "--part", str(i)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
                 for i, out in enumerate(outs)]
        if any(p.wait() for p in procs):
            raise RuntimeError(f"{' '.join(cmd)} failed")
        res = []
        for out in outs:
            out.seek(0)
            line = next(ln for ln in reversed(out.read().splitlines()) if ln.startswith("RESULT "))
            res.append(json.loads(line[len("RESULT "):]))
    return float(max(r["ended"] for r in res) - min(r["began"] for r in res))


def bench_scaling(src: Path, root: Path, ranks: list[int], runs: int, log: Any) -> dict[str, Any]:
    """Plain-read floor, then per rank count: streaming convert at :func:`scaling_layout`, and the export of
    the TP=1 checkpoint on that many processes; whole CLI (wall, peak RSS of the largest process) and the
    work the CLI reports; medians of ``runs``."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    r: dict[str, Any] = {"bytes": int(index["metadata"]["total_size"]), "tensors": len(index["weight_map"]),
                         "runs": runs, "ranks": ranks, "convert": {}, "export": {}}
    worker("floor-file", str(src))  # warm the page cache, untimed
    r["floor"] = med([worker("floor-file", str(src))[2]["seconds"] for _ in range(runs)])
    r["floor_n"] = {n: med([parallel_floor(src, n) for _ in range(runs)]) for n in ranks if n > 1}
    cp_dir = root / "cp-scaling"
    cps = []
    for _ in range(runs):
        shutil.rmtree(cp_dir, ignore_errors=True)
        cps.append(run(["cp", "-r", str(src), str(cp_dir)])[0])
    shutil.rmtree(cp_dir, ignore_errors=True)
    r["cp"] = med(cps)
    log(f"floor {r['floor']:.2f} s, cp -r {r['cp']:.2f} s")
    ckpt, back = root / "mc-scaling", root / "hf-scaling"
    for n in ranks:
        out = root / f"mc-scaling-{n}"
        xs = [convert(src, out, *scaling_layout(n)) for _ in range(runs)]
        r["convert"][n] = [med([x[i] for x in xs]) for i in (0, 2)] + [max(x[1] for x in xs)]
        if n == 1:
            shutil.rmtree(ckpt, ignore_errors=True)
            out.rename(ckpt)
        shutil.rmtree(out, ignore_errors=True)
        log(f"convert at {n} rank(s): {r['convert'][n][0]:.2f} s, work {r['convert'][n][1]:.2f} s")
    for n in ranks:
        xs = [export(ckpt, back, "--nproc", str(n)) for _ in range(runs)]
        r["export"][n] = [med([x[i] for x in xs]) for i in (0, 2)] + [max(x[1] for x in xs)]
        if n == ranks[0]:
            from mapgen.runtime.api import compare_checkpoints

            rt = compare_checkpoints(src, back)
            r["export_bitwise"], r["export_mismatches"] = rt.ok, rt.mismatches[:5]
        shutil.rmtree(back, ignore_errors=True)
        log(f"export on {n} process(es): {r['export'][n][0]:.2f} s, work {r['export'][n][1]:.2f} s")
    shutil.rmtree(ckpt, ignore_errors=True)
    return r


def render_scaling(meta: dict[str, Any], r: dict[str, Any]) -> str:
    nbytes, base = r["bytes"], r["ranks"][0]
    L = [SCALING_BEGIN, "", f"### Scaling over ranks (`benchmarks/stream.py --scaling`, measured {meta['date']})", "",
         f"{meta['duration_min']:.1f} min on {meta['cpus']} CPUs, Python {meta['python']}, torch {meta['torch']}, "
         f"load average {meta['load_start']:.1f} at the start and {meta['load']:.1f} at the end; checkpoint "
         f"{nbytes / GiB:.2f} GiB bf16 ({r['tensors']} tensors, Qwen3-MoE layout, 8 experts, 8 KV heads); "
         f"whole processes, medians of {r['runs']}, page cache warm. Convert at N ranks: TP=N for the dense part and "
         "EP=N (ETP=1) for the experts; export: the TP=1 checkpoint on N processes. Speed-up and efficiency are "
         f"of the work the CLI reports, against {base} rank(s).", "",
         f"Floors: plain read() {_rate(nbytes, r['floor'])}, `cp -r` {_rate(nbytes, r['cp'])}; plain read() by N "
         "processes at once, each its share of the shard files: "
         + (", ".join(f"N={n} {_rate(nbytes, t)}" for n, t in r.get("floor_n", {}).items()) or "not run") + ".", "",
         "| ranks | convert, whole CLI | convert work | speed-up (efficiency) | peak RSS | "
         "export, whole CLI | export work | speed-up (efficiency) | peak RSS |",
         "|---|---|---|---|---|---|---|---|---|"]

    def cell(kind: str, n: int) -> str:
        wall, work, rss = r[kind][n]
        up = r[kind][base][1] / work * base
        return f"{_rate(nbytes, wall)} | {_rate(nbytes, work)} | {up:.2f}x ({up / n:.2f}) | {rss / GiB:.2f} GiB"

    for n in r["ranks"]:
        L.append(f"| {n} | {cell('convert', n)} | {cell('export', n)} |")
    L += ["", f"Export bitwise vs the source: {'yes' if r.get('export_bitwise') else r.get('export_mismatches')}.",
          "", SCALING_END]
    return "\n".join(L) + "\n"


BIG_BEGIN = "<!-- benchmarks/stream.py --big: begin (generated) -->"
BIG_END = "<!-- benchmarks/stream.py --big: end -->"


def render_big(meta: dict[str, Any], sizes: dict[str, dict[str, Any]]) -> str:
    L = [BIG_BEGIN, "", f"### The big case (`benchmarks/stream.py --big`, measured {meta['date']})", "",
         f"{meta['duration_min']:.1f} min on {meta['cpus']} CPUs, load average {meta['load']:.1f} at the end; one run "
         "of each, whole processes; the checkpoint does not fit the page cache next to the other sessions' memory, "
         "so reads are partly cold. Budget per process: 2 GiB + 4x the largest tensor.", "",
         "| | " + " | ".join(f"{n} GiB" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]

    def row(label: str, fn: Any) -> None:
        L.append(f"| {label} | " + " | ".join(fn(s) for s in sizes.values()) + " |")

    def budget(s: dict[str, Any]) -> float:
        return float(2 + 4 * s["largest"] / GiB)

    def conv(key: str) -> Any:
        return lambda s: (f"{_rate(s['bytes'], s[key][0])}, work {_rate(s['bytes'], s[key][2])}, "
                          f"peak RSS {s[key][1] / GiB:.2f} GiB (budget {budget(s):.2f})")

    row("checkpoint", lambda s: f"{s['bytes'] / GiB:.2f} GiB, {s['tensors']} tensors, largest "
                                f"{s['largest'] / 2**20:.0f} MiB")
    row("floor: plain read() / `cp -r`", lambda s: f"{_rate(s['bytes'], s['floor'])} / {_rate(s['bytes'], s['cp'])}")
    row("`mapgen convert` TP=1 (streaming), whole CLI", conv("tp1"))
    row("`mapgen convert --ep 2 --etp 1`, two processes", conv("ep2"))
    row("dist checkpoint on disk / HF bytes (TP=1, EP=2)",
        lambda s: f"{s['disk_tp1'] / s['bytes']:.3f}, {s['disk_ep2'] / s['bytes']:.3f}")
    row("`mapgen export --nproc 2` of the EP=2 checkpoint", conv("export"))
    row("export bitwise vs source (every tensor's dtype, shape, blake2b)",
        lambda s: "yes" if s["export_bitwise"] else f"NO: {s['export_mismatches']}")
    L += ["", BIG_END]
    return "\n".join(L) + "\n"


PLOT = REPO / "benchmarks" / "stream.png"


def plot() -> None:
    """``benchmarks/stream.png`` from the raw numbers on disk: throughput of the old (in-memory) and new
    (streaming) paths against the floors per size, and, when ``--scaling`` has run, the speed-up over ranks
    against the ideal and the 0.7N goal."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[bench]'): {PLOT.name} not redrawn", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = json.loads(RAW.read_text())["sizes"]
    scaling = json.loads(RAW_SCALING.read_text())["scaling"] if RAW_SCALING.exists() else None
    fig, axes = plt.subplots(1, 2 if scaling else 1, figsize=(15 if scaling else 11, 5.5), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1] if scaling else [1]})
    ax = axes[0][0]
    series: list[tuple[str, str, Any]] = [
        ("floor: plain read()", "floor", lambda x: x), ("floor: cp -r", "cp", lambda x: x),
        ("convert, old (in-memory), CLI", "memory", lambda x: x[0]),
        ("convert, streaming, CLI", "stream", lambda x: x[0]),
        ("convert, streaming, work", "stream", lambda x: x[2]),
        ("export, old (in-memory), work", "export_memory", lambda x: x[2]),
        ("export, streaming, CLI", "export", lambda x: x[0]),
        ("export, streaming, work", "export", lambda x: x[2])]
    names = list(raw)
    width = 0.8 / len(series)
    for i, (label, key, pick) in enumerate(series):
        ys = [raw[n]["bytes"] / GiB / med([pick(x) for x in raw[n]["rows"][key]]) if raw[n]["rows"].get(key)
              else 0.0 for n in names]
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(names))], ys, width, label=label)
    for j, n in enumerate(names):
        goal = 0.7 * raw[n]["bytes"] / GiB / med(raw[n]["rows"]["floor"])
        ax.plot([j - 0.42, j + 0.42], [goal, goal], "k--", lw=1, label="0.7x plain read (goal)" if j == 0 else None)
    ax.set_xticks(range(len(names)), [f"{n} GiB" for n in names])
    ax.set_yscale("log")
    ax.set_ylabel("GiB/s of bf16 HF checkpoint bytes (median)")
    ax.set_title("HF <-> Megatron, TP=1, CPU, warm page cache: old path vs streaming")
    ax.legend(fontsize=7, ncol=3, loc="lower center")
    if scaling:
        ax = axes[0][1]
        ranks = scaling["ranks"]
        for kind in ("convert", "export"):
            base = scaling[kind][str(ranks[0])][1]  # JSON object keys are strings
            ups = [base / scaling[kind][str(n)][1] * ranks[0] for n in ranks]
            ax.plot(ranks, ups, "o-", label=f"{kind} work")
        floor_n = {int(n): t for n, t in scaling.get("floor_n", {}).items()}
        if floor_n:
            ax.plot(ranks, [1.0] + [scaling["floor"] / floor_n[n] for n in ranks[1:]], "s:",
                    label="floor: plain read() by N processes")
        ax.plot(ranks, ranks, "k-", lw=1, label="ideal (N)")
        ax.plot(ranks, [0.7 * n for n in ranks], "k--", lw=1, label="goal (0.7N)")
        ax.set_xticks(ranks)
        ax.set_xlabel(f"ranks (on {json.loads(RAW_SCALING.read_text())['meta']['cpus']} cores)")
        ax.set_ylabel("speed-up of the work")
        ax.set_title(f"scaling, {scaling['bytes'] / GiB:.1f} GiB checkpoint")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=90)


def _meta(start: float) -> dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "duration_min": (time.time() - start) / 60,
            "cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()[0]}


def _publish(section: str, raw: dict[str, Any], path: Path, begin: str, end: str, no_write: bool) -> None:
    print(section)
    if not no_write:
        path.write_text(json.dumps(raw, indent=1) + "\n")
        write(section, begin, end)
        if path in (RAW, RAW_SCALING) and RAW.exists():
            plot()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.25,1,2.5", help="comma-separated subset of " + ",".join(STREAM_SIZES))
    ap.add_argument("--runs", type=int, default=None, help="repetitions (default 3; 1 with --scaling)")
    ap.add_argument("--memory-limit", type=float, default=1.5,
                    help="run the in-memory convert and the export only up to this many GiB")
    ap.add_argument("--no-memory", action="store_true", help="streaming rows only")
    ap.add_argument("--no-parallel", action="store_true", help="skip the TP=2 / EP=2 rows")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mapgen-bench-stream"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--big", action="store_true",
                    help="the big case for --sizes (TP=1 and EP=2 convert, export on two processes, digests; "
                         "deletes the synthesized source to make room): its own section of RESULTS.md")
    ap.add_argument("--scaling", action="store_true",
                    help="scaling over ranks (convert at TP=N/EP=N, export on N processes, floors): its own section")
    ap.add_argument("--scaling-gib", type=float, default=4.0, help="size of the scaling checkpoint (GiB)")
    ap.add_argument("--ranks", default="1,2,4,8", help="rank counts for --scaling (the first is the baseline)")
    ap.add_argument("--plot", action="store_true", help="only redraw benchmarks/stream.png from the raw numbers")
    args = ap.parse_args()
    if args.plot:
        plot()
        return
    args.runs = args.runs or (1 if args.scaling else 3)
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    load_start = os.getloadavg()[0]

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f} s] {msg}", flush=True)

    if args.scaling:
        import torch

        src = synth(f"{args.scaling_gib:g}", args.workdir, scaling_shape(args.scaling_gib), "scaling-")
        log(f"synthesized {src}")
        ranks = [int(n) for n in args.ranks.split(",")]
        result = bench_scaling(src, args.workdir, ranks, args.runs, log)
        meta = {**_meta(start), "torch": torch.__version__, "load_start": load_start}
        _publish(render_scaling(meta, result), {"meta": meta, "scaling": result}, RAW_SCALING, SCALING_BEGIN,
                 SCALING_END, args.no_write)
        return

    if args.big:
        big = {size: bench_big(size, synth(size, args.workdir), args.workdir, log) for size in args.sizes.split(",")}
        meta = _meta(start)
        _publish(render_big(meta, big), {"meta": meta, "sizes": big}, RAW_BIG, BIG_BEGIN, BIG_END, args.no_write)
        return

    sizes: dict[str, dict[str, Any]] = {}
    for size in args.sizes.split(","):
        src = synth(size, args.workdir)
        memory = not args.no_memory and float(size) <= args.memory_limit
        sizes[size] = bench(size, src, args.workdir, args.runs, memory, log)
    par = None
    if not args.no_parallel and "1" in sizes:
        par = bench_parallel(synth("1", args.workdir), args.workdir, max(1, args.runs - 1), log)
    meta = _meta(start)
    _publish(render(meta, sizes, par), {"meta": meta, "sizes": sizes, "parallel": par}, RAW, BEGIN, END, args.no_write)


if __name__ == "__main__":
    main()
