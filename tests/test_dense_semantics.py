"""Dense-model semantics (issue 10): activations, sliding windows, NoPE layers, M-RoPE, the attention scale.

Each case is a tiny fp32 model written by transformers itself (its own config class, perturbed weights, several
shard files), emitted into a temporary bridge directory and run through the real ``verify`` at TP=2: bitwise
round trip plus logits parity with transformers (<= 1e-4). A parity check proves nothing when the setting does
not change the logits, so every case also shows that transformers' logits move by more than ``MOVES`` when the
setting is switched off on the same weights (the window cuts the 11-token verify batch, the NoPE layer differs
from a RoPE one, ...). Granite's multipliers megatron-core cannot express are refused by name before anything is
written.

CI runs one case per mapped setting; ``MAPGEN_MATRIX=full`` adds the other variants (tied/untied, window off,
every mapped activation, Qwen2.5-VL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mapgen.runtime.verify import fixed_batch
from tests import tiny
from tests.runtime_support import Case, assert_case, run_cases

FULL = os.environ.get("MAPGEN_MATRIX") == "full"
MOVES = 1e-3  # switching the setting off must move transformers' logits by more than this
SEQ = 11  # mapgen.runtime.verify.fixed_batch's sequence length: the windows below must be shorter
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}


def _vl_text(sections: list[int]) -> dict[str, Any]:
    return {**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections}}


# name -> (config class, config kwargs, the same model with the setting off, the ModelSpec fields it must set)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "mistral-window": ("MistralConfig", {"sliding_window": 4, "head_dim": 16, "tie_word_embeddings": False},
                       {"sliding_window": None}, {"window_size": 4, "window_layers": (True, True)}),
    "qwen2-max-window-layers": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 3,
                                                "max_window_layers": 1, "tie_word_embeddings": True},
                                {"use_sliding_window": False, "layer_types": None},
                                {"window_size": 3, "window_layers": (False, True)}),
    "llama-gelu-tanh": ("LlamaConfig", {"hidden_act": "gelu_pytorch_tanh", "head_dim": 16},
                        {"hidden_act": "silu"}, {"activation": "gelu_tanh"}),
    "smollm3-nope": ("SmolLM3Config", {"no_rope_layers": [1, 0], "tie_word_embeddings": True, "pad_token_id": 0},
                     {"no_rope_layers": [1, 1]}, {"no_rope_layers": (False, True)}),
    "qwen2-vl-text": ("Qwen2VLConfig", {"text_config": _vl_text([2, 3, 3])}, {},
                      {"position_embedding_type": "mrope", "mrope_section": (2, 3, 3)}),
    "granite-attention-scale": ("GraniteConfig", {"attention_multiplier": 0.5, "tie_word_embeddings": False},
                                {"attention_multiplier": 0.25}, {"softmax_scale": 0.5}),  # 0.25: 1/sqrt(head_dim)
}
HEAVY: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "mistral-window-tied": ("MistralConfig", {"sliding_window": 5, "tie_word_embeddings": True},
                            {"sliding_window": None}, {"window_size": 5}),
    "mistral-no-window": ("MistralConfig", {"sliding_window": None}, {}, {"window_size": None}),
    "qwen2-window-off": ("Qwen2Config", {"use_sliding_window": False, "sliding_window": 3, "max_window_layers": 0},
                         {}, {"window_size": None, "window_layers": ()}),
    "qwen2-all-windowed-untied": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 2,
                                                  "max_window_layers": 0, "tie_word_embeddings": False},
                                  {"use_sliding_window": False, "layer_types": None},
                                  {"window_size": 2, "window_layers": (True, True)}),
    "smollm3-nope-window": ("SmolLM3Config", {"no_rope_layers": [0, 1], "use_sliding_window": True,
                                              "sliding_window": 3, "tie_word_embeddings": False, "pad_token_id": 0},
                            {"use_sliding_window": False, "layer_types": None},
                            {"no_rope_layers": (True, False), "window_layers": (True, False)}),
    "qwen2-5-vl-text": ("Qwen2_5_VLConfig", {"text_config": _vl_text([4, 2, 2])}, {},
                        {"position_embedding_type": "mrope", "mrope_section": (4, 2, 2)}),
    **{f"llama-{act}": ("LlamaConfig", {"hidden_act": act, "head_dim": 16}, {"hidden_act": "silu"}, {})
       for act in ("gelu", "gelu_new", "gelu_fast", "relu", "relu2", "quick_gelu")},
}
SELECTED = {**CASES, **(HEAVY if FULL else {})}


def _write(cls_name: str, kwargs: dict[str, Any], out: Path) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    cls = getattr(transformers, cls_name)
    if "text_config" in kwargs:  # a vision-language wrapper: a one-block vision tower, text-only batches
        vision = {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "out_hidden_size": 64,
                  "intermediate_size": 64}
        config = cls(text_config=kwargs["text_config"], vision_config=vision, image_token_id=120, video_token_id=121,
                     vision_start_token_id=122)
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    else:
        config = cls(**{**TINY, **kwargs})
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tiny._randomise(model, seed=0)  # perturbed: no two tensors equal, norms in [0.5, 1.5]
    model.save_pretrained(str(out), max_shard_size="60KB")
    assert len(list(out.glob("*.safetensors"))) >= 2


def _logits(root: Path, off: dict[str, Any] | None = None) -> torch.Tensor:
    """transformers' logits on the verify batch; with ``off``, of the same weights under a config.json with those
    keys changed (a key set to None is removed, so the config class derives it again)."""
    import transformers

    if off:
        twin = root.parent / f"{root.name}-off"
        twin.mkdir(exist_ok=True)
        for f in root.iterdir():
            if f.name != "config.json" and not (twin / f.name).exists():
                (twin / f.name).symlink_to(f)
        config = {k: v for k, v in {**json.loads((root / "config.json").read_text()), **off}.items() if v is not None}
        (twin / "config.json").write_text(json.dumps(config))
        root = twin
    model = transformers.AutoModelForCausalLM.from_pretrained(str(root), dtype=torch.float32,
                                                              attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=fixed_batch(128), use_cache=False).logits
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from mapgen.cli import main as mapgen_main

    root = tmp_path_factory.mktemp("dense")
    sources = {}
    for name, (cls_name, kwargs, _, _) in SELECTED.items():
        sources[name] = root / name
        _write(cls_name, kwargs, sources[name])
    # Qwen2 without layer_types: the windowed layers come from max_window_layers, as in hub configs
    for name in ("qwen2-max-window-layers", "qwen2-all-windowed-untied", "qwen2-window-off"):
        if name in sources:
            path = sources[name] / "config.json"
            config = json.loads(path.read_text())
            config.pop("layer_types", None)
            path.write_text(json.dumps(config, indent=2))
    bridges = root / "bridges" / "generated"
    assert mapgen_main(["emit", *map(str, sources.values()), "--out", str(bridges)]) == 0
    return {"sources": sources, "bridges": bridges}


@pytest.fixture(scope="module")
def results(built: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    os.environ["MAPGEN_BRIDGES"] = str(built["bridges"])  # the spawned workers inherit it
    try:
        return run_cases([Case(name, str(src), tp=2) for name, src in built["sources"].items()])
    finally:
        os.environ.pop("MAPGEN_BRIDGES", None)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(SELECTED))
def test_tp2_round_trip_and_logits_match_transformers(results: dict[str, Any], name: str) -> None:
    assert_case(results, name)


@pytest.mark.parametrize("name", list(SELECTED))
def test_the_setting_is_mapped_and_changes_the_logits(built: dict[str, Any], name: str) -> None:
    """The bridge's ModelSpec carries the setting, and the setting matters on the verify batch."""
    from mapgen.runtime.api import HFSource, bind
    from mapgen.runtime.megatron_args import ArgsError, canonical, megatron_args, spec_from_args

    root = built["sources"][name]
    os.environ["MAPGEN_BRIDGES"] = str(built["bridges"])
    try:
        spec = bind(HFSource.open(str(root)).layout).spec
    finally:
        os.environ.pop("MAPGEN_BRIDGES", None)
    _, _, off, fields = SELECTED[name]
    for field, want in fields.items():
        assert getattr(spec, field) == want, (field, getattr(spec, field))
    if off:
        moved = float((_logits(root) - _logits(root, off)).abs().max())
        assert moved > MOVES, f"{name}: switching {off} off moves the logits by only {moved:.2g}"
    # the Megatron-LM arguments written beside the checkpoint build the same model, or say why they cannot
    if spec.softmax_scale is not None or spec.activation not in ("silu", "quick_gelu"):
        with pytest.raises(ArgsError, match="no Megatron-LM flag"):
            megatron_args(spec)
    else:
        assert spec_from_args(megatron_args(spec))[0] == canonical(spec)


