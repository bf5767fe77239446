"""Helpers for the scan tests: fixture locations, tiny safetensors files, and a Hugging Face hub cache.

Safetensors files written here hold a real header and zero-filled data (tiny shapes), so the reader sees
exactly what it would see in a real shard.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
CORPUS = TESTS / "fixtures" / "corpus"
CORPUS_PENDING = TESTS / "fixtures" / "corpus_pending"  # shared cases scan does not support yet (breadth issue)
HUB_FIXTURES = TESTS / "fixtures" / "hub"
LAYOUT_FIXTURES = TESTS / "fixtures" / "layouts"
SHARED_CORPUS = TESTS.parent.parent / "shared" / "corpus"

CORPUS_CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())
HUB_CASES = {  # golden case name -> (fixture folder, hub id)
    "hub-qwen3.5-35b-a3b": ("Qwen--Qwen3.5-35B-A3B", "Qwen/Qwen3.5-35B-A3B"),
    "hub-qwen3.6-35b-a3b": ("Qwen--Qwen3.6-35B-A3B", "Qwen/Qwen3.6-35B-A3B"),
}
SNAPSHOT_SHA = "0123456789abcdef0123456789abcdef01234567"

_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I64": 8}


def case_dir(case: str) -> Path:
    return HUB_FIXTURES / HUB_CASES[case][0] if case in HUB_CASES else CORPUS / case


def expected_layout(case: str) -> str:
    """The golden layout JSON of scan case ``tests/cases/<case>/`` (``tests.regen`` says where it lives)."""
    from regen import case as golden_case

    return golden_case(case).expected_layout.read_text(encoding="utf-8")


def expected_scan_json(case: str) -> str:
    """What ``mapgen scan --json`` writes for scan case ``case``: the golden layout plus the config catalog's
    verdict per config key (``config_fields``), which goldens and stored inputs do not carry."""
    import dataclasses

    from mapgen.catalog import check_config
    from mapgen.ir import layout_from_json, layout_to_json

    layout = layout_from_json(expected_layout(case))
    return layout_to_json(dataclasses.replace(layout, config_fields=check_config(layout.config).to_json()))


ALL_CASES = CORPUS_CASES + sorted(HUB_CASES)


def safetensors_bytes(tensors: Mapping[str, tuple[int, ...]], dtype: str = "BF16") -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        n = math.prod(shape) * _BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def write_checkpoint(
    directory: Path,
    config: Mapping[str, Any],
    shards: Mapping[str, Mapping[str, tuple[int, ...]]],
    *,
    index: bool = True,
    write_shards: bool = True,
) -> Path:
    """A checkpoint dir: config.json, index (unless ``index=False``) and shard files with real headers."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if index:
        weight_map = {k: shard for shard, tensors in shards.items() for k in tensors}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if write_shards:
        for shard, tensors in shards.items():
            (directory / shard).write_bytes(safetensors_bytes(tensors))
    return directory


def write_metadata(
    directory: Path, config: Mapping[str, Any], keys: list[str], shard: str = "model.safetensors"
) -> Path:
    """config.json + index only (no shard files), keys all in one shard."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, shard)})
    )
    return directory


def make_hf_cache(home: Path, repo_id: str, fixture: Path, *, sha: str = SNAPSHOT_SHA) -> Path:
    """Lay out ``fixture``'s JSON files as the hub cache does under ``HF_HOME``:
    ``hub/models--Org--Name/{refs/main, blobs/, snapshots/<sha>/<file> -> ../../blobs/<file>}``."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors.index.json"):
        if (fixture / name).exists():
            blob = repo / "blobs" / f"{name}.blob"
            shutil.copyfile(fixture / name, blob)
            (snap / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return repo


def tiny_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 16,
        "vocab_size": 32,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    return cfg


def dense_layer(i: int, prefix: str = "model.", *, gate: bool = False) -> dict[str, tuple[int, ...]]:
    p = f"{prefix}layers.{i}."
    return {
        p + "input_layernorm.weight": (8,),
        p + "post_attention_layernorm.weight": (8,),
        p + "self_attn.q_proj.weight": (16 if gate else 8, 8),
        p + "self_attn.k_proj.weight": (4, 8),
        p + "self_attn.v_proj.weight": (4, 8),
        p + "self_attn.o_proj.weight": (8, 8),
        p + "mlp.gate_proj.weight": (16, 8),
        p + "mlp.up_proj.weight": (16, 8),
        p + "mlp.down_proj.weight": (8, 16),
    }


def tiny_dense(n_layers: int = 2, *, gate: bool = False, tied: bool = False) -> dict[str, tuple[int, ...]]:
    tensors: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (32, 8), "model.norm.weight": (8,)}
    if not tied:
        tensors["lm_head.weight"] = (32, 8)
    for i in range(n_layers):
        tensors.update(dense_layer(i, gate=gate))
    return tensors
