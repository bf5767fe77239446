"""Every committed bridge is exercised: a tiny checkpoint with its layout (synthesized from the stored
input in generated/inputs/) converts HF -> Megatron -> HF bitwise at TP=2 through the registry, and, where
transformers runs the architecture as a causal LM with all its weights, matches its logits."""

from __future__ import annotations

import pytest

from tests.runtime_support import REPO, Case, assert_case, run_cases, synth

pytestmark = pytest.mark.distributed

INPUTS = sorted((REPO / "generated" / "inputs").glob("*.json"))
# Where transformers has no causal-LM class for the layout the round trip still runs and logits are
# reported as skipped: MiMo needs checkpoint code (never executed); Qwen3-VL-MoE is only a
# conditional-generation model in transformers (AutoModelForCausalLM refuses its config); stable-code-3b's
# stablelm_epoch is checkpoint code (its transformers port, stablelm, verifies in the semantics matrix slice);
# Baichuan is checkpoint code too (no transformers class). LLaVA-1.5's LlavaLlamaForCausalLM is checkpoint code
# (a Llama with stored RoPE buffers: tests/test_breadth.py).
# Qwen2.5-VL: synth writes its vision tower with placeholder shapes, which transformers' model refuses to load
# (its text model's M-RoPE is verified against transformers in tests/test_dense_semantics.py).
NO_LOGITS = {"internlm2-chat-7b-intermind", "mimo-7b", "qwen3-vl-30b-a3b", "baichuan-7b",  # no transformers class
             "stable-code-3b-stablelm", "llava-v1.5-7b", "qwen2.5-vl-7b-instruct"}
# megatron-core builds biased experts (gpt-oss) at expert-TP 1 only: their experts stay whole on each TP rank
EXPERT_TP_1 = {"tiny-gpt-oss", "gpt-oss-20b-bf16", "gpt-oss-20b"}
# MXFP4 packs groups of 32 values: synth's default widths would not divide (it refuses them by name)
SYNTH_ARGS = {"gpt-oss-20b": ("--hidden", "64", "--intermediate", "64", "--head-dim", "16", "--vocab", "128")}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, object]]]:
    root = tmp_path_factory.mktemp("generated")
    cases = []
    for path in INPUTS:
        src = synth(path, root / path.stem, *SYNTH_ARGS.get(path.stem, ()))
        cases.append(Case(path.stem, str(src), tp=2, etp=1 if path.stem in EXPERT_TP_1 else None,
                          logits=path.stem not in NO_LOGITS))
    return run_cases(cases)


def test_every_bridge_has_an_input() -> None:
    import mapgen_bridges as generated

    assert INPUTS
    assert len(generated.BRIDGES) <= len(INPUTS)


@pytest.mark.parametrize("name", [p.stem for p in INPUTS])
def test_bridge_round_trip(results: dict[str, list[dict[str, object]]], name: str) -> None:
    assert_case(results, name, logits="skipped" if name in NO_LOGITS else "ok")
