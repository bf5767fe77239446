"""LoRA adapters end to end (issue 13): PEFT adapters made by peft on tiny transformers models, imported to
Megatron adapters at TP=2 / EP=2 / PP=2, exported back bitwise, merged, and proven by logits.

* ``test_round_trip_cli``: ``mapgen adapter import`` at each layout, then ``mapgen adapter export``: the PEFT
  directory comes back byte-identical in its tensors and equal in its config.
* ``test_merge_matches_peft``: ``mapgen merge`` writes the base's exact layout (keys, dtypes, shard files) and
  its tensors equal peft's own ``merge_and_unload`` (fp32, 1e-6); ``--megatron`` writes a dist checkpoint.
* ``test_proof`` (distributed): ``verify_adapter`` -- logits of transformers+peft, of the merged HF checkpoint,
  of megatron-core with the adapter merged from its TP/EP/PP pieces (its own forward at PP=1; exported to HF
  and run in transformers at every layout) agree within 1e-4 while the adapter moves the logits by far more;
  the round trip inside it is bitwise. The default run covers dense Qwen3 (TP=2, PP=2) and the Qwen3.5-MoE
  hybrid (TP=2, EP=2); ``MAPGEN_MATRIX=full`` adds Qwen3-MoE (TP=2 with ETP=2, too) and Mixtral at TP=2 EP=2, a
  grouped expert adapter at EP=2, the hybrid at PP=2, dense Qwen3 at TP=1 and a bf16 Qwen3 at TP=2.
* ``test_grouped_expert_adapter_exports_per_expert``: a Megatron adapter with one grouped (all-experts)
  adapter per layer exports to per-expert PEFT adapters that peft loads, with logits equal to the merge.
* ``test_bad_inputs``: specific errors, nothing written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from mapgen.cli import main as mapgen_main
from tests.lora_support import write_adapter, write_base
from tests.runtime_support import HUB, synth

peft = pytest.importorskip("peft")

FULL = os.environ.get("MAPGEN_MATRIX") == "full"
MOE_PARAMS = ["mlp.experts.gate_up_proj", "mlp.gate.weight", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """family -> (base, PEFT adapter dir): one tiny model per family, one adapter each (all linear modules)."""
    root = tmp_path_factory.mktemp("lora")
    out = {}
    q3 = write_base("qwen3", root / "qwen3")
    out["qwen3"] = (q3, write_adapter(q3, root / "qwen3-ad"))
    q35 = synth(HUB / "Qwen--Qwen3.6-35B-A3B", root / "qwen3.6", "--mtp-depth", "1", "--dtype", "fp32")
    out["qwen3.6"] = (q35, write_adapter(q35, root / "qwen3.6-ad", target_parameters=MOE_PARAMS))
    q3m = write_base("qwen3-moe", root / "qwen3-moe")
    out["qwen3-moe"] = (q3m, write_adapter(q3m, root / "qwen3-moe-ad"))
    if FULL:
        mx = write_base("mixtral", root / "mixtral")
        out["mixtral"] = (mx, write_adapter(mx, root / "mixtral-ad"))
        from tests.tiny import write as write_bf16

        qb = write_bf16("qwen3", root / "qwen3-bf16")  # bf16, as real checkpoints are stored
        out["qwen3-bf16"] = (qb, write_adapter(qb, root / "qwen3-bf16-ad"))
    return out


def _files(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors")), json.loads((d / "adapter_config.json").read_text())


@pytest.mark.parametrize(("family", "layout"), [("qwen3", ["--tp", "2"]), ("qwen3", ["--pp", "2"]),
                                                ("qwen3", ["--tp", "2", "--canonical"]),
                                                ("qwen3-moe", ["--ep", "2", "--canonical"]),
                                                ("qwen3.6", ["--tp", "2", "--ep", "2", "--pp", "2"])])
def test_round_trip_cli(models: dict[str, tuple[Path, Path]], tmp_path: Path, family: str,
                        layout: list[str]) -> None:
    base, adapter = models[family]
    meg, back = tmp_path / "meg", tmp_path / "back"
    assert mapgen_main(["adapter", "import", str(adapter), str(meg), "--base", str(base), *layout]) == 0
    meta = json.loads((meg / "adapter_meta.json").read_text())
    assert meta["parallel"]["pp"] == (2 if "--pp" in layout else 1)
    keys = {k for f in meg.glob("pp*/*.safetensors") for k in _st_keys(f)}
    assert all(k.endswith(("linear_in.weight", "linear_out.weight")) for k in keys)
    canonical = {k for k in keys if ".adapter.adapter_" in k}
    assert bool(canonical) == ("--canonical" in layout)
    if canonical:  # Megatron-Bridge's CanonicalLoRA names: separate q/k/v and gate/up adapters
        assert any(".linear_qkv.adapter.adapter_k.linear_in.weight" in k for k in keys)
        assert any(".linear_fc1.adapter.adapter_up.linear_out.weight" in k for k in keys)
    assert mapgen_main(["adapter", "export", str(meg), str(back), "--base", str(base)]) == 0
    (want, want_cfg), (got, got_cfg) = _files(adapter), _files(back)
    assert sorted(want) == sorted(got)
    for k in want:
        assert want[k].dtype == got[k].dtype, k
        assert torch.equal(want[k], got[k]), k
    assert got_cfg == want_cfg


def _st_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_merge_matches_peft(models: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    import transformers
    from safetensors.torch import load_file

    base, adapter = models["qwen3"]
    out = tmp_path / "merged"
    assert mapgen_main(["merge", str(out), "--adapter", str(adapter), "--base", str(base)]) == 0
    want_index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    got_index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert got_index == want_index  # same names, same shard files
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()
    changed = 0
    for shard in sorted(set(got_index.values())):
        got, src = load_file(str(out / shard)), load_file(str(base / shard))
        for k, t in got.items():
            assert t.dtype == src[k].dtype
            torch.testing.assert_close(t, ref[k], rtol=0, atol=1e-6)
            changed += int(not torch.equal(t, src[k]))
    assert changed == 14  # every adapted linear weight of the 2 layers, nothing else
    meg_out = tmp_path / "merged-meg"
    assert mapgen_main(["merge", str(meg_out), "--adapter", str(adapter), "--base", str(base), "--megatron",
                        "--tp", "2"]) == 0
    hf_back = tmp_path / "merged-meg-hf"
    assert mapgen_main(["export", str(meg_out), str(hf_back), "--source", str(out)]) == 0
    from mapgen.runtime.api import compare_checkpoints

    assert compare_checkpoints(out, hf_back).mismatches == []  # the dist checkpoint holds exactly the merge


def _grouped_adapter(base: Path, out: Path) -> Path:
    """A Megatron adapter with one grouped adapter per MoE layer (Megatron-Bridge's grouped MLP with
    share_expert_adapters) plus an attention adapter, written at EP=2."""
    from mapgen.cli._io import write_tree_atomically
    from mapgen.lora.plan import MegatronAdapter, MegatronLora
    from mapgen.runtime.adapters import megatron_tree, open_base
    from mapgen.runtime.api import Parallel

    source, binding, _ = open_base(base)
    spec = binding.spec
    gen = torch.Generator().manual_seed(5)
    r, h, inter = 4, spec.hidden_size, int(spec.moe_ffn_hidden_size or 0)
    modules = {}
    for layer in range(spec.num_layers):
        root = f"decoder.layers.{layer}"
        modules[f"{root}.mlp.experts.linear_fc1"] = MegatronLora(
            torch.randn(r, h, generator=gen) * 0.05, torch.randn(2 * inter, r, generator=gen) * 0.05, 8.0,
            grouped=True)
        modules[f"{root}.mlp.experts.linear_fc2"] = MegatronLora(
            torch.randn(r, inter, generator=gen) * 0.05, torch.randn(h, r, generator=gen) * 0.05, 8.0, grouped=True)
    meg = MegatronAdapter(modules, {"dropout": 0.0})
    write_tree_atomically(out, megatron_tree(meg, binding, source, Parallel(ep=2), 2), replace_existing=False)
    return out


def test_grouped_expert_adapter_exports_per_expert(models: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    import transformers

    from mapgen.runtime.verify import fixed_batch

    base, _ = models["qwen3-moe"]
    meg = _grouped_adapter(base, tmp_path / "grouped")
    out, merged = tmp_path / "peft", tmp_path / "merged"
    assert mapgen_main(["adapter", "export", str(meg), str(out), "--base", str(base)]) == 0
    assert mapgen_main(["merge", str(merged), "--adapter", str(meg), "--base", str(base)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["gate_up_proj", "down_proj"]
    ids = fixed_batch(160)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        pm = peft.PeftModel.from_pretrained(model, str(out))
        got = pm(input_ids=ids).logits
        want = transformers.AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)(input_ids=ids).logits
    assert float((got - want).abs().max()) <= 1e-4
    assert float((plain - want).abs().max()) > 1e-3  # the adapter matters


def _proof_cases(models: dict[str, tuple[Path, Path]], grouped: Path) -> list[tuple[str, str, str, int, int, int]]:
    """(name, base, adapter, TP, EP, PP)."""
    cases = [("qwen3-tp2", *map(str, models["qwen3"]), 2, 1, 1),
             ("qwen3-pp2", *map(str, models["qwen3"]), 1, 1, 2),
             ("qwen3.6-tp2-ep2", *map(str, models["qwen3.6"]), 2, 2, 1)]
    if FULL:
        cases += [("qwen3-moe-grouped-ep2", str(models["qwen3-moe"][0]), str(grouped), 1, 2, 1),
                  ("qwen3-tp1", *map(str, models["qwen3"]), 1, 1, 1),
                  ("qwen3.6-pp2", *map(str, models["qwen3.6"]), 1, 1, 2),
                  ("qwen3-moe-tp2-ep2", *map(str, models["qwen3-moe"]), 2, 2, 1),
                  ("qwen3-moe-tp2-etp2", *map(str, models["qwen3-moe"]), 2, 1, 1),
                  ("mixtral-tp2-ep2", *map(str, models["mixtral"]), 2, 2, 1),
                  ("qwen3-bf16-tp2", *map(str, models["qwen3-bf16"]), 2, 1, 1)]
    return cases


def _prove(cases: list[tuple[str, str, str, int, int, int]]) -> dict[str, Any]:
    from mapgen.runtime.adapters import verify_adapter
    from mapgen.runtime.api import Parallel

    return {name: verify_adapter(base, ad, Parallel(tp=tp, ep=ep, pp=pp)) for name, base, ad, tp, ep, pp in cases}


@pytest.mark.distributed
@pytest.mark.slow
def test_proof(models: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    from mapgen.runtime.api import spawn

    grouped = _grouped_adapter(models["qwen3-moe"][0], tmp_path / "grouped")
    cases = _proof_cases(models, grouped)
    results = spawn(_prove, 2, cases)[0]
    for name, *_ in cases:
        r = results[name]
        assert r["round_trip"]["mismatches"] == [], (name, r["round_trip"]["mismatches"][:5])
        assert r["merged_params"] > 0
        assert r["merged_hf"]["max_abs"] <= 1e-4, (name, r["merged_hf"])
        if "pp2" not in name:  # megatron-core's own forward runs at PP=1; the export proves every layout
            assert r["megatron"]["max_abs"] <= 1e-4, (name, r["megatron"])
        assert r["megatron_export"]["max_abs"] <= 1e-4, (name, r["megatron_export"])
        assert r["adapter_effect"] > 1e-3, (name, r["adapter_effect"])


def _bad(tmp_path: Path, adapter: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> str:
    out = tmp_path / "out"
    assert mapgen_main(["adapter", "import", str(adapter), str(out), "--base", str(base), "--tp", "2"]) != 0
    assert not out.exists()
    return capsys.readouterr().err


def _copy_adapter(src: Path, dst: Path, *, config: dict[str, Any] | None = None,
                  rename: tuple[str, str] | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    if rename:
        tensors = {k.replace(*rename): v for k, v in tensors.items()}
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def test_bad_inputs(models: dict[str, tuple[Path, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q3, q3_ad = models["qwen3"]
    q3m, _ = models["qwen3-moe"]
    # an adapter for another base: the dense adapter on the MoE base (its MLP modules do not exist there)
    err = _bad(tmp_path, q3_ad, q3m, capsys)
    assert "adapter.unknown-module" in err
    assert "mlp.gate_proj" in err
    # shapes of another base: the MoE model's attention adapter fits, but a wider hidden size would not
    wide = _copy_adapter(q3_ad, tmp_path / "wide")
    from safetensors.torch import load_file, save_file

    t = load_file(str(wide / "adapter_model.safetensors"))
    t = {k: (torch.cat([v, v], dim=1) if "lora_A" in k else v) for k, v in t.items()}
    save_file(t, str(wide / "adapter_model.safetensors"))
    assert "adapter.shape-mismatch" in _bad(tmp_path, wide, q3, capsys)
    # missing adapter_config.json
    nocfg = _copy_adapter(q3_ad, tmp_path / "nocfg")
    (nocfg / "adapter_config.json").unlink()
    assert "adapter.missing-config" in _bad(tmp_path, nocfg, q3, capsys)
    # an unknown target module
    unknown = _copy_adapter(q3_ad, tmp_path / "unknown", rename=(".self_attn.q_proj.", ".self_attn.q_norm_proj."))
    assert "adapter.unknown-module" in _bad(tmp_path, unknown, q3, capsys)
    # DoRA and other PEFT types
    dora = _copy_adapter(q3_ad, tmp_path / "dora", config={"use_dora": True})
    err = _bad(tmp_path, dora, q3, capsys)
    assert "adapter.unsupported-option" in err
    assert "DoRA" in err
    ia3 = _copy_adapter(q3_ad, tmp_path / "ia3", config={"peft_type": "IA3"})
    assert "adapter.unsupported-type" in _bad(tmp_path, ia3, q3, capsys)
    # a Megatron adapter exported against another base
    meg = tmp_path / "meg"
    assert mapgen_main(["adapter", "import", str(q3_ad), str(meg), "--base", str(q3), "--tp", "2"]) == 0
    assert mapgen_main(["adapter", "export", str(meg), str(tmp_path / "e"), "--base", str(q3m)]) != 0
    assert "adapter.wrong-base" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    # and nothing is written by export / merge either
    assert mapgen_main(["merge", str(tmp_path / "m"), "--adapter", str(dora), "--base", str(q3)]) != 0
    assert not (tmp_path / "m").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_rank_pattern(models: dict[str, tuple[Path, Path]], tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    """Different ranks with one scale fuse exactly (block form, rank_pattern kept); different scales are refused."""
    base, _ = models["qwen3"]
    ad = write_adapter(base, tmp_path / "ranks", rank_pattern={"q_proj": 8, "down_proj": 2},
                       alpha_pattern={"q_proj": 16, "down_proj": 4}, shared_layer=None)
    meg, back = tmp_path / "meg", tmp_path / "back"
    assert mapgen_main(["adapter", "import", str(ad), str(meg), "--base", str(base), "--tp", "2"]) == 0
    modules = json.loads((meg / "adapter_meta.json").read_text())["modules"]
    qkv = modules["decoder.layers.0.self_attention.linear_qkv"]
    assert (qkv["form"], qkv["dim"], qkv["alpha"]) == ("block", 16, 32.0)  # 8 + 4 + 4 rows of A, scale 2
    assert mapgen_main(["adapter", "export", str(meg), str(back), "--base", str(base)]) == 0
    (want, want_cfg), (got, got_cfg) = _files(ad), _files(back)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert got_cfg == want_cfg
    mixed = write_adapter(base, tmp_path / "mixed", rank_pattern={"q_proj": 8}, shared_layer=None)
    err = _bad(tmp_path, mixed, base, capsys)
    assert "adapter.mixed-scales" in err
