"""Every emitted bridge carries a numerical proof (issue 10, item 2): ``mapgen emit`` runs the input's tiny
transformers-written twin through the new bridge in megatron-core and through transformers (TP=1, fp32), writes
the bridge only if the logits agree, records the line (``proofs.json``, module header, ``Bridge.numerics``),
and ``convert`` refuses a bridge without it unless ``--allow-unproven-numerics``.

The emitting tests share one transformers-written tiny Qwen3 (hidden 64, 2 layers, vocab 128, fp32, 3 shards).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from emit_support import qwen3_dense_layout

from mapgen.cli import main as cli
from mapgen.contract.bridge import NO_REFERENCE, PARITY, Bridge
from mapgen.emit import pipeline
from mapgen.emit.render import header_lines
from mapgen.twin import TWIN_OPTIONS, reconcile_keys, reference_config, twin_config

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------
# The pure half: shrinking, reference choice, key reconciliation, header
# ---------------------------------------------------------------------------------------------------------
def test_twin_config_shrinks_sizes_and_keeps_every_semantic_field() -> None:
    semantic = {"hidden_act": "gelu_pytorch_tanh", "use_sliding_window": True, "rope_scaling": {"type": "yarn",
                "factor": 4.0}, "norm_topk_prob": False, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    layout = qwen3_dense_layout(6)
    layout = dataclasses.replace(layout, config={**layout.config, **semantic})
    config, shrunk = twin_config(layout)
    assert config["hidden_size"] == TWIN_OPTIONS.hidden == 64
    assert config["vocab_size"] == 128
    assert config["num_hidden_layers"] == shrunk.language_model.num_layers == 2
    for key, value in semantic.items():
        assert config[key] == value, key
    assert set(layout.config) <= set(config)  # nothing dropped


def test_twin_config_exercises_windows_and_group_routing() -> None:
    layout = qwen3_dense_layout(2)
    config = {**layout.config, "sliding_window": 4096, "n_group": 8, "topk_group": 4}
    twin, _ = twin_config(dataclasses.replace(layout, config=config))
    assert twin["sliding_window"] == 4  # shorter than the 11-token batch: the window is active
    assert (twin["n_group"], twin["topk_group"]) == (2, 1)  # 4 experts in 2 groups, routing stays group-limited
    # a DeepSeek-V2-style source whose chosen groups each give one expert (top-2 of 2 groups): kept so in the twin
    v2 = {**config, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2}
    twin_v2, _ = twin_config(dataclasses.replace(layout, config=v2))
    assert (twin_v2["n_group"], twin_v2["topk_group"]) == (4, 2)
    plain, _ = twin_config(dataclasses.replace(layout, config={**layout.config, "sliding_window": None}))
    assert plain["sliding_window"] is None


def test_reference_config_never_runs_remote_code() -> None:
    known = {"qwen3", "qwen3_5_moe_text"}.__contains__
    assert reference_config({"model_type": "qwen3"}, known) == ({"model_type": "qwen3"}, "")
    wrapper = {"model_type": "qwen3_vl", "text_config": {"model_type": "qwen3_5_moe_text"}}
    assert reference_config(wrapper, known) == ({"model_type": "qwen3_5_moe_text"}, "")
    # a wrapper whose language model has no causal-LM class: built whole, its vision tower made small
    vl = {"model_type": "qwen3_vl_moe", "text_config": {"model_type": "qwen3_vl_moe_text", "hidden_size": 64},
          "vision_config": {"depth": 27, "hidden_size": 1152, "deepstack_visual_indexes": [8, 16, 24],
                            "out_hidden_size": 2048, "patch_size": 16}}
    config, reason = reference_config(vl, known, {"qwen3_vl_moe"}.__contains__)
    assert not reason
    assert config["text_config"] == vl["text_config"]
    assert config["vision_config"] == {"depth": 2, "hidden_size": 32, "deepstack_visual_indexes": [0],
                                       "out_hidden_size": 64, "patch_size": 16}
    assert reference_config(vl, known)[1]  # without that class: no reference
    config, reason = reference_config({"model_type": "internlm2", "auto_map": {"AutoModel": "x.Y"}}, known)
    assert config == {}
    assert "'internlm2'" in reason
    assert "never executed" in reason


def test_reconcile_keys_reroots_and_names_what_differs() -> None:
    layout = qwen3_dense_layout(2)
    prefix = layout.language_model.prefix
    expected = {f"{prefix}embed_tokens.weight", "lm_head.weight"}
    plan = reconcile_keys({"model.embed_tokens.weight", "lm_head.weight"}, expected, layout, "model.")
    assert not plan.reason
    assert plan.rename["lm_head.weight"] == "lm_head.weight"
    bad = reconcile_keys({"model.layers.0.mlp.experts.gate_up_proj", "lm_head.weight"}, expected, layout, "model.")
    assert "model.layers.0.mlp.experts.gate_up_proj" in bad.reason
    lacking = reconcile_keys({"lm_head.weight"}, expected, layout, "model.")
    assert "does not save" in lacking.reason


def test_header_golden() -> None:
    parity = f"{PARITY} 5.24.0: max |diff| = 3.6e-07 (tiny twin, TP=1, fp32)"
    none = (f"{NO_REFERENCE} (transformers has no causal-LM class for model_type 'internlm2'; checkpoint code is "
            "never executed)")
    lines = header_lines("bridge_module.py.jinja", [("a", "0" * 64), ("b", "1" * 64)], [("a", parity), ("b", none)])
    assert lines == [
        "@generated by mapgen 0.1.0 -- DO NOT EDIT.",
        "template: templates/bridge_module.py.jinja",
        "inputs (sha256 of json.dumps(input, sort_keys=True)):",
        f"  inputs/a.json  {'0' * 64}",
        f"  inputs/b.json  {'1' * 64}",
        "numerical proof (each input's tiny twin through this bridge and through transformers):",
        "  inputs/a.json: logits parity vs transformers 5.24.0: max |diff| = 3.6e-07 (tiny twin, TP=1,",
        "    fp32)",
        "  inputs/b.json: no reference model: names and shapes proven, numerics not (transformers has no",
        "    causal-LM class for model_type 'internlm2'; checkpoint code is never executed)",
        "regenerate: mapgen emit --from-inputs",
    ]


def test_every_committed_bridge_has_its_proof_line() -> None:
    record = json.loads((REPO / "generated" / pipeline.PROOFS_PATH).read_text())
    assert record["transformers"]
    for name, entry in record["proofs"].items():
        assert entry["numerics"].startswith((PARITY, NO_REFERENCE)), name
    for module in sorted((REPO / "generated").glob("*.py")):
        if module.name == "__init__.py":
            continue
        text = module.read_text()
        assert "# numerical proof (each input's tiny twin" in text, module.name
        assert "numerics=" in text, module.name


def test_bridge_numerically_proven() -> None:
    from mapgen.contract.config import Facts

    bridge = Bridge("0" * 12, "x", Facts(), ())
    assert not bridge.numerically_proven
    assert dataclasses.replace(bridge, numerics=f"{PARITY} 5: max |diff| = 0").numerically_proven
    assert not dataclasses.replace(bridge, numerics=f"{NO_REFERENCE} (why)").numerically_proven


# ---------------------------------------------------------------------------------------------------------
# emit / check / convert on a transformers-written tiny model
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = transformers.Qwen3ForCausalLM(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if "norm" in name else
                    torch.randn(p.shape, generator=gen) * 0.05)
    out = tmp_path_factory.mktemp("hf") / "tiny-qwen3"
    model.save_pretrained(str(out), max_shard_size="100KB")
    assert len(list(out.glob("*.safetensors"))) >= 2
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _emitted(tmp_path: Path, src: Path) -> Path:
    out = tmp_path / "generated"
    assert cli(["emit", str(src), "--out", str(out), "--name", "tiny"]) == 0
    return out


@pytest.mark.slow
def test_emit_records_logits_parity(tiny_qwen3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _emitted(tmp_path, tiny_qwen3)
    assert f"  {PARITY} " in capsys.readouterr().out
    entry = json.loads((out / pipeline.PROOFS_PATH).read_text())["proofs"]["tiny"]
    assert entry["numerics"].startswith(PARITY)
    diff = float(entry["numerics"].split("max |diff| = ")[1].split()[0])
    assert diff <= 1e-4
    module = (out / "qwen3.py").read_text()
    assert f"#   inputs/tiny.json: {PARITY}" in module
    assert f"numerics='{PARITY}" in module

    # check trusts the record (no torch import); --reprove runs the numerical proof again
    code = ("import sys; from mapgen.cli import main; rc = main(['check', '--dir', sys.argv[1]]); "
            "print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=False)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stdout + done.stderr
    assert "0 proven now, 1 by their recorded proof" in done.stdout

    real = pipeline.default_numerics()
    runs: list[str] = []

    def counting(plan: Any, layout: Any, where: str) -> Any:
        runs.append(where)
        return real(plan, layout, where)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "default_numerics", lambda: counting)
        assert cli(["check", "--dir", str(out), "--reprove"]) == 0
        assert runs == ["inputs/tiny.json"]
        # a hand-edited record passes the cheap check but not --reprove
        path = out / pipeline.PROOFS_PATH
        record = json.loads(path.read_text())
        record["proofs"]["tiny"]["numerics"] = f"{PARITY} 5.24.0: max |diff| = 0.0e+00 (edited)"
        path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        capsys.readouterr()
        assert cli(["check", "--dir", str(out), "--reprove"]) == 1
        assert "changed:  proofs.json" in capsys.readouterr().out


def _swap_query_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken qkv op: the query groups in reverse order, on load and on save (a bitwise round trip)."""
    import torch

    from mapgen.ops import qkv

    load, save = qkv.Qkv.load, qkv.Qkv.save

    def flip(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        groups = ctx.spec.num_query_groups
        return t.reshape(groups, -1, *t.shape[1:]).flip(0).reshape(t.shape)

    monkeypatch.setattr(qkv.Qkv, "load", lambda self, ctx, shard, reader: flip(ctx, load(self, ctx, shard, reader)))
    monkeypatch.setattr(qkv.Qkv, "save", lambda self, ctx, full: save(self, ctx, flip(ctx, full)))


@pytest.mark.slow
def test_a_broken_bridge_names_the_first_divergent_layer_and_writes_nothing(
        tiny_qwen3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "generated"
    out.mkdir()
    _swap_query_groups(monkeypatch)
    assert cli(["emit", str(tiny_qwen3), "--out", str(out), "--name", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "emit.numerics-diverged" in err
    assert "first divergent: decoder layer 0 " in err
    assert "nothing was written." in err
    assert _snapshot(out) == {}


@pytest.mark.slow
def test_convert_refuses_an_unproven_bridge_unless_allowed(tiny_qwen3: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    reason = f"{NO_REFERENCE} (transformers has no causal-LM class for model_type 'qwen3'; test)"

    @dataclasses.dataclass(frozen=True)
    class NoReference:
        line: str = reason
        ok: bool = True
        problems: tuple[Any, ...] = ()

    monkeypatch.setattr(pipeline, "default_numerics", lambda: lambda plan, layout, where: NoReference())
    bridges = _emitted(tmp_path, tiny_qwen3)
    capsys.readouterr()
    ckpt = tmp_path / "mcore"
    args = ["convert", str(tiny_qwen3), str(ckpt), "--bridges", str(bridges)]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert "bridge.unproven-numerics" in err
    assert "no causal-LM class for model_type 'qwen3'" in err
    assert "--allow-unproven-numerics" in err
    assert not ckpt.exists()
    assert cli([*args, "--allow-unproven-numerics"]) == 0
    meta = json.loads((ckpt / "mapgen.json").read_text())
    assert meta["numerics"] == {"allow_unproven_numerics": True, "bridge": reason, "proven": False}
    # the acceptance travels with the checkpoint: export of it needs no second flag
    assert cli(["export", str(ckpt), str(tmp_path / "back"), "--bridges", str(bridges)]) == 0


@pytest.mark.slow
def test_a_twin_megatron_cannot_run_is_recorded_unproven(tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mapgen.infer import scan
    from mapgen.plan.planner import plan
    from mapgen.runtime import numerics

    def crash(*_: Any) -> Any:
        raise RuntimeError("no CPU kernel")

    monkeypatch.setattr(numerics, "_run", crash)
    layout = scan(str(tiny_qwen3))
    p = plan(layout)
    proof = numerics.prove_numerics(Bridge.from_rules(p.fingerprint, p.model_type, p.facts, p.rules), layout)
    assert proof.ok
    assert proof.line.startswith(NO_REFERENCE)
    assert "megatron-core cannot run the twin here: RuntimeError: no CPU kernel" in proof.line
