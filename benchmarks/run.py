"""The conversion benchmarks in one command; writes its sections of ``benchmarks/RESULTS.md`` and
``benchmarks/throughput.png``.

    .venv/bin/python -m benchmarks.run [--quick] [--workdir /tmp/mapgen-bench] [--sizes 0.25,1,4] [--runs N]

What it measures (every measurement a fresh process, so peak RSS is that process tree's own ``ru_maxrss``
from ``os.wait4``; the repetitions of different kinds alternate so that machine noise spreads evenly):

* ``mapgen emit --from-inputs`` into a temporary copy of ``generated/`` and ``mapgen check`` (medians).
* For synthetic Qwen3-MoE checkpoints of about 0.25, 1 and 4 GiB (bf16; ``mapgen synth`` from the tiny
  transformers-written layout of ``tests/tiny.py``): the raw read floor (safetensors ``safe_open`` +
  ``get_tensor`` of every key, and plain ``read()`` of the shard files), mapgen's in-memory load
  (``api.load_hf``: build + fill, no dist checkpoint), ``mapgen convert`` (load + torch_dist save),
  ``mapgen export`` (torch_dist load + HF write), the in-memory export (``api.export_hf``), and mbridge
  0.15.1 on the same checkpoint and model (see ``benchmarks/_workers.py`` for how it runs on a CPU).
* Bytes read per rank at TP=2 and at EP=2 (``Stats.bytes_read``) with mbridge's split beside it.

Not part of the test suite. The page cache is warm for every timed read (one untimed read of the shards
first; the machine cannot drop caches without root).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
PLOT = REPO / "benchmarks" / "throughput.png"
BEGIN = "<!-- benchmarks/run.py: begin (generated; edit run.py, not this section) -->"
END = "<!-- benchmarks/run.py: end -->"
GiB = 2**30

# Qwen3-MoE shapes: 8 experts, 16 heads in 4 KV groups, vocabulary 32000 (divisible by 128 * TP: no padding).
SIZES: dict[str, dict[str, int]] = {
    "0.25": {"hidden": 1024, "heads": 16, "kv-heads": 4, "head-dim": 64, "experts": 8, "moe-intermediate": 768,
             "intermediate": 768, "vocab": 32000, "layers": 3, "shards": 2},
    "1": {"hidden": 2048, "heads": 16, "kv-heads": 4, "head-dim": 128, "experts": 8, "moe-intermediate": 1536,
          "intermediate": 1536, "vocab": 32000, "layers": 5, "shards": 3},
    "4": {"hidden": 2048, "heads": 16, "kv-heads": 4, "head-dim": 128, "experts": 8, "moe-intermediate": 1536,
          "intermediate": 1536, "vocab": 32000, "layers": 24, "shards": 8},
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run(cmd: list[str], *, check: bool = True) -> tuple[float, int, str]:
    """(wall seconds, peak RSS of the process tree in bytes, stdout) of one command."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{text[-4000:]}")
    return wall, int(usage.ru_maxrss) * 1024, text


def worker(*args: str) -> tuple[float, int, dict[str, Any]]:
    wall, rss, text = run([sys.executable, "-m", "benchmarks._workers", *args])
    line = next(ln for ln in reversed(text.splitlines()) if ln.startswith("RESULT "))
    return wall, rss, json.loads(line[len("RESULT "):])


def mapgen_cli(*args: str) -> tuple[float, int, str]:
    return run([sys.executable, "-m", "mapgen", *args])


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------------------
def bench_emit(runs: int, log: Any) -> dict[str, Any]:
    emit_t, check_t = [], []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "generated"
        shutil.copytree(REPO / "generated", copy, ignore=shutil.ignore_patterns("__pycache__"))
        n_bridges = len(list(copy.glob("*_*.py")))
        n_inputs = len(list((copy / "inputs").glob("*.json")))
        mapgen_cli("check", "--dir", str(copy))  # warm .pyc files and the page cache
        for _ in range(runs):
            emit_t.append(mapgen_cli("emit", "--from-inputs", "--out", str(copy))[0])
            check_t.append(mapgen_cli("check", "--dir", str(copy))[0])
    log(f"emit {med(emit_t):.2f} s, check {med(check_t):.2f} s")
    return {"emit": emit_t, "check": check_t, "bridges": n_bridges, "inputs": n_inputs}


