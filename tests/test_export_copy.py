"""The streaming export's file-to-file copies (issue 14): HF tensors that are byte ranges of the dist
checkpoint are copied from the ``.distcp`` files in the kernel, and the export is byte for byte the one
written from memory (the copy path switched off), at TP=1 and from a TP=2 checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests import tiny
from tests.runtime_support import HUB, synth


def _export_both(src: Path, ckpt: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[set[str], int]:
    """Export ``ckpt`` with and without the copies; assert the files are equal and bitwise the source's
    tensors. Returns the keys copied and the bytes copied."""
    from mapgen.cli import main
    from mapgen.runtime import api
    from mapgen.runtime.hfio import CopiedTensor
    from tests.runtime_support import load_tensors

    copied: set[str] = set()
    nbytes: list[int] = []
    real_write, real_export = api.write_safetensors, api._export_streaming

    def write(path, tensors, metadata=None):  # type: ignore[no-untyped-def]
        copied.update(k for k, v in tensors.items() if isinstance(v, CopiedTensor))
        real_write(path, tensors, metadata)

    def export(*args, **kwargs):  # type: ignore[no-untyped-def]
        stats = real_export(*args, **kwargs)
        nbytes.append(stats.extra["bytes_copied"])
        return stats

    monkeypatch.setattr(api, "write_safetensors", write)
    monkeypatch.setattr(api, "_export_streaming", export)
    assert main(["export", str(ckpt), str(root / "copied"), "--source", str(src)]) == 0
    monkeypatch.setattr(api, "copy_planner", lambda *args: None)
    assert main(["export", str(ckpt), str(root / "produced"), "--source", str(src)]) == 0
    assert nbytes[1] == 0 < nbytes[0]
    files = [{p.name: p.read_bytes() for p in (root / n).iterdir()} for n in ("copied", "produced")]
    assert files[0].keys() == files[1].keys()
    for name in files[0]:
        assert files[0][name] == files[1][name], name
    ours, theirs = load_tensors(root / "copied"), load_tensors(src)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        assert torch.equal(ours[key], value), key
    index = json.loads((root / "copied" / "model.safetensors.index.json").read_text())["weight_map"]
    assert copied <= set(index)
    return copied, nbytes[0]


def test_tp1_copies_all_but_the_padded_vocabulary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mapgen.cli import main

    src = tiny.write("qwen3-moe", tmp_path / "hf")
    assert main(["convert", str(src), str(tmp_path / "ckpt")]) == 0
    copied, nbytes = _export_both(src, tmp_path / "ckpt", tmp_path, monkeypatch)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    # the embedding and output layer are padded to a multiple of 128 rows in Megatron: produced (their
    # op declares no spans); every other tensor, experts and gate/up halves included, is a copy
    assert set(index) - copied == {"model.embed_tokens.weight", "lm_head.weight"}
    assert nbytes > 0


def test_tp1_packed_experts_gdn_and_mtp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Packed 3-D experts (one expert is a block of the HF tensor), GDN (produced), shared MTP tensors, a
    vision tower (copied from the source checkpoint; without ``--source`` the launching process refuses
    before a worker starts or a byte is written)."""
    from mapgen.cli import main

    src = synth(HUB / "Qwen--Qwen3.6-35B-A3B", tmp_path / "hf", "--mtp-depth", "2")
    assert main(["convert", str(src), str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "no-source"), "--nproc", "2"]) != 0
    err = capsys.readouterr().err
    assert "export.towers-need-source" in err, err
    assert "(vision)" in err, err
    assert "worker" not in err, err
    assert not (tmp_path / "no-source").exists()
    copied, _ = _export_both(src, tmp_path / "ckpt", tmp_path, monkeypatch)
    assert any(k.endswith("experts.gate_up_proj") for k in copied), sorted(copied)[:5]
    # the vision tower's tensors live only in the source checkpoint: copied from its files
    assert "model.visual.merger.linear_fc1.weight" in copied
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" not in copied  # GDN: produced


@pytest.mark.distributed
def test_from_a_tp2_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saved at TP=2: column-parallel row blocks and gate/up halves are copied item by item; row-parallel
    matrices (column chunks in the checkpoint) are produced."""
    from mapgen.cli import main

    src = tiny.write("qwen3-moe", tmp_path / "hf")
    assert main(["convert", str(src), str(tmp_path / "ckpt"), "--tp", "2"]) == 0
    copied, _ = _export_both(src, tmp_path / "ckpt", tmp_path, monkeypatch)
    assert "model.layers.0.self_attn.q_proj.weight" in copied
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in copied
    assert "model.layers.0.self_attn.o_proj.weight" not in copied
    assert "model.layers.0.mlp.experts.0.down_proj.weight" not in copied
