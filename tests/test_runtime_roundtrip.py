"""HF -> Megatron -> HF under TP/EP/PP on transformers-written checkpoints, and logits parity.

Tiny Qwen3 (dense, GQA, QK-norm) and Qwen3-MoE (per-expert) checkpoints written by transformers itself
(tests/tiny.py: non-square dims, bf16, several shard files). Each case converts into the Megatron model at
the given layout, exports back, and compares bitwise (keys, dtypes, tensors, shard assignment); logits are
compared with transformers in fp32 on a fixed batch (<= 1e-4) at every layout (PP=2: megatron-core's forward
stage by stage, the hidden states sent between stages).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import tiny
from tests.runtime_support import Case, assert_case, run_cases

pytestmark = pytest.mark.distributed

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)]


def _cases(root: Path) -> list[Case]:
    cases = []
    for model in ("qwen3", "qwen3-moe"):
        src = str(root / model)
        for tp, ep, pp in LAYOUTS:
            if model == "qwen3" and ep > 1:
                continue
            etp = 1 if ep > 1 else None
            cases.append(Case(f"{model}-tp{tp}-ep{ep}-pp{pp}", src, tp=tp, ep=ep, etp=etp, pp=pp))
    # The sources are bf16, so every case above builds a bf16 model (the source dtype); these build fp32.
    cases.append(Case("qwen3-moe-tp2-ep1-pp1-fp32", str(root / "qwen3-moe"), tp=2, dtype="float32"))
    cases.append(Case("qwen3-tp1-ep1-pp2-fp32", str(root / "qwen3"), pp=2, dtype="float32"))
    return cases


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, object]]]:
    root = tmp_path_factory.mktemp("tiny")
    tiny.write("qwen3", root / "qwen3")
    tiny.write("qwen3-moe", root / "qwen3-moe")
    return run_cases(_cases(root))


@pytest.mark.parametrize("name", [c.name for c in _cases(Path("/unused"))])
def test_round_trip_is_bitwise_and_logits_match(results: dict[str, list[dict[str, object]]], name: str) -> None:
    r0 = assert_case(results, name, logits="ok")
    want = "torch.float32" if name.endswith("-fp32") else "torch.bfloat16"
    assert r0["param_dtypes"] == [want], r0["param_dtypes"]
    assert r0["dtypes"]["params_dtype"] == want.removeprefix("torch.")


def test_tp2_ranks_each_read_about_half(results: dict[str, list[dict[str, object]]]) -> None:
    """Streaming: at TP=2 each rank reads only its slices (vocab padding makes rank 0's share larger)."""
    whole = results["qwen3-moe-tp1-ep1-pp1"][0]["bytes_read"]
    for r in results["qwen3-moe-tp2-ep1-pp1"]:
        assert r["bytes_read"] <= 0.6 * whole, (r["bytes_read"], whole)
    for r in results["qwen3-moe-tp1-ep2-pp1"]:
        assert r["bytes_read"] < 0.8 * whole, (r["bytes_read"], whole)


def _stream_worker(src: str) -> dict[str, object]:
    """The in-memory streaming API (RL weight sync): every (name, tensor) equals the source's."""
    from mapgen.runtime.api import HFSource, Parallel, load_hf, parallel_context, stream_hf
    from mapgen.runtime.hfio import SafetensorsReader

    source = HFSource.open(src)
    par = Parallel(tp=2)
    with parallel_context(par) as coords:
        model, binding, _ = load_hf(source, par)
        names = []
        equal = True
        reader = SafetensorsReader(source.root, source.weight_map)
        for name, tensor in stream_hf(model, binding, target=source.to_meta()):
            names.append(name)
            equal = equal and bool((reader.read(name) == tensor).all()) and reader.read(name).dtype == tensor.dtype
    return {"rank": coords.rank, "names": names, "equal": equal, "expected": sorted(source.weight_map)}


def test_streaming_iterator_yields_every_tensor_once_on_rank0(tmp_path: Path) -> None:
    from mapgen.runtime.api import spawn

    src = tiny.write("qwen3-moe", tmp_path / "hf")
    r0, r1 = spawn(_stream_worker, 2, str(src))
    assert r0["equal"]
    assert sorted(r0["names"]) == r0["expected"]
    assert len(r0["names"]) == len(set(r0["names"]))
    assert r1["names"] == []


def test_verify_under_torchrun(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    src = tiny.write("qwen3", tmp_path / "hf")
    from mapgen.runtime._net import free_port

    port = str(free_port())
    done = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", port, "-m", "mapgen", "verify",
                           str(src), "--tp", "2"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bitwise identical" in done.stdout
    assert "-> OK" in done.stdout
    assert done.stdout.count("round trip") == 1, "only rank 0 reports"