def synth(size: str, root: Path, tiny: Path) -> Path:
    out = root / f"qwen3-moe-{size}g"
    if not out.is_dir():
        args = [a for k, v in SIZES[size].items() for a in (f"--{k}", str(v))]
        mapgen_cli("synth", str(tiny / "qwen3-moe"), str(out), *args)
    return out


def bench_size(size: str, src: Path, root: Path, runs: int, log: Any) -> dict[str, Any]:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    total = int(index["metadata"]["total_size"])
    r: dict[str, Any] = {"bytes": total, "tensors": len(index["weight_map"]), "runs": runs}
    worker("floor-file", str(src))  # warm the page cache (untimed)
    keys = ("floor_st", "floor_file", "mg_fill", "mg_build_fill", "mg_mem_export", "mg_load_rss",
            "mg_total_rss", "mb_fill", "mb_build", "mb_mem_export", "mb_load_rss", "mb_total_rss",
            "convert", "convert_rss", "export", "export_rss")
    for k in keys:
        r[k] = []
    for i in range(runs):
        _, rss, res = worker("floor-st", str(src))
        r["floor_st"].append(res["seconds"])
        r["largest"] = res["largest"]
        r["floor_st_rss"] = res["maxrss"][0] * 1024
        _, _, res = worker("floor-file", str(src))
        r["floor_file"].append(res["seconds"])
        out = root / "out-hf"
        _, rss, res = worker("mapgen-export", str(src), str(out))
        r["mg_fill"].append(res["fill"])
        r["mg_build_fill"].append(res["build_and_fill"])
        r["mg_mem_export"].append(res["export"])
        r["mg_load_rss"].append(res["rss_after_load"][0] * 1024)
        r.setdefault("mg_anon", []).append(res["rss_split"][0]["RssAnon"])
        r.setdefault("mg_file", []).append(res["rss_split"][0]["RssFile"])
        r["mg_total_rss"].append(rss)
        r["mg_bytes_written"] = res["bytes_written"][0]
        shutil.rmtree(out, ignore_errors=True)
        _, rss, res = worker("mbridge-export", str(src), str(out))
        r["mb_fill"].append(res["fill"])
        r["mb_build"].append(res["build"])
        r["mb_mem_export"].append(res["export"])
        r["mb_load_rss"].append(res["rss_after_load"][0] * 1024)
        r.setdefault("mb_anon", []).append(res["rss_split"][0]["RssAnon"])
        r["mb_total_rss"].append(rss)
        r["mb_out_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        shutil.rmtree(out, ignore_errors=True)
        ckpt = root / "out-mcore"
        wall, rss, _ = mapgen_cli("convert", str(src), str(ckpt), "--overwrite")
        r["convert"].append(wall)
        r["convert_rss"].append(rss)
        r["ckpt_bytes"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        wall, rss, _ = mapgen_cli("export", str(ckpt), str(out), "--overwrite")
        r["export"].append(wall)
        r["export_rss"].append(rss)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        log(f"  {size} GiB run {i + 1}/{runs}: floor {res_fmt(r['floor_st'][-1])}, mapgen fill "
            f"{res_fmt(r['mg_fill'][-1])}, mbridge fill {res_fmt(r['mb_fill'][-1])}, convert "
            f"{res_fmt(r['convert'][-1])}, export {res_fmt(r['export'][-1])}")
    return r


def res_fmt(s: float) -> str:
    return f"{s:.2f} s"


def bench_parallel(src: Path, runs: int, log: Any) -> dict[str, Any]:
    """Bytes read and fill time per rank at TP=2 and EP=2 (mapgen, mbridge), and the TP=2 convert CLI."""
    r: dict[str, Any] = {}
    for tp, ep in ((2, 1), (1, 2)):
        tag = f"tp{tp}ep{ep}"
        mg, mb = [], []
        for _ in range(runs):
            _, _, res = worker("mapgen-load", str(src), "--tp", str(tp), "--ep", str(ep))
            mg.append(res["fill"])
            r[f"{tag}_bytes_read"] = res["bytes_read"]
            r[f"{tag}_mg_rss"] = [x * 1024 for x in res["maxrss"]]
            _, _, res = worker("mbridge-load", str(src), "--tp", str(tp), "--ep", str(ep))
            mb.append(res["fill"])
            r[f"{tag}_mb_rss"] = [x * 1024 for x in res["maxrss"]]
        r[f"{tag}_mg_fill"] = mg
        r[f"{tag}_mb_fill"] = mb
        log(f"  TP={tp} EP={ep}: mapgen fill {med(mg):.2f} s, mbridge fill {med(mb):.2f} s, read "
            f"{[round(b / 2**20) for b in r[f'{tag}_bytes_read']]} MiB")
    return r


# ---------------------------------------------------------------------------------------------------------
def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def rate(nbytes: int, secs: list[float]) -> str:
    return f"{med(secs):.2f} s ({nbytes / GiB / med(secs):.2f} GiB/s)"


def render(meta: dict[str, Any], emit: dict[str, Any] | None, sizes: dict[str, dict[str, Any]],
           par: dict[str, Any] | None, par_size: str | None) -> str:
    L: list[str] = [BEGIN, ""]
    L.append(f"Measured {meta['date']} by `{meta['command']}` ({meta['seconds'] / 60:.1f} min) on "
             f"{meta['machine']}. Medians; the figure that matters is the ratio in the same run, since the "
             "machine is shared and noisy. Page cache: **warm** for every timed read (one untimed read first; "
             "no root to drop caches), so the floor is a memory-bandwidth floor, not a disk floor.")
    L.append("")
    if emit:
        L += ["## emit / check", "",
              f"Whole `generated/` package ({emit['bridges']} bridge modules, {emit['inputs']} stored inputs), "
              f"whole processes, {len(emit['emit'])} runs each, alternating.", "",
              "| command | median | min | max |", "|---|---|---|---|"]
        for k, cmd in (("emit", "mapgen emit --from-inputs --out COPY"), ("check", "mapgen check --dir COPY")):
            xs = emit[k]
            L.append(f"| `{cmd}` | {med(xs):.2f} s | {min(xs):.2f} s | {max(xs):.2f} s |")
        L.append("")
    L += ["## HF -> Megatron and Megatron -> HF throughput (TP=1)", "",
          "Synthetic Qwen3-MoE checkpoints in bf16 (`mapgen synth` of the tests/tiny.py layout; shapes in "
          "`SIZES` of run.py). GiB/s are **HF checkpoint bytes** (bf16, as stored) per second for every row, "
          "although the Megatron model is fp32 and so holds twice those bytes (`bytes written` column). "
          "*fill* = `load_model` alone (read + convert + copy into the built model); *build+fill* adds "
          "building the Megatron model; `mapgen convert` = whole CLI process (scan, build, fill, torch_dist "
          "save of the fp32 model); `mapgen export` = whole CLI process (build, torch_dist load, HF write). "
          "mbridge rows: mbridge 0.15.1's own `load_weights` / `save_weights` on the same model (how: see "
          "below). mapgen builds its model without random initialisation (every parameter is overwritten), "
          "so its *fill* also pays the first-touch page faults of the fp32 model, which mbridge's build "
          "(randomly initialised, as its `get_model` does) has already paid: compare *build+fill*.", ""]
    hdr = "| | " + " | ".join(f"{s} GiB" for s in sizes) + " |"
    L += [hdr, "|---" * (len(sizes) + 1) + "|"]

    def mb_total(r: dict[str, Any]) -> float:
        return med([a + b for a, b in zip(r["mb_build"], r["mb_fill"], strict=True)])

    def row(label: str, f: Any) -> None:
        L.append(f"| {label} | " + " | ".join(f(r) for r in sizes.values()) + " |")

    row("checkpoint", lambda r: f"{gib(r['bytes'])}, {r['tensors']} tensors, runs {r['runs']}")
    row("largest tensor (bf16)", lambda r: f"{r['largest'] / 2**20:.0f} MiB")
    row("floor: safe_open + get_tensor", lambda r: rate(r["bytes"], r["floor_st"]))
    row("floor: plain read()", lambda r: rate(r["bytes"], r["floor_file"]))
    row("mapgen fill (api.load_hf)", lambda r: rate(r["bytes"], r["mg_fill"]))
    row("mapgen build+fill", lambda r: rate(r["bytes"], r["mg_build_fill"]))
    row("**fill / floor (st)**", lambda r: f"**{med(r['floor_st']) / med(r['mg_fill']):.2f}x**")
    row("mbridge fill (load_weights)", lambda r: rate(r["bytes"], r["mb_fill"]))
    row("mbridge build+fill", lambda r: f"{mb_total(r):.2f} s ({r['bytes'] / GiB / mb_total(r):.2f} GiB/s)")
    row("mapgen fill speed-up over mbridge (fill alone)",
        lambda r: f"{med(r['mb_fill']) / med(r['mg_fill']):.2f}x")
    row("**mapgen speed-up over mbridge (build+fill)**", lambda r: f"**{mb_total(r) / med(r['mg_build_fill']):.2f}x**")
    row("`mapgen convert` (CLI, incl. dist save)", lambda r: rate(r["bytes"], r["convert"]))
    row("dist checkpoint on disk", lambda r: gib(r["ckpt_bytes"]))
    row("mapgen in-memory export (api.export_hf)", lambda r: rate(r["bytes"], r["mg_mem_export"]))
    row("mbridge in-memory export (save_weights)", lambda r: rate(r["bytes"], r["mb_mem_export"]))
    row("**mapgen export speed-up over mbridge**",
        lambda r: f"**{med(r['mb_mem_export']) / med(r['mg_mem_export']):.2f}x**")
    row("`mapgen export` (CLI, incl. dist load)", lambda r: rate(r["bytes"], r["export"]))
    row("bytes written into the model (fp32)", lambda r: gib(r["mg_bytes_written"]))
    L.append("")
    L += ["### Peak RSS (TP=1)", "",
          "`ru_maxrss` of the process (tree). Budget = model bytes (fp32 Megatron parameters, as built) "
          "+ 2x the largest tensor (fp32). The in-memory rows are measured right after the load, in the "
          "process that then exports. RSS includes the interpreter with torch + megatron-core imported "
          f"(about {gib(meta.get('baseline_rss', 0))}: a tiny model's load) and the file-backed pages of "
          "the memory-mapped shards that were touched (reclaimable page cache, shared with other readers).",
          "", hdr, "|---" * (len(sizes) + 1) + "|"]

    def budget(r: dict[str, Any]) -> int:
        return int(r["mg_bytes_written"] + 2 * 2 * r["largest"])

    row("budget: model + 2x largest", lambda r: gib(budget(r)))
    row("floor (safe_open + get_tensor)", lambda r: gib(r["floor_st_rss"]))
    row("mapgen after load (in-memory)", lambda r: f"{gib(med(r['mg_load_rss']))} "
        f"({med(r['mg_load_rss']) / budget(r):.2f}x budget)")
    row("mapgen after load: anonymous / file-backed (mmap) RSS",
        lambda r: f"{gib(med(r['mg_anon']))} / {gib(med(r['mg_file']))}")
    row("mapgen load + in-memory export", lambda r: gib(med(r["mg_total_rss"])))
    row("`mapgen convert`", lambda r: f"{gib(med(r['convert_rss']))} ({med(r['convert_rss']) / budget(r):.2f}x)")
    row("`mapgen export`", lambda r: f"{gib(med(r['export_rss']))} ({med(r['export_rss']) / budget(r):.2f}x)")
    row("mbridge after load", lambda r: f"{gib(med(r['mb_load_rss']))} ({med(r['mb_load_rss']) / budget(r):.2f}x)")
    row("mbridge after load: anonymous RSS", lambda r: gib(med(r["mb_anon"])))
    row("mbridge load + export", lambda r: gib(med(r["mb_total_rss"])))
    L.append("")
    if par and par_size:
        total = sizes[par_size]["bytes"]
        L += [f"## Bytes read per rank and fill time at TP=2 / EP=2 ({par_size} GiB checkpoint)", "",
              "mapgen: `Stats.bytes_read` of each rank (what `mapgen convert` prints); each rank reads only "
              "its rows/columns/experts. mbridge reads every tensor on TP rank 0 (ETP rank 0 for experts) "
              "and scatters, so its rank 0 reads the whole checkpoint (from its `load_weights`; the other "
              "ranks read nothing from disk).", "",
              "| layout | mapgen bytes read per rank | share of checkpoint | mapgen fill | mbridge fill | "
              "speed-up | peak RSS per rank mapgen / mbridge |", "|---|---|---|---|---|---|---|"]
        for tp, ep in ((2, 1), (1, 2)):
            tag = f"tp{tp}ep{ep}"
            br = par[f"{tag}_bytes_read"]
            L.append(f"| TP={tp} EP={ep} | " + ", ".join(f"{b / 2**20:.0f} MiB" for b in br) + " | "
                     + ", ".join(f"{b / total:.2f}" for b in br) + f" | {med(par[f'{tag}_mg_fill']):.2f} s | "
                     f"{med(par[f'{tag}_mb_fill']):.2f} s | "
                     f"{med(par[f'{tag}_mb_fill']) / med(par[f'{tag}_mg_fill']):.2f}x | "
                     + ", ".join(gib(x) for x in par[f"{tag}_mg_rss"]) + " / "
                     + ", ".join(gib(x) for x in par[f"{tag}_mb_rss"]) + " |")
        L.append("")
    stock = meta.get("mbridge_stock") or {}
    L += ["## mbridge 0.15.1 on this machine", "",
          "As published (`AutoBridge.from_pretrained(SRC).get_model(weight_path=SRC)`, mapgen's CPU shims "
          "installed, parallel state initialised): "
          + ("ran." if stock.get("ok") else f"fails with `{stock.get('error')}` at `{stock.get('where')}`."),
          "", "mbridge builds its model only with the Transformer Engine layer spec "
          "(`use_transformer_engine=True` hard-coded in `LLMBridge._get_transformer_layer_spec`), and TE "
          "needs CUDA. So the mbridge rows run mbridge's own conversion code (`Bridge.load_weights`, "
          "`Bridge.save_weights`: its SafeTensorIO, name mapping, QKV/gate-up merge, TP/ETP split + scatter "
          "/ all-gather merge) unchanged, on the very model mapgen builds (local spec, fp32, "
          "`AutoBridge(..., dtype=float32)`), seen through a name view that renames the two local-spec "
          "names to their TE equivalents (`benchmarks/_workers.py::_TENamedView`). Its output was checked "
          "value-equal to the source. Differences that remain part of mbridge's design and are measured: "
          "`load_weights` reads all of this rank's HF tensors into memory before converting "
          "(`memory_efficient=False`, the default), calls `model.state_dict()` once per parameter, TP rank 0 "
          "reads everything and scatters; `save_weights` writes the model dtype (fp32 here: twice the "
          "bytes of mapgen's bf16 output) and keeps every tensor of the output until its shard is written.",
          ""]
    L += ["## Goals", "", "| goal | result |", "|---|---|"]
    s1 = sizes.get("1") or next(iter(sizes.values()))
    for name, r in sizes.items():
        ratio = med(r["floor_st"]) / med(r["mg_fill"])
        L.append(f"| HF -> Megatron fill >= 0.7x floor, TP=1 ({name} GiB) | {ratio:.2f}x: "
                 f"{'met' if ratio >= 0.7 else 'missed'} |")
    for name, r in sizes.items():
        x = med(r["mg_load_rss"]) / budget(r)
        y = med(r["convert_rss"]) / budget(r)
        L.append(f"| peak RSS <= model + 2x largest ({name} GiB) | load {x:.2f}x, convert {y:.2f}x of budget: "
                 f"{'met' if max(x, y) <= 1 else 'missed'} |")
    if par and par_size:
        share = max(par["tp2ep1_bytes_read"]) / sizes[par_size]["bytes"]
        L.append(f"| each TP=2 rank reads <= 0.6x of the checkpoint | {share:.2f}x: "
                 f"{'met' if share <= 0.6 else 'missed'} |")
    for name, r in sizes.items():
        a = mb_total(r) / med(r["mg_build_fill"])
        b = med(r["mb_mem_export"]) / med(r["mg_mem_export"])
        c = med(r["mb_fill"]) / med(r["mg_fill"])
        L.append(f"| faster than mbridge ({name} GiB, TP=1) | build+fill {a:.2f}x (fill alone {c:.2f}x), "
                 f"export {b:.2f}x: "
                 f"{'met' if min(a, b) > 1 else 'missed'} |")
    if par:
        for tag, label in (("tp2ep1", "TP=2"), ("tp1ep2", "EP=2")):
            a = med(par[f"{tag}_mb_fill"]) / med(par[f"{tag}_mg_fill"])
            L.append(f"| faster than mbridge ({label}) | load {a:.2f}x: {'met' if a > 1 else 'missed'} |")
    del s1
    L += ["", f"Plot: `benchmarks/throughput.png`. Raw numbers: `{meta['raw']}`.", "", END]
    return "\n".join(L) + "\n"


def plot(sizes: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("floor: safe_open+get_tensor", "floor_st"), ("floor: read()", "floor_file"),
              ("mapgen fill", "mg_fill"), ("mbridge fill", "mb_fill"), ("mapgen convert (CLI)", "convert"),
              ("mapgen in-mem export", "mg_mem_export"), ("mbridge in-mem export", "mb_mem_export"),
              ("mapgen export (CLI)", "export")]
    labels = list(sizes)
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(series)
    for i, (name, key) in enumerate(series):
        vals = [r["bytes"] / GiB / med(r[key]) for r in sizes.values()]
        ax.bar([x + i * width for x in range(len(labels))], vals, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], [f"{s} GiB" for s in labels])
    ax.set_ylabel("GiB/s of bf16 HF checkpoint bytes (median)")
    ax.set_yscale("log")
    ax.set_title("mapgen HF <-> Megatron throughput, TP=1, CPU, warm page cache")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def write_results(section: str) -> None:
    text = RESULTS.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="0.25 and 1 GiB only, fewer runs (about 5 minutes)")
    ap.add_argument("--sizes", help="comma-separated subset of " + ",".join(SIZES))
    ap.add_argument("--runs", type=int, help="runs per size (default: 3; 2 with --quick)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mapgen-bench")
    ap.add_argument("--keep", action="store_true", help="keep the synthesized checkpoints in --workdir")
    ap.add_argument("--no-write", action="store_true", help="print; do not touch RESULTS.md or the plot")
    ap.add_argument("--render", action="store_true", help="re-render RESULTS.md and the plot from results.json")
    args = ap.parse_args()
    if args.render:
        saved = json.loads((REPO / "benchmarks" / "results.json").read_text())
        par = saved.get("parallel")
        names = list(saved["sizes"])
        write_results(render(saved["meta"], saved["emit"], saved["sizes"], par, "1" if "1" in names else names[0]))
        plot(saved["sizes"])
        return
    t0 = time.perf_counter()
    sizes = args.sizes.split(",") if args.sizes else (["0.25", "1"] if args.quick else list(SIZES))
    runs = args.runs or (2 if args.quick else 3)
    root = args.workdir
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    need = sum(float(s) for s in sizes) * 2.5 * GiB + 2 * GiB  # source + fp32 dist checkpoint (+ exports)
    if free < need:
        sys.exit(f"{root}: {free / GiB:.1f} GiB free, the run needs about {need / GiB:.1f} GiB")

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    results: dict[str, Any] = {}
    try:
        log("mbridge as published (stock get_model) ...")
        tiny = root / "tiny"
        if not tiny.is_dir():
            run([sys.executable, "-m", "tests.tiny", str(tiny)])
        _, _, stock = worker("mbridge-stock", str(tiny / "qwen3-moe"))
        _, _, base = worker("mapgen-load", str(tiny / "qwen3-moe"))
        results["baseline_rss"] = base["maxrss"][0] * 1024
        results["mbridge_stock"] = stock
        log(f"  {stock}")
        log("emit / check ...")
        results["emit"] = bench_emit(2 if args.quick else 3, log)
        results["sizes"] = {}
        par_size = "1" if "1" in sizes else sizes[0]
        for size in sizes:
            src = synth(size, root, tiny)
            log(f"{size} GiB: {src}")
            results["sizes"][size] = bench_size(size, src, root, min(runs, 2) if size == "4" else runs, log)
            if size == par_size:
                log(f"TP=2 / EP=2 on {size} GiB ...")
                results["parallel"] = bench_parallel(src, 1 if args.quick else 2, log)
            if not args.keep and size != par_size:
                shutil.rmtree(src, ignore_errors=True)
    finally:
        if not args.keep:
            for p in root.glob("qwen3-moe-*"):
                shutil.rmtree(p, ignore_errors=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "command": "python -m benchmarks.run" + (" --quick" if args.quick
            else ""), "seconds": time.perf_counter() - t0,
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
            f"load average {os.getloadavg()[0]:.1f} at the end",
            "raw": "benchmarks/results.json", "mbridge_stock": results.get("mbridge_stock"),
            "baseline_rss": results.get("baseline_rss", 0)}
    results["meta"] = meta
    section = render(meta, results["emit"], results["sizes"], results.get("parallel"), par_size)
    print(section)
    if not args.no_write:
        (REPO / "benchmarks" / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        write_results(section)
        plot(results["sizes"])
    log("done")


if __name__ == "__main__":
    main()