def test_windows_are_shorter_than_the_verify_batch() -> None:
    assert fixed_batch(128).shape[1] == SEQ
    for _, kwargs, _, fields in SELECTED.values():
        if fields.get("window_size"):
            assert kwargs["sliding_window"] < SEQ


@pytest.mark.parametrize(("changes", "refused"), [
    ({"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0,
      "attention_multiplier": 0.015625}, ("embedding_multiplier", "residual_multiplier", "logits_scaling")),
    ({"embedding_multiplier": 12.0}, ("embedding_multiplier",)),
])
def test_granite_multipliers_are_refused_by_name(tmp_path: Path, changes: dict[str, Any],
                                                 refused: tuple[str, ...]) -> None:
    """megatron-core has no embedding, residual or logits multiplier: emit names each and writes nothing;
    ``--accept-semantic-gap`` converts anyway and says so."""
    src = tmp_path / "granite"
    _write("GraniteConfig", changes, src)
    out = tmp_path / "gen"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("MAPGEN_BRIDGES", None)
    proc = subprocess.run([sys.executable, "-m", "mapgen", "emit", str(src), "--out", str(out)], capture_output=True,
                          text=True, env=env, check=False, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for key in refused:
        assert f"error: semantics.unsupported: {key} = " in proc.stderr, proc.stderr
    assert "attention_multiplier" not in proc.stderr  # that one megatron-core expresses (softmax_scale)
    assert not out.exists()
    gaps = [a for key in refused for a in ("--accept-semantic-gap", key)]
    proc = subprocess.run([sys.executable, "-m", "mapgen", "scan", str(src), "-q", *gaps], capture_output=True,
                          text=True, env=env, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("semantics.gap-accepted") == len(refused)


def test_cpu_window_mask_is_transformers_window() -> None:
    """The CPU shim's mask for megatron-core's ``window_size=(w - 1, 0)`` keeps exactly transformers' window:
    key j is visible from query i iff ``i - w < j <= i``."""
    from mapgen.runtime._cpu import _sliding_window_mask

    for w in (1, 2, 4, 11):
        masked = _sliding_window_mask(SEQ, SEQ, (w - 1, 0))
        want = torch.tensor([[not (i - w < j <= i) for j in range(SEQ)] for i in range(SEQ)])
        assert torch.equal(masked, want), w


@pytest.mark.parametrize(("config", "window", "layers"), [
    ({"model_type": "mistral", "sliding_window": 4}, 4, (True, True, True, True)),
    ({"model_type": "mistral", "sliding_window": None}, None, ()),
    ({"model_type": "qwen2", "sliding_window": 4, "max_window_layers": 1}, None, ()),  # use_sliding_window: false
    ({"model_type": "qwen2", "sliding_window": 4, "use_sliding_window": True, "max_window_layers": 2}, 4,
     (False, False, True, True)),
    ({"model_type": "qwen2_moe", "sliding_window": 4, "use_sliding_window": True, "max_window_layers": 3}, 4,
     (True, False, True, False)),
    ({"model_type": "smollm3", "sliding_window": 4, "use_sliding_window": True, "no_rope_layer_interval": 2}, 4,
     (False, True, False, True)),
    ({"model_type": "cwm", "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"] * 2}, 4,
     (True, False, True, False)),
])
def test_window_layers_follow_each_config_class(config: dict[str, Any], window: int | None,
                                                layers: tuple[bool, ...]) -> None:
    from mapgen.contract.hf_config import HFConfig, window_layers, window_size

    hf = HFConfig({"num_hidden_layers": 4, **config})
    assert (window_size(hf), window_layers(hf)) == (window, layers)


def test_unknown_window_gate_is_an_error_not_a_guess() -> None:
    from mapgen.contract.hf_config import HFConfig, window_layers
    from mapgen.errors import MapgenError

    hf = HFConfig({"model_type": "mimo", "num_hidden_layers": 2, "sliding_window": 4, "use_sliding_window": True})
    with pytest.raises(MapgenError) as exc:
        window_layers(hf)
    assert exc.value.diagnostics[0].code == "config.unsupported-window"


def test_interleaved_mrope_builds_plain_rope() -> None:
    """Qwen3-VL/Qwen3.5's interleaved M-RoPE equals RoPE on text; megatron-core 0.16.1 has no interleaved M-RoPE."""
    from mapgen.contract.hf_config import HFConfig, mrope_section, position_embedding_type

    rope = {"rope_type": "default", "mrope_section": [2, 3, 3]}
    assert position_embedding_type(HFConfig({"rope_parameters": rope})) == "mrope"
    assert mrope_section(HFConfig({"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}})) == (2, 3, 3)
    assert position_embedding_type(HFConfig({"rope_parameters": {**rope, "mrope_interleaved": True}})) == "rope"


@pytest.mark.parametrize(("activation", "gated", "flags"), [
    ("silu", True, ["--swiglu"]), ("quick_gelu", True, ["--quick-geglu", "--no-bias-gelu-fusion"]),
    ("relu2", False, ["--squared-relu", "--no-bias-gelu-fusion"]), ("gelu", False, []),
])
def test_megatron_lm_arguments_carry_the_dense_settings(activation: str, gated: bool, flags: list[str]) -> None:
    from mapgen.contract.spec import ModelSpec
    from mapgen.runtime.megatron_args import canonical, megatron_args, spec_from_args

    spec = ModelSpec(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                     ffn_hidden_size=96, vocab_size=128, activation=activation, gated_linear_unit=gated,  # type: ignore[arg-type]
                     window_size=4, window_layers=(True, False), no_rope_layers=(False, True),
                     position_embedding_type="mrope", mrope_section=(2, 3, 3))
    argv = megatron_args(spec)
    for flag in flags:
        assert flag in argv
    text = " ".join(argv)
    assert "--window-size 3,0 --window-attn-skip-freq [1,0]" in text
    assert "--no-rope-freq [0,1]" in text
    assert "--position-embedding-type mrope" in text
    assert "--mrope-section 2 3 3" in text
    assert spec_from_args(argv)[0] == canonical(spec)


def test_partial_patterns_with_mtp_layers_are_refused_by_name() -> None:
    """megatron-core numbers MTP layers past num_layers and indexes the per-layer window / NoPE lists with that
    number: a pattern on some layers only is config.unsupported-pattern, not an IndexError while building."""
    from mapgen.contract.config import model_spec
    from mapgen.contract.hf_config import HFConfig
    from mapgen.errors import MapgenError
    from mapgen.ir import layout_from_json
    from mapgen.plan.planner import plan

    path = Path(__file__).resolve().parent.parent / "generated" / "inputs" / "qwen3-dense-mtp.json"
    layout = layout_from_json(path.read_text(encoding="utf-8"))
    facts = plan(layout).facts
    config = {k: v for k, v in layout.config.items() if k != "layer_types"}  # windows from max_window_layers
    windows = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": config["num_hidden_layers"] - 1}
    with pytest.raises(MapgenError) as exc:
        model_spec(HFConfig({**config, **windows}), layout, facts)
    assert exc.value.diagnostics[0].code == "config.unsupported-pattern"
    every = model_spec(HFConfig({**config, **windows, "max_window_layers": 0}), layout, facts)
    assert every.window_size == 4
    assert all(every.window_layers)
