"""Whole-process timings of ``mapgen check`` on the committed ``generated/`` and of a one-input ``mapgen emit``
(a new layout added to a copy of ``generated/``): wall and CPU seconds, medians of N alternating runs.

    .venv/bin/python benchmarks/bench_emit.py [--runs N] [--mapgen PATH/TO/mapgen] [--repo CHECKOUT]

``--mapgen``/``--repo`` point at another checkout's installed CLI and tree (how the "before" figures in
RESULTS.md were taken on main). The new layout is a metadata-only, untied Llama (config + index, no weights):
emit scans metadata only, so it needs no tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def metadata_llama(out: Path) -> Path:
    h, heads, kv, hd, ffn, vocab = 48, 4, 2, 12, 40, 160
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": ffn,
           "num_hidden_layers": 2, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
           "vocab_size": vocab, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(2):
        keys += [f"model.layers.{i}.{k}.weight" for k in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, "model.safetensors")}))
    return out


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mapgen", default=str(REPO / ".venv" / "bin" / "mapgen"))
    ap.add_argument("--repo", type=Path, default=REPO)
    args = ap.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"check": [], "emit": []}
    with tempfile.TemporaryDirectory() as tmp:
        src = metadata_llama(Path(tmp) / "tiny-llama-untied")
        timed([args.mapgen, "check"], args.repo)  # warm .pyc files and the page cache
        for _ in range(args.runs):
            results["check"].append(timed([args.mapgen, "check"], args.repo))
            copy = Path(tmp) / "generated"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(args.repo / "generated", copy, ignore=shutil.ignore_patterns("__pycache__"))
            results["emit"].append(timed([args.mapgen, "emit", str(src), "--out", str(copy)], Path(tmp)))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.repo}: {args.runs} runs each, alternating; load average {load}")
    for name, xs in results.items():
        wall = statistics.median(w for w, _ in xs)
        cpu = statistics.median(c for _, c in xs)
        print(f"  {name}: wall median {wall:.2f} s (min {min(w for w, _ in xs):.2f}), CPU median {cpu:.2f} s")


if __name__ == "__main__":
    main()
