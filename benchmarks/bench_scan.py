"""Time ``mapgen scan`` on the largest corpus index against plain ``json.load`` of the same index.

Both are whole processes started with the same interpreter (so interpreter start-up counts on both sides),
run alternately in the same session; the figure is the ratio of the medians. Goal: within 3x.

Children run with bytecode caching on, as after any ``pip install`` (the warm-up runs write
``__pycache__``), even where the shell sets ``PYTHONDONTWRITEBYTECODE=1`` (the development machine does):
otherwise every mapgen module would be recompiled in every run, which no installed copy does.

    .venv/bin/python benchmarks/bench_scan.py [--runs 15] [--case qwen3.5-25b-reap-a3b-coding]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "fixtures" / "corpus"


def _time(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--case", default="qwen3.5-25b-reap-a3b-coding")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    case = CORPUS / args.case
    index = case / "model.safetensors.index.json"
    n_keys = len(json.loads(index.read_text())["weight_map"])
    scan_cmd = [sys.executable, "-m", "mapgen", "scan", str(case), "--quiet"]
    json_cmd = [sys.executable, "-c", f"import json; json.load(open({str(index)!r}))"]
    for _ in range(2):  # warm the file cache and .pyc files
        _time(scan_cmd, env)
        _time(json_cmd, env)
    scan_t, json_t = [], []
    for _ in range(args.runs):
        scan_t.append(_time(scan_cmd, env))
        json_t.append(_time(json_cmd, env))
    s, j = statistics.median(scan_t), statistics.median(json_t)
    print(f"case: {args.case} ({n_keys} keys, index {index.stat().st_size / 1e6:.1f} MB)")
    print(f"python {platform.python_version()} on {platform.machine()}, {args.runs} runs each, alternating")
    print(f"mapgen scan  median {s * 1000:.0f} ms  (min {min(scan_t) * 1000:.0f}, max {max(scan_t) * 1000:.0f})")
    print(f"json.load    median {j * 1000:.0f} ms  (min {min(json_t) * 1000:.0f}, max {max(json_t) * 1000:.0f})")
    print(f"ratio        {s / j:.2f}x  (goal: within 3x)")


if __name__ == "__main__":
    main()
