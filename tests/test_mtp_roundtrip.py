"""MTP of any depth in every naming scheme, decided per block, round-tripped at TP=2 and EP=2.

Sources are synthesized (`mapgen synth`) from real or documented layouts, so every case has exactly the
source's key layout: Qwen3.5-MoE (per-expert MTP experts) and Qwen3.6-MoE (packed MTP experts) at MTP
depth 1, 2 and 4 with their vision tower carried through; a dense Qwen3 with Qwen-style MTP depth 2;
Qwen3-Next (fused gated delta-net projections) with MTP depth 2; MiMo
(`model.mtp_layers.<d>`); GLM/DeepSeek-style extra decoder layers; and the Qwen3.5 REAP layout whose
config declares MTP that the checkpoint does not have (nothing is invented on export).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime_support import CORPUS, HUB, LAYOUTS, Case, assert_case, retype, run_cases, synth

pytestmark = pytest.mark.distributed

SOURCES: dict[str, tuple[Path, tuple[str, ...]]] = {
    **{f"qwen3.5-moe-mtp{d}": (HUB / "Qwen--Qwen3.5-35B-A3B", ("--mtp-depth", str(d))) for d in (1, 2, 4)},
    **{f"qwen3.6-moe-mtp{d}": (HUB / "Qwen--Qwen3.6-35B-A3B", ("--mtp-depth", str(d))) for d in (1, 2, 4)},
    "qwen3-dense-mtp2": (LAYOUTS / "qwen3-dense-mtp", ()),
    # Qwen3-Next: fused in_proj_qkvz/in_proj_ba gated delta-nets, gated attention, MTP in the Qwen naming
    "qwen3-next-mtp2": (LAYOUTS / "qwen3-next-mtp", ("--mtp-depth", "2")),
    "mimo": (CORPUS / "mimo-7b", ()),
    "glm4-moe-extra-layer-mtp": (LAYOUTS / "glm4-moe-mtp", ()),
    "qwen3.5-reap-declared-absent": (CORPUS / "qwen3.5-25b-reap-a3b-coding", ()),
}
# transformers runs every one of these but MiMo (custom code, never executed) as a causal LM with all its
# weights present: logits parity on top of the bitwise round trip at TP=2 and EP=2.
LOGITS = set(SOURCES) - {"mimo"}
PARALLEL = {"tp2": {"tp": 2}, "ep2": {"ep": 2, "etp": 1}}


def _case_names() -> list[str]:
    return [f"{s}-{p}" for s in SOURCES for p in PARALLEL]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mtp")
    out = {name: synth(src, root / name, *args) for name, (src, args) in SOURCES.items()}
    # Real Qwen3.5/3.6 checkpoints store A_log in fp32 beside bf16 weights: the Megatron model keeps it fp32.
    mixed = synth(HUB / "Qwen--Qwen3.6-35B-A3B", root / "qwen3.6-mixed-dtype", "--mtp-depth", "1")
    assert retype(mixed, (".A_log",))
    out["qwen3.6-mixed-dtype"] = mixed
    return out


@pytest.fixture(scope="module")
def results(sources: dict[str, Path]) -> dict[str, list[dict[str, object]]]:
    cases = []
    for name, path in sources.items():
        if name == "qwen3.6-mixed-dtype":
            cases.append(Case("qwen3.6-mixed-dtype-tp2", str(path), tp=2))
            continue
        for pname, layout in PARALLEL.items():
            # dense models have no experts: their second layout is PP=2
            kw = {"tp": 1, "pp": 2} if pname == "ep2" and name in ("qwen3-dense-mtp2", "mimo") else layout
            logits = name in LOGITS and "pp" not in kw
            cases.append(Case(f"{name}-{pname}", str(path), logits=logits, **kw))
    return run_cases(cases)


@pytest.mark.parametrize("name", _case_names())
def test_round_trip(results: dict[str, list[dict[str, object]]], name: str) -> None:
    source = name.rsplit("-", 1)[0]
    dense_pp = name.endswith("ep2") and source in ("qwen3-dense-mtp2", "mimo")
    expect = "ok" if source in LOGITS and not dense_pp else "skipped"
    assert_case(results, name, logits=expect)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_mtp_depth_and_expert_storage_are_per_checkpoint(sources: dict[str, Path], depth: int) -> None:
    from mapgen.infer import scan

    a = scan(str(sources[f"qwen3.5-moe-mtp{depth}"]))
    b = scan(str(sources[f"qwen3.6-moe-mtp{depth}"]))
    for layout, storage in ((a, "per_expert"), (b, "packed")):
        assert layout.summary.mtp_depth == depth
        assert layout.summary.mtp_expert_layout == storage
        assert layout.summary.expert_layout == "per_expert"
    from mapgen.contract.fingerprint import fingerprint

    assert fingerprint(a) != fingerprint(b), "per-expert and packed MTP experts must not share a bridge"


def test_declared_but_absent_mtp_is_not_invented(sources: dict[str, Path]) -> None:
    from mapgen.infer import scan

    layout = scan(str(sources["qwen3.5-reap-declared-absent"]))
    assert layout.language_model.mtp is None
    assert layout.summary.mtp_declared >= 1
    assert any(d.code == "mtp.declared-absent" for d in layout.diagnostics)


def test_megatron_mtp_inner_spelling_is_derived_from_the_installed_megatron() -> None:
    from mapgen.runtime.megatron import detect_mtp_inner_name, mtp_inner_name

    assert mtp_inner_name() == detect_mtp_inner_name(["mtp.layers.0.transformer_layer.mlp.linear_fc2.weight"])
    assert detect_mtp_inner_name(["mtp.layers.1.mtp_model_layer.self_attention.linear_qkv.weight"]) == (
        "mtp_model_layer")


def test_mixed_source_dtypes_stay_per_tensor(results: dict[str, list[dict[str, object]]]) -> None:
    """bf16 weights with fp32 A_log: a bf16 model whose A_log parameters are fp32, bitwise both ways."""
    r0 = assert_case(results, "qwen3.6-mixed-dtype-tp2")
    assert r0["param_dtypes"] == ["torch.bfloat16", "torch.float32"]
    dtypes = r0["dtypes"]
    assert isinstance(dtypes, dict)
    assert dtypes["params_dtype"] == "bfloat16"
    overrides = dtypes["overrides"]
    assert overrides
    assert all(k.endswith("A_log") and v == "float32" for k, v in overrides.items()), overrides
