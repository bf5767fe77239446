"""Qwen3-Next (issue 12): a transformers-written tiny ``qwen3_next`` (gated DeltaNet layers with the fused
``in_proj_qkvz`` / ``in_proj_ba``, gated full attention, a shared expert, MoE) -> ``mapgen emit`` proves names and
logits on its twin -> ``verify`` round-trips bitwise with logits parity against transformers at TP=2, EP=2 and
TP=2 x EP=2 (ETP=1), one set of workers for the three layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
from semantics_matrix import build

from mapgen.cli import main as mapgen_main
from tests.runtime_support import Case, assert_case, run_cases

LAYOUTS = {"tp2": {"tp": 2}, "ep2": {"ep": 2, "etp": 1}, "tp2ep2": {"tp": 2, "ep": 2, "etp": 1}}


@pytest.mark.slow
@pytest.mark.distributed
def test_qwen3_next_verifies_at_tp2_ep2_and_tp2xep2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "qwen3-next"
    build("qwen3_next", source)
    bridges = tmp_path / "generated"
    assert mapgen_main(["emit", str(source), "--out", str(bridges)]) == 0
    assert "logits parity vs transformers" in (bridges / "qwen3_next.py").read_text()
    capsys.readouterr()
    monkeypatch.setenv("MAPGEN_BRIDGES", str(bridges))  # the spawned workers find the new bridge
    results = run_cases([Case(name, str(source), **par) for name, par in LAYOUTS.items()])
    for name in LAYOUTS:
        assert_case(results, name)
