"""The proof record (``proofs.json``): emit and check skip the meta-device proof of an input whose input,
plan and mapgen/megatron-core versions are unchanged, and still catch every edit (rendering is always redone)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from emit_support import dump_layout, qwen3_5_moe_layout, qwen3_dense_layout

from mapgen.cli import main as cli
from mapgen.emit import pipeline, render
from mapgen.errors import Diagnostic

NUMERICS = "logits parity vs transformers 0.0 (fake): max |diff| = 0.0e+00"


@dataclasses.dataclass(frozen=True)
class FakeProof:
    ok: bool = True
    line: str = "1 Megatron params <-> 1 HF keys, 0 unmatched"
    problems: tuple[Diagnostic, ...] = ()


@pytest.fixture
def proved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def prove(plan, layout):  # type: ignore[no-untyped-def]
        calls.append(plan.module_name)
        return FakeProof()

    monkeypatch.setattr(pipeline, "default_prover", lambda: prove)
    monkeypatch.setattr(pipeline, "default_numerics", lambda: lambda plan, layout, where: FakeProof(line=NUMERICS))
    return calls


@pytest.fixture
def tree(tmp_path: Path, proved: list[str]) -> Path:
    src = tmp_path / "scans"
    src.mkdir()
    (src / "qwen3-8b.json").write_text(dump_layout(qwen3_dense_layout(4)))
    (src / "qwen3.5-tiny.json").write_text(dump_layout(qwen3_5_moe_layout()))
    out = tmp_path / "generated"
    assert cli(["emit", *map(str, sorted(src.iterdir())), "--out", str(out)]) == 0
    assert len(proved) == 2
    proved.clear()
    return out


def test_emit_writes_the_record(tree: Path) -> None:
    data = json.loads((tree / pipeline.PROOFS_PATH).read_text())
    assert sorted(data["proofs"]) == ["qwen3-8b", "qwen3.5-tiny"]
    assert data["megatron_core"] == pipeline.megatron_core_version() != ""
    entry = data["proofs"]["qwen3-8b"]
    assert entry["proof"] == FakeProof().line
    assert entry["numerics"] == NUMERICS
    assert data["transformers"] == pipeline.installed_versions()[2] != ""
    assert entry["input_sha256"] == render.input_sha256((tree / "inputs" / "qwen3-8b.json").read_text())


def test_check_and_emit_reuse_recorded_proofs(tree: Path, proved: list[str], capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    assert cli(["check", "--dir", str(tree)]) == 0
    assert proved == []
    assert "0 proven now, 2 by their recorded proof" in capsys.readouterr().out
    new = tmp_path / "qwen3-0.6b.json"
    new.write_text(dump_layout(qwen3_dense_layout(2)))
    assert cli(["emit", str(new), "--out", str(tree)]) == 0
    assert len(proved) == 1  # only the new input is proven
    assert "qwen3-8b: qwen3: " in capsys.readouterr().out
    proved.clear()
    assert cli(["check", "--dir", str(tree), "--reprove"]) == 0
    assert len(proved) == 3


def test_a_hand_edit_is_caught_without_a_proof(tree: Path, proved: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    module = tree / "qwen3.py"
    module.write_text(module.read_text() + "BRIDGE = None  # hand edit\n")
    assert cli(["check", "--dir", str(tree)]) == 1
    assert proved == []
    assert f"changed:  {module.name}" in capsys.readouterr().out


def test_a_template_change_is_caught(tree: Path, proved: list[str], monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    original = render._finish
    monkeypatch.setattr(render, "_finish", lambda text: original(text.replace("DO NOT EDIT", "do not edit")))
    assert cli(["check", "--dir", str(tree)]) == 1
    assert "changed:  __init__.py" in capsys.readouterr().out


def test_a_plan_change_reproves(tree: Path, proved: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from mapgen.plan import planner

    real = planner.plan

    def changed(layout):  # type: ignore[no-untyped-def]
        p = real(layout)
        return dataclasses.replace(p, rules=p.rules[:-1]) if layout.model_type == "qwen3" else p

    monkeypatch.setattr(pipeline, "default_planner", lambda: changed)
    assert cli(["check", "--dir", str(tree)]) == 1  # the module (and the record's plan digest) changed
    assert len(proved) == 1


@pytest.mark.parametrize("edit", ["version", "transformers", "input", "garbage"])
def test_a_stale_or_broken_record_reproves_and_shows_as_drift(tree: Path, proved: list[str], edit: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tree / pipeline.PROOFS_PATH
    data = json.loads(path.read_text())
    if edit == "version":
        data["megatron_core"] = "0.0.1"
    elif edit == "transformers":  # the numerical proofs ran against another transformers
        data["transformers"] = "0.0.1"
    elif edit == "input":
        data["proofs"]["qwen3-8b"]["input_sha256"] = "0" * 64
    path.write_text("not json" if edit == "garbage" else json.dumps(data, indent=2, sort_keys=True) + "\n")
    assert cli(["check", "--dir", str(tree)]) == 1
    assert len(proved) == (1 if edit == "input" else 2)
    assert "changed:  proofs.json" in capsys.readouterr().out
