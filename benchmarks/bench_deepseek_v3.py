"""Scale of the metadata for a 671B-parameter layout (issue 12, item 6): DeepSeek-V3's index, synthesised.

The config is DeepSeek-V3's published ``config.json`` (61 layers, the first 3 dense, 256 routed experts + 1 shared,
MLA with q/kv latents 1536/512, one MTP layer stored as decoder layer 61). The index lists every key the release
stores, named as the release names them, in its 163 shard files: in bf16 (the layout of the bf16 conversions,
``weight_scale_inv`` absent) and, with ``--fp8``, the original FP8 release (every linear weight beside its
``weight_scale_inv``: ~91k keys). Tensor headers are not read (scan reads the index only).

1. ``mapgen scan DIR --quiet`` as a whole process against ``python -c "json.load(index)"`` (alternating, medians).
2. The bijection proof of the planned bridge against the installed megatron-core, on the meta device (scan, plan
   and prove in-process; the catalog's verdict on the config is not needed for the proof and is not asked).

    .venv/bin/python -m benchmarks.bench_deepseek_v3 [--runs 9] [--fp8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIG: dict[str, Any] = {  # deepseek-ai/DeepSeek-V3 config.json (auto_map and quantization_config left out)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
SHARDS = 163
_ATTN = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def layer_keys(i: int, *, moe: bool, fp8: bool) -> list[str]:
    p = f"model.layers.{i}."
    linears = [f"{p}self_attn.{n}" for n in _ATTN]
    keys = [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight",
            f"{p}self_attn.q_a_layernorm.weight", f"{p}self_attn.kv_a_layernorm.weight"]
    if moe:
        keys += [f"{p}mlp.gate.weight", f"{p}mlp.gate.e_score_correction_bias"]
        linears += [f"{p}mlp.shared_experts.{n}" for n in _MLP]
        linears += [f"{p}mlp.experts.{e}.{n}" for e in range(CONFIG["n_routed_experts"]) for n in _MLP]
    else:
        linears += [f"{p}mlp.{n}" for n in _MLP]
    keys += [f"{w}.weight" for w in linears]
    if fp8:
        keys += [f"{w}.weight_scale_inv" for w in linears]
    return keys


def index(fp8: bool) -> dict[str, Any]:
    n = CONFIG["num_hidden_layers"]
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(n + CONFIG["num_nextn_predict_layers"]):
        keys += layer_keys(i, moe=i >= CONFIG["first_k_dense_replace"], fp8=fp8)
    for d in range(CONFIG["num_nextn_predict_layers"]):
        p = f"model.layers.{n + d}."
        keys += [p + s for s in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                                 "embed_tokens.weight", "shared_head.head.weight")]
    per = -(-len(keys) // SHARDS)
    weight_map = {k: f"model-{j // per + 1:05d}-of-{SHARDS:05d}.safetensors" for j, k in enumerate(keys)}
    return {"metadata": {"total_size": 688_586_727_753 if fp8 else 1_342_177_280_000}, "weight_map": weight_map}


def write(root: Path, fp8: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG, **({"quantization_config": FP8} if fp8 else {})}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "model.safetensors.index.json").write_text(json.dumps(index(fp8), indent=2))
    return root


def _time(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall-clock and CPU (user + system) seconds of one child process, and its exit code. On a shared machine
    under load the CPU time is the steadier figure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    rc = subprocess.run(cmd, check=False, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), rc


def bench_scan(root: Path, runs: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    idx = root / "model.safetensors.index.json"
    scan_cmd = [sys.executable, "-m", "mapgen", "scan", str(root), "--quiet"]
    json_cmd = [sys.executable, "-c", f"import json; json.load(open({str(idx)!r}))"]
    for _ in range(2):
        _time(scan_cmd, env)
        _time(json_cmd, env)
    scan_t, json_t, scan_c, json_c, rcs = [], [], [], [], set()
    for _ in range(runs):
        wall, cpu, rc = _time(scan_cmd, env)
        scan_t.append(wall)
        scan_c.append(cpu)
        rcs.add(rc)
        wall, cpu, _ = _time(json_cmd, env)
        json_t.append(wall)
        json_c.append(cpu)
    s, j = statistics.median(scan_t), statistics.median(json_t)
    sc, jc = statistics.median(scan_c), statistics.median(json_c)
    return {"keys": len(json.loads(idx.read_text())["weight_map"]), "index_mb": idx.stat().st_size / 1e6,
            "scan_ms": s * 1000, "json_ms": j * 1000, "ratio": s / j, "scan_cpu_ms": sc * 1000,
            "json_cpu_ms": jc * 1000, "cpu_ratio": sc / jc, "scan_exit": sorted(rcs)}


def bench_proof(root: Path) -> dict[str, Any]:
    from mapgen.infer import scan
    from mapgen.plan.planner import plan
    from mapgen.plan.proof import prove
    from mapgen.runtime._cpu import import_megatron

    t0 = time.perf_counter()
    import_megatron()
    t1 = time.perf_counter()
    layout = scan(str(root))
    bridge = plan(layout)
    t2 = time.perf_counter()
    c2 = time.process_time()
    proof = prove(bridge, layout)
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "scan_plan_s": t2 - t1, "prove_s": t3 - t2, "prove_cpu_s": time.process_time() - c2,
            "summary": str(proof)[:200]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--fp8", action="store_true", help="the FP8 release's index (weight_scale_inv beside weights)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mapgen-dsv3-") as tmp:
        root = write(Path(tmp) / "DeepSeek-V3", args.fp8)
        s = bench_scan(root, args.runs)
        print(f"DeepSeek-V3 index{' (FP8 release)' if args.fp8 else ' (bf16)'}: {s['keys']} keys, "
              f"{s['index_mb']:.1f} MB")
        print(f"mapgen scan median {s['scan_ms']:.0f} ms (exit {s['scan_exit']}), json.load median "
              f"{s['json_ms']:.0f} ms: {s['ratio']:.2f}x (goal: within 3x), {args.runs} runs each, alternating")
        print(f"CPU time (user+sys) median: scan {s['scan_cpu_ms']:.0f} ms, json.load {s['json_cpu_ms']:.0f} ms: "
              f"{s['cpu_ratio']:.2f}x; load average {os.getloadavg()[0]:.1f}")
        if not args.fp8:
            p = bench_proof(root)
            print(f"proof on meta: import megatron-core {p['import_s']:.1f} s, scan+plan {p['scan_plan_s']:.2f} s, "
                  f"prove {p['prove_s']:.1f} s ({p['prove_cpu_s']:.1f} s CPU): {p['summary']}")


if __name__ == "__main__":
    main()
