"""Normal runs are quiet: no third-party warnings, load reports or progress bars of the libraries mapgen runs
(megatron-core, torch.distributed, transformers as the logits reference); ``--verbose``, anywhere on the
command line, shows them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import write

REPO = Path(__file__).resolve().parent.parent

NOISE = ("Warning", "warnings.warn", "Loading weights", "[transformers]", "is deprecated")

pytestmark = pytest.mark.distributed


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mapgen", *args], capture_output=True, text=True, cwd=REPO,
                          check=False)


def test_verify_at_tp2_prints_only_mapgen_lines_unless_verbose(tmp_path: Path) -> None:
    src = write("qwen3", tmp_path / "qwen3")
    quiet = run_cli("verify", str(src), "--tp", "2")
    assert quiet.returncode == 0, quiet.stderr
    noise = [line for line in (quiet.stdout + quiet.stderr).splitlines() if any(n in line for n in NOISE)]
    assert noise == []
    assert "logits parity vs transformers: max" in quiet.stdout
    loud = run_cli("verify", str(src), "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert any(n in loud.stderr for n in NOISE)
