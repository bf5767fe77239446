"""``mapgen scan`` end to end: output, exit codes, --json, bad input without tracebacks, the hub path
offline, and no heavy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scan_support import (
    CORPUS,
    HUB_CASES,
    HUB_FIXTURES,
    expected_scan_json,
    make_hf_cache,
    tiny_config,
    tiny_dense,
    write_metadata,
)

from mapgen.cli import main

REPO = Path(__file__).resolve().parent.parent
REAP = CORPUS / "qwen3.5-25b-reap-a3b-coding"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mapgen", "scan", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_summary_and_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", str(REAP)]) == 0
    out = capsys.readouterr()
    assert "40 layers = 30 gated-delta-net + 10 attention (every 4th)" in out.out
    assert "180 per layer, per-expert" in out.out
    assert "none (config declares 1; no MTP tensors)" in out.out
    assert "mtp.declared-absent" in out.err


def test_json_output_matches_golden(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "layout.json"
    assert main(["scan", str(CORPUS / "qwen3-vl-30b-a3b"), "--json", str(target), "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert target.read_text() == expected_scan_json("qwen3-vl-30b-a3b")
    assert main(["scan", str(CORPUS / "mimo-7b"), "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["mtp_scheme"] == "mtp_layers"


def test_unclassified_exits_2_with_compact_listing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = list(tiny_dense()) + [f"model.layers.{i}.foo.weight" for i in range(2)]
    write_metadata(tmp_path, tiny_config(), keys)
    assert main(["scan", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "unclassified keys (2):" in out
    assert "  model.layers.{0..1}.foo.weight  (2 keys)" in out


@pytest.mark.parametrize("what", ["missing", "malformed", "bad-shard"])
def test_bad_input_exits_1_without_traceback(tmp_path: Path, what: str) -> None:
    if what == "missing":
        target = str(tmp_path / "nope")
    else:
        (tmp_path / "config.json").write_text("{" if what == "malformed" else "{}")
        (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"w": "../x.safetensors"}}')
        target = str(tmp_path)
    proc = run_cli(target)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")


def test_scan_never_imports_heavy_packages() -> None:
    code = (
        "import sys; from mapgen.cli import main; rc = main(['scan', sys.argv[1], '-q']);"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'transformers'));"
        "print(heavy); sys.exit(rc or (3 if heavy else 0))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(REAP)], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "[]"


def test_hub_id_offline_end_to_end(tmp_path: Path) -> None:
    folder, repo = HUB_CASES["hub-qwen3.6-35b-a3b"]
    make_hf_cache(tmp_path / "hf", repo, HUB_FIXTURES / folder)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "layout.json"
    proc = run_cli(repo, "--json", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "MTP experts      packed" in proc.stdout
    assert out.read_text() == expected_scan_json("hub-qwen3.6-35b-a3b")
    missing = run_cli("Qwen/Not-Cached", env=env)
    assert missing.returncode == 1
    assert "hub.not-cached" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_json_bytes_do_not_depend_on_hash_seed() -> None:
    outs = {
        seed: run_cli(str(CORPUS / "gpt-oss-20b"), "--json", "-", env={"PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert outs["1"] == outs["2"] == expected_scan_json("gpt-oss-20b")
