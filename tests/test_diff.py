"""mapgen diff: structural and dimensional layout differences, bridge sharing, exit codes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from scan_support import CORPUS, HUB_FIXTURES

from mapgen.cli import main
from mapgen.diff import diff_layouts, render_diff
from mapgen.infer import scan
from mapgen.ir import layout_to_json

QWEN35 = HUB_FIXTURES / "Qwen--Qwen3.5-35B-A3B"
QWEN36 = HUB_FIXTURES / "Qwen--Qwen3.6-35B-A3B"


def test_qwen35_to_qwen36_is_only_the_mtp_expert_storage(capsys: pytest.CaptureFixture[str]) -> None:
    diff = diff_layouts(scan(str(QWEN35)), scan(str(QWEN36)))
    assert [c.render() for c in diff.structure] == [
        "MTP inner layer 'attention': routed experts per_expert -> packed "
        "(mtp.layers.{layer}.mlp.experts.gate_up_proj, mtp.layers.{layer}.mlp.experts.down_proj)"
    ]
    assert diff.dimensions == ()
    assert not diff.same_bridge
    assert main(["diff", str(QWEN35), str(QWEN36)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[2:] == [
        "structure:",
        "  MTP inner layer 'attention': routed experts per_expert -> packed "
        "(mtp.layers.{layer}.mlp.experts.gate_up_proj, mtp.layers.{layer}.mlp.experts.down_proj)",
        "dimensions:",
        "  identical",
        f"bridge: different ({diff.fingerprint_a} -> {diff.fingerprint_b})",
    ]
    back = diff_layouts(scan(str(QWEN36)), scan(str(QWEN35)))
    assert [(c.path, c.before, c.after) for c in back.structure] == [
        ("MTP inner layer 'attention': routed experts", "packed", "per_expert")
    ]


def test_identical_layouts_and_layout_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout_json = tmp_path / "layout.json"
    layout_json.write_text(layout_to_json(scan(str(QWEN36))))
    assert main(["diff", str(layout_json), str(QWEN36)]) == 0
    out = capsys.readouterr().out
    assert "structure:\n  identical\ndimensions:\n  identical\nbridge: shared" in out
    assert main(["diff", str(tmp_path / "missing"), str(QWEN36)]) == 2
    assert "source.not-found" in capsys.readouterr().err


def test_reap_against_the_full_model() -> None:
    """The REAP prune drops experts, MTP and the vision tower, and is stored as a text-only model."""
    diff = diff_layouts(scan(str(CORPUS / "qwen3.5-25b-reap-a3b-coding")), scan(str(QWEN35)))
    assert [c.render() for c in diff.structure] == [
        "model type: qwen3_5_moe_text -> qwen3_5_moe",
        "MTP: none -> mtp_block (root mtp.layers.{layer}.)",
        "tower 'vision': absent -> model.visual.*",
    ]
    assert [c.render() for c in diff.dimensions] == [
        "max_position_embeddings: 262144 -> 32768",
        "layer group 'attention': routed experts 180 -> 256",
        "layer group 'linear_attention': routed experts 180 -> 256",
        "MTP depth: 0 -> 1",
    ]


def test_mixtral_against_qwen3_vl() -> None:
    diff = diff_layouts(scan(str(CORPUS / "mixtral-8x7b-instruct-v0.1")), scan(str(CORPUS / "qwen3-vl-30b-a3b")))
    rendered = [c.render() for c in diff.structure]
    assert "language model: prefix model. -> model.language_model." in rendered
    assert (
        "layer group 'attention': routed experts per_expert -> packed [in_out] "
        "(model.language_model.layers.{layer}.mlp.experts.gate_up_proj, "
        "model.language_model.layers.{layer}.mlp.experts.down_proj)"
    ) in rendered
    assert (
        "layer group 'attention': attention q norm absent -> "
        "model.language_model.layers.{layer}.self_attn.q_norm.weight"
    ) in rendered
    assert "tower 'vision': absent -> model.visual.*" in rendered
    dims = [c.render() for c in diff.dimensions]
    assert "decoder layers: 32 -> 48" in dims
    assert "layer group 'attention': routed experts 8 -> 128" in dims
    assert "layer group 'attention': layers {0..31} -> {0..47}" in dims


def test_same_bridge_different_dimensions(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A synthesized checkpoint shares its source's bridge: only dimensions differ."""
    assert main(["synth", str(CORPUS / "qwen3-1.7b-mlx-bf16"), str(tmp_path / "tiny")]) == 0
    capsys.readouterr()
    assert main(["diff", str(CORPUS / "qwen3-1.7b-mlx-bf16"), str(tmp_path / "tiny")]) == 1
    out = capsys.readouterr().out
    assert "structure:\n  identical\ndimensions:\n  decoder layers: 28 -> 2\n" in out
    assert "bridge: shared" in out
    assert main(["diff", "--structure-only", str(CORPUS / "qwen3-1.7b-mlx-bf16"), str(tmp_path / "tiny")]) == 0


def test_walk_agrees_with_the_fingerprint() -> None:
    """Every pair of corpus layouts: a structural change is reported iff the fingerprints differ."""
    layouts = {p.name: scan(str(p)) for p in sorted(CORPUS.iterdir()) if p.is_dir()}
    layouts |= {"qwen3.5": scan(str(QWEN35)), "qwen3.6": scan(str(QWEN36))}
    for a in layouts.values():
        for b in layouts.values():
            diff = diff_layouts(a, b)
            assert bool(diff.structure) == (not diff.same_bridge)
            assert render_diff(diff, "a", "b").endswith("\n")
    # a field the walk does not name explicitly still shows up (the generic fallback never hides one)
    a = layouts["qwen3-1.7b-mlx-bf16"]
    g0 = a.language_model.groups[0]
    block = dataclasses.replace(g0.block, slots=tuple(
        (k, "input_rmsnorm.weight" if k == "input_norm" else v) for k, v in g0.block.slots))
    group = dataclasses.replace(g0, block=block)
    b = dataclasses.replace(a, language_model=dataclasses.replace(a.language_model, groups=(group,)))
    assert [c.render() for c in diff_layouts(a, b).structure] == [
        "layer group 'attention': input norm model.layers.{layer}.input_layernorm.weight -> "
        "model.layers.{layer}.input_rmsnorm.weight"
    ]
