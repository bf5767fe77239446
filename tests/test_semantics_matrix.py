"""Issue 10's matrix: no causal-LM architecture ends "converted, logits differ" (see ``tests/semantics_matrix.py``).

CI runs a slice of four architectures (two that convert and verify at TP=2, phi3 with its fused qkv_proj; one
refused by a transformers default; one refused by model-type facts). The whole matrix, every causal-LM
architecture of the installed transformers (tens of minutes on two cores):

    MAPGEN_MATRIX=full .venv/bin/python -m pytest -m matrix tests/test_semantics_matrix.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from semantics_matrix import ATOL, SLICE, causal_lm_types, run_case, run_isolated

FULL = os.environ.get("MAPGEN_MATRIX") == "full"
EXPECTED = {
    "llama": ("verified", ""),
    # absent from a hand-written config, false in Dots1Config: sigmoid scores not renormalised, which megatron-core's
    # sigmoid router cannot do (qwen2_moe's default false now maps to pre-softmax routing: tests/test_routing.py)
    "dots1": ("refused", "norm_topk_prob"),
    "gemma": ("refused", "model_type.embedding-scale"),
    "phi3": ("verified", ""),  # fused qkv_proj ([q; k; v] blocks) and gate_up_proj
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("model_type", SLICE)
def test_slice(model_type: str, tmp_path: Path) -> None:
    case = run_case(model_type, tmp_path)
    assert case.outcome != "LOGITS-DIFFER", case.row()
    outcome, detail = EXPECTED[model_type]
    assert case.outcome == outcome, case.row()
    assert detail in case.detail, case.row()
    if outcome == "verified":
        assert case.max_diff is not None
        assert case.max_diff <= ATOL


@pytest.mark.slow
@pytest.mark.matrix
@pytest.mark.skipif(not FULL, reason="the full matrix runs with MAPGEN_MATRIX=full (see the module docstring)")
@pytest.mark.parametrize("model_type", causal_lm_types() if FULL else ["(all)"])
def test_full_matrix(model_type: str, tmp_path: Path) -> None:
    case = run_isolated(model_type, tmp_path)
    assert case.outcome != "LOGITS-DIFFER", case.row()
