"""Helpers for the conversion tests: synthesize sources and run many verify cases in one set of workers.

Starting gloo workers and importing megatron-core costs seconds, so each test module starts one set of
workers (``run_cases``) and runs all its cases in them, one parallel layout after another (megatron's
parallel state is re-initialised per case; the process group is kept). Each case is the real
``mapgen.runtime.verify.verify``: HF -> Megatron -> HF bitwise comparison (keys, dtypes, tensors, shard
assignment) plus logits parity against transformers where it applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mapgen.cli import main as mapgen_main

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "fixtures" / "corpus"
HUB = REPO / "tests" / "fixtures" / "hub"
LAYOUTS = REPO / "tests" / "fixtures" / "layouts"


def synth(source: Path | str, out: Path, *args: str) -> Path:
    code = mapgen_main(["synth", str(source), str(out), *args])
    assert code == 0, f"mapgen synth {source} failed with {code}"
    return out


def load_tensors(root: Path) -> dict[str, Any]:
    """Every tensor of a sharded checkpoint, by key."""
    import json

    from safetensors.torch import load_file

    index = json.loads((root / "model.safetensors.index.json").read_text())
    out: dict[str, Any] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(root / shard)))
    return out


def assert_quantize_round_trip(megatron: Path, source: Path, root: Path, *, in_memory: bool = True) -> None:
    """``export --quantize`` of ``megatron`` against its quantized ``source`` (streaming, then in memory unless
    ``verify`` covers that path already) writes every source tensor byte for byte, and the source's
    ``quantization_config``."""
    import json

    import torch

    src = load_tensors(source)
    for extra in ([], ["--in-memory"]) if in_memory else ([],):
        target = root / f"hfq{len(extra)}"
        assert mapgen_main(["export", str(megatron), str(target), "--source", str(source), "--quantize",
                            *extra]) == 0
        again = load_tensors(target)
        assert set(again) == set(src)
        for key, value in src.items():
            assert again[key].dtype == value.dtype, key
            assert torch.equal(again[key].view(torch.uint8), value.view(torch.uint8)), key
        written = json.loads((target / "config.json").read_text())["quantization_config"]
        assert written == json.loads((source / "config.json").read_text())["quantization_config"]


def retype(root: Path, suffixes: tuple[str, ...], dtype: str = "float32") -> list[str]:
    """Rewrite the tensors whose keys end with one of ``suffixes`` in ``dtype`` (a mixed-dtype checkpoint,
    like real Qwen3.5/3.6 with fp32 ``A_log``); returns the keys changed."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    changed = []
    for shard in sorted(root.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        hit = [k for k in tensors if k.endswith(suffixes)]
        if hit:
            for k in hit:
                tensors[k] = tensors[k].to(getattr(torch, dtype))
            save_file(tensors, str(shard), metadata=meta)
            changed += hit
    return changed


def one_tensor_per_shard(root: Path) -> int:
    """Re-shard a checkpoint so that every tensor is its own shard file (the experts of one layer then span
    many output shards); returns the number of shards."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    index = json.loads((root / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(root / shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        (root / shard).unlink()
    keys = sorted(tensors)
    weight_map = {}
    for i, key in enumerate(keys):
        name = f"model-{i + 1:05d}-of-{len(keys):05d}.safetensors"
        save_file({key: tensors[key]}, str(root / name), metadata={"format": "pt"})
        weight_map[key] = name
    index["weight_map"] = weight_map
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return len(keys)


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    tp: int = 1
    ep: int = 1
    etp: int | None = None
    pp: int = 1
    logits: bool = True
    dtype: str = "auto"

    @property
    def world(self) -> int:
        import math

        etp = self.etp if self.etp is not None else (self.tp if self.ep == 1 else 1)
        return math.lcm(self.tp * self.pp, self.ep * etp * self.pp)


def _run(cases: list[Case]) -> dict[str, Any]:
    from mapgen.errors import MapgenError
    from mapgen.runtime.api import Parallel
    from mapgen.runtime.verify import verify

    out: dict[str, Any] = {}
    for case in cases:
        par = Parallel(tp=case.tp, ep=case.ep, etp=case.etp, pp=case.pp)
        try:
            out[case.name] = verify(case.source, par, logits=case.logits, dtype=case.dtype)
        except MapgenError as exc:
            # Fail the whole batch: the other ranks may be blocked in a collective of this case.
            raise MapgenError(exc.diagnostics, extra=f"(case {case.name})") from None
    return out


def run_cases(cases: list[Case]) -> dict[str, list[dict[str, Any]]]:
    """case name -> per-rank results, running each world size's cases in one set of workers."""
    from mapgen.runtime.api import spawn

    results: dict[str, list[dict[str, Any]]] = {}
    for world in sorted({c.world for c in cases}):
        batch = [c for c in cases if c.world == world]
        per_rank = spawn(_run, world, batch)
        for case in batch:
            results[case.name] = [r[case.name] for r in per_rank]
    return results


def assert_case(results: dict[str, list[dict[str, Any]]], name: str, *, logits: str = "ok") -> dict[str, Any]:
    """Rank 0 must report a bitwise round trip; ``logits`` is "ok" (parity within 1e-4) or "skipped"."""
    ranks = results[name]
    for r in ranks:
        assert "error" not in r, f"{name}: {r['error']}"
    r0 = ranks[0]
    assert r0["keys"] > 0
    assert r0["mismatches"] == [], f"{name}: {r0['mismatches'][:10]}"
    buffers = r0.get("rope_buffers")  # stored rotary_emb.inv_freq: must agree with the config's RoPE
    assert buffers is None or buffers.get("skipped") or buffers["ok"], f"{name}: {buffers}"
    lg = r0.get("logits")
    if logits == "ok":
        assert lg is not None, f"{name}: logits not compared"
        assert not lg.get("skipped"), f"{name}: logits not compared: {lg}"
        assert lg["ok"], f"{name}: logits differ by {lg['max_abs']}"
        assert lg["max_abs"] <= 1e-4, f"{name}: logits differ by {lg['max_abs']}"
    elif logits == "skipped":
        assert lg is None or lg.get("skipped"), lg
    return r0
