"""Megatron-Core distributed checkpoints: written at TP=2/EP=2, read back at another layout.

`mapgen convert` writes a torch_dist checkpoint the way Megatron-LM lays it out (``release/`` and
``latest_checkpointed_iteration.txt``) plus ``mapgen.json`` (the layout it came from); `mapgen export` builds
the model at the layout it is asked for, lets dist_checkpointing reshard on load, and writes HF again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny

pytestmark = pytest.mark.distributed


def _mapgen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mapgen", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_tp2_ep2_checkpoint_exports_at_tp1_to_the_same_tensors(tmp_path: Path) -> None:
    from mapgen.runtime.api import compare_checkpoints

    src = tiny.write("qwen3-moe", tmp_path / "hf")
    ckpt = tmp_path / "mcore"
    done = _mapgen("convert", str(src), str(ckpt), "--tp", "2", "--ep", "2", "--etp", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert (ckpt / "release" / ".metadata").is_file()
    meta = json.loads((ckpt / "mapgen.json").read_text())
    assert meta["parallel"]["tp"] == 2
    assert meta["parallel"]["ep"] == 2
    assert not list(tmp_path.glob(".mcore.partial-*"))

    out = tmp_path / "back"
    done = _mapgen("export", str(ckpt), str(out))  # TP=1, layout from mapgen.json
    assert done.returncode == 0, done.stderr[-3000:]
    rt = compare_checkpoints(src, out)
    assert rt.ok, rt.mismatches[:10]
    assert rt.keys == len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])

    out2 = tmp_path / "back-tp2"
    done = _mapgen("export", str(ckpt), str(out2), "--tp", "2", "--source", str(src))
    assert done.returncode == 0, done.stderr[-3000:]
    assert compare_checkpoints(src, out2).ok


def test_export_refuses_an_existing_output_and_keeps_it(tmp_path: Path) -> None:
    src = tiny.write("qwen3", tmp_path / "hf")
    ckpt = tmp_path / "mcore"
    assert _mapgen("convert", str(src), str(ckpt)).returncode == 0
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = _mapgen("export", str(ckpt), str(out))
    assert done.returncode != 0
    assert "output.exists" in done.stderr
    assert "Traceback" not in done.stderr
    assert (out / "keep.txt").read_text() == "mine"
