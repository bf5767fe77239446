"""Drift detection, the emit/check CLI (one code path) and the atomic tree writer."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from emit_support import dump_layout, qwen3_5_moe_layout, qwen3_dense_layout, write_tree

from mapgen.cli import _io
from mapgen.cli import main as cli
from mapgen.cli._io import write_tree_atomically
from mapgen.emit import pipeline
from mapgen.emit.check import compare
from mapgen.errors import Diagnostic, MapgenError

NUMERICS = "logits parity vs transformers 0.0 (fake): max |diff| = 0.0e+00"


@dataclasses.dataclass(frozen=True)
class FakeProof:
    ok: bool = True
    line: str = "1 Megatron params <-> 1 HF keys, 0 unmatched"
    problems: tuple[Diagnostic, ...] = ()


@pytest.fixture
def fake_prover(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the (megatron-core) proof with an always-holding one; records which layouts it proved."""
    proved: list[str] = []

    def prove(plan, layout):  # type: ignore[no-untyped-def]
        proved.append(layout.model_type)
        return FakeProof()

    monkeypatch.setattr(pipeline, "default_prover", lambda: prove)
    monkeypatch.setattr(pipeline, "default_numerics", lambda: lambda plan, layout, where: FakeProof(line=NUMERICS))
    return proved


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def generated(tmp_path: Path, fake_prover: list[str]) -> Path:
    """A generated tree with two layouts (three inputs), emitted through the CLI."""
    src = tmp_path / "scans"
    src.mkdir()
    (src / "qwen3-8b.json").write_text(dump_layout(qwen3_dense_layout(4)))
    (src / "qwen3-0.6b.json").write_text(dump_layout(qwen3_dense_layout(2)))
    (src / "qwen3.5-tiny.json").write_text(dump_layout(qwen3_5_moe_layout()))
    out = tmp_path / "generated"
    assert cli(["emit", *map(str, sorted(src.iterdir())), "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------------------
def test_compare_clean_changed_missing_orphaned(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a.py": "x = 1\n", "b.py": "y = 2\n", "inputs/i.json": "{}\n", "old.py": "z\n"})
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    expected = {"a.py": "x = 1\n", "b.py": "y = 3\n", "c.py": "new\n", "inputs/i.json": "{}\n"}
    drift = compare(expected, tmp_path)
    assert drift.changed == ("b.py",)
    assert drift.missing == ("c.py",)
    assert drift.orphaned == ("old.py",)
    assert "-y = 2\n+y = 3\n" in drift.diffs["b.py"]
    report = drift.render("generated", "mapgen emit --from-inputs")
    assert "changed:  b.py" in report
    assert "missing:  c.py" in report
    assert "orphaned: old.py" in report
    assert report.rstrip().endswith("mapgen emit --from-inputs")
    assert compare({"a.py": "x = 1\n"}, tmp_path / "nowhere").missing == ("a.py",)


def test_compare_reports_line_ending_only_changes(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_bytes(b"x = 1\r\n")
    drift = compare({"a.py": "x = 1\n"}, tmp_path)
    assert drift.changed == ("a.py",)
    assert "only line endings differ" in drift.diffs["a.py"]


# ---------------------------------------------------------------------------------------------------------
# emit + check through the CLI
# ---------------------------------------------------------------------------------------------------------
def test_emit_writes_the_whole_tree(generated: Path, fake_prover: list[str]) -> None:
    files = sorted(snapshot(generated))
    assert files[:3] == ["SUPPORTED.md", "__init__.py", "inputs/qwen3-0.6b.json"]
    assert len([f for f in files if f.endswith(".py") and f != "__init__.py"]) == 2
    assert sorted(fake_prover) == ["qwen3", "qwen3", "qwen3_5_moe"]  # every input is proven


def test_check_passes_on_a_fresh_tree(generated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["check", "--dir", str(generated)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_check_fails_on_a_hand_edit_with_a_diff(generated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = generated / "qwen3.py"
    text = module.read_text()
    module.write_text(text.replace("copy('row')", "copy('column')", 1))
    capsys.readouterr()
    assert cli(["check", "--dir", str(generated)]) == 1
    out = capsys.readouterr().out
    assert f"changed:  {module.name}" in out
    assert "-    ('self_attention.linear_proj.weight', 'self_attn.o_proj.weight', copy('column')),\n" in out
    assert "+    ('self_attention.linear_proj.weight', 'self_attn.o_proj.weight', copy('row')),\n" in out
    assert f"mapgen emit --from-inputs --out {generated}" in out
    assert cli(["emit", "--from-inputs", "--out", str(generated)]) == 0
    assert cli(["check", "--dir", str(generated)]) == 0


def test_check_reports_missing_and_orphaned_files(generated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (generated / "SUPPORTED.md").unlink()
    (generated / "llama_0123456789ab.py").write_text("# a module no input needs any more\n")
    (generated / "__pycache__").mkdir()
    (generated / "__pycache__" / "x.pyc").write_bytes(b"\0")
    capsys.readouterr()
    assert cli(["check", "--dir", str(generated)]) == 1
    out = capsys.readouterr().out
    assert "missing:  SUPPORTED.md" in out
    assert "orphaned: llama_0123456789ab.py" in out
    assert "__pycache__" not in out
    assert cli(["emit", "--from-inputs", "--out", str(generated)]) == 0
    assert not (generated / "llama_0123456789ab.py").exists()
    assert cli(["check", "--dir", str(generated)]) == 0


def test_removing_an_input_removes_its_orphaned_module(generated: Path) -> None:
    before = {p.name for p in generated.glob("*.py")}
    (generated / "inputs" / "qwen3.5-tiny.json").unlink()
    assert cli(["emit", "--from-inputs", "--out", str(generated)]) == 0
    after = {p.name for p in generated.glob("*.py")}
    assert len(before - after) == 1
    assert before - after == {"qwen3_5_moe.py"}


def test_edited_stored_input_changes_the_module(generated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = generated / "inputs" / "qwen3-8b.json"
    data = json.loads(path.read_text())
    data["model_type"] = "qwen3x"
    path.write_text(json.dumps(data))  # also not canonical any more: check reports the input file too
    capsys.readouterr()
    assert cli(["check", "--dir", str(generated)]) == 1
    out = capsys.readouterr().out
    assert "missing:  qwen3x.py" in out
    assert "changed:  inputs/qwen3-8b.json" in out


def test_emit_is_idempotent(generated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(generated)
    capsys.readouterr()
    assert cli(["emit", "--from-inputs", "--out", str(generated)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert snapshot(generated) == before


def test_failed_proof_writes_nothing(generated: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    before = snapshot(generated)
    problems = (
        Diagnostic("error", "proof.hf-unconsumed", "checkpoint keys no rule consumes",
                   key="model.layers.{0..47}.mlp.gate.weight  (48)"),
        Diagnostic("error", "proof.megatron-unproduced", "Megatron parameters no rule produces",
                   key="decoder.layers.{0..47}.mlp.router.weight  (48)"),
    )
    failing = FakeProof(ok=False, line="10 Megatron params <-> 10 HF keys, 2 unmatched", problems=problems)
    monkeypatch.setattr(pipeline, "default_prover", lambda: lambda plan, layout: failing)
    new = tmp_path / "new.json"
    new.write_text(dump_layout(qwen3_dense_layout(3)))
    capsys.readouterr()
    assert cli(["emit", str(new), "--out", str(generated)]) == 1
    err = capsys.readouterr().err
    assert "emit.proof-failed" in err
    assert "model.layers.{0..47}.mlp.gate.weight  (48)" in err
    assert "nothing was written." in err
    assert snapshot(generated) == before


def test_unplannable_input_writes_nothing(generated: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    before = snapshot(generated)
    layout = qwen3_dense_layout()
    group = layout.language_model.groups[0]
    # a q bias without k/v biases: megatron-core's add_qkv_bias biases all three
    group = dataclasses.replace(group, mixer=group.mixer.with_slots(q_bias="self_attn.q_proj.bias"))
    layout = dataclasses.replace(layout, language_model=dataclasses.replace(layout.language_model, groups=(group,)))
    src = tmp_path / "partial_bias.json"
    src.write_text(dump_layout(layout))
    assert cli(["emit", str(src), "--out", str(generated)]) == 1
    assert "plan.unsupported" in capsys.readouterr().err
    assert snapshot(generated) == before


def test_emit_refuses_to_replace_a_foreign_directory(tmp_path: Path, fake_prover: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "README.md").write_text("my project\n")
    src = tmp_path / "q.json"
    src.write_text(dump_layout(qwen3_dense_layout()))
    assert cli(["emit", str(src), "--out", str(tmp_path)]) == 1
    assert "emit.bad-out" in capsys.readouterr().err
    assert (tmp_path / "README.md").read_text() == "my project\n"


def test_emit_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["emit", "--out", str(tmp_path / "g")]) == 1
    assert "emit.no-sources" in capsys.readouterr().err
    assert cli(["emit", "a.json", "b.json", "--name", "x", "--out", str(tmp_path / "g")]) == 1
    assert "--name needs exactly one SOURCE" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a layout"}')
    assert cli(["emit", str(bad), "--out", str(tmp_path / "g")]) == 1
    assert "emit.bad-input" in capsys.readouterr().err
    assert cli(["check", "--dir", str(tmp_path / "nowhere")]) == 1
    assert not (tmp_path / "g").exists()


def test_emit_with_name_and_wrapped_layout(tmp_path: Path, fake_prover: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "scan-output.json"
    src.write_text('{"layout": ' + dump_layout(qwen3_dense_layout()) + "}")
    out = tmp_path / "generated"
    assert cli(["emit", str(src), "--name", "my-qwen3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "my-qwen3: qwen3: " in printed
    assert "0 unmatched  (new)" in printed
    assert "added: qwen3.py" in printed
    assert (out / "inputs" / "my-qwen3.json").read_text() == dump_layout(qwen3_dense_layout())


@pytest.mark.slow
def test_emit_and_check_with_the_real_proof(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "qwen3-8b.json"
    src.write_text(dump_layout(qwen3_dense_layout()))
    out = tmp_path / "generated"
    assert cli(["emit", str(src), "--out", str(out)]) == 0
    assert "qwen3-8b: qwen3: " in capsys.readouterr().out
    assert cli(["check", "--dir", str(out)]) == 0


# ---------------------------------------------------------------------------------------------------------
# write_tree_atomically
# ---------------------------------------------------------------------------------------------------------
def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_the_tree(tmp_path: Path) -> None:
    target = tmp_path / "out"
    write_tree(target, {"old.py": "old\n", "keep.py": "v1\n"})
    write_tree_atomically(target, {"keep.py": "v2\n", "sub/new.json": b"{}\n"}, replace_existing=True)
    assert snapshot(target) == {"keep.py": b"v2\n", "sub/new.json": b"{}\n"}
    assert _leftovers(tmp_path) == []
    assert (target.stat().st_mode & 0o777) != 0o700


def test_atomic_write_failure_mid_write_leaves_target_unchanged(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out"
    write_tree(target, {"a.py": "a\n", "b.py": "b\n"})
    before = snapshot(target)
    real = _io._write_file
    calls = []

    def flaky(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(_io, "_write_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_tree_atomically(target, {"a.py": "A\n", "b.py": "B\n", "c.py": "C\n"}, replace_existing=True)
    assert snapshot(target) == before
    assert _leftovers(tmp_path) == []


def test_atomic_write_failure_at_the_swap_restores_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out"
    write_tree(target, {"a.py": "a\n"})
    before = snapshot(target)
    real = os.replace

    def failing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src).name.startswith(".out.new-"):
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(_io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_tree_atomically(target, {"a.py": "A\n"}, replace_existing=True)
    assert snapshot(target) == before
    assert _leftovers(tmp_path) == []


def test_atomic_write_guards(tmp_path: Path) -> None:
    target = tmp_path / "out"
    write_tree(target, {"a.py": "a\n"})
    with pytest.raises(MapgenError, match="exists and is not empty"):
        write_tree_atomically(target, {"b.py": "b\n"}, replace_existing=False)
    for bad in ("../escape.py", "/abs.py", "a/../../b.py", "", "a\\b.py"):
        with pytest.raises(MapgenError, match="not a plain relative path"):
            write_tree_atomically(target, {bad: "x"}, replace_existing=True)
    assert snapshot(target) == {"a.py": b"a\n"}
    assert not (tmp_path / "escape.py").exists()
    fresh = tmp_path / "fresh" / "deeper"
    write_tree_atomically(fresh, {"x.txt": "x\n"}, replace_existing=False)
    assert snapshot(fresh) == {"x.txt": b"x\n"}
