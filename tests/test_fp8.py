"""Block-scaled FP8 checkpoints (DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8 releases), imported exactly.

The reference is transformers: a tiny Qwen3 written by transformers, quantized here to ``float8_e4m3fn`` +
``weight_scale_inv`` with an independent per-tile quantizer (amax / 448, the releases' recipe). Then:

* scan: ``quantization: fp8_block``, no unclassified key, the fingerprint of the unquantized layout (the bridge
  is shared);
* import = transformers' own dequantization (``Fp8Dequantize``) bit for bit, in bf16;
* ``verify --tp 2``: the ``--quantize`` round trip reproduces every source tensor byte for byte (weights and
  scales) and the logits match transformers' (which dequantizes on CPU, with accelerate) within 1e-4;
* each TP rank reads only its rows and the scale tiles covering them;
* ``mapgen synth`` writes the FP8 layout of a real release's metadata (Qwen3-30B-A3B-FP8 shape), which verifies
  at EP=2;
* malformed FP8 checkpoints are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mapgen.cli import main as mapgen_main
from tests.runtime_support import (
    LAYOUTS,
    Case,
    assert_case,
    assert_quantize_round_trip,
    load_tensors,
    run_cases,
    synth,
)

BLOCK = (8, 16)  # divides every weight of the tiny model: transformers' Fp8Dequantize requires whole tiles


def _quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The releases' recipe, tile by tile (deliberately naive: independent of mapgen.runtime.quant)."""
    w = w.float()
    rows, cols = w.shape
    tr, tc = -(-rows // block[0]), -(-cols // block[1])
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(tr, tc)
    for i in range(tr):
        for j in range(tc):
            tile = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            amax = float(tile.abs().max())
            s[i, j] = amax / 448.0 if amax > 0 else 1.0
            q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (
                (tile / s[i, j]).clamp(-448, 448).to(torch.float8_e4m3fn))
    return q, s


def _write_fp8(src: Path, out: Path) -> None:
    """``src`` (an unquantized checkpoint) with every decoder projection block-quantized."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(src / shard))
        new: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if ".layers." in key and key.endswith("proj.weight"):
                new[key], new[key + "_scale_inv"] = _quantize(value, BLOCK)
                index["weight_map"][key + "_scale_inv"] = shard
            else:
                new[key] = value
        save_file(new, str(out / shard), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (out / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import transformers

    from tests.tiny import _randomise

    root = tmp_path_factory.mktemp("fp8")
    cfg = transformers.Qwen3Config(vocab_size=160, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.Qwen3ForCausalLM(cfg)
    _randomise(model, 3)
    model.to(torch.bfloat16).save_pretrained(root / "bf16", max_shard_size="40KB")
    _write_fp8(root / "bf16", root / "fp8")
    # 4x4 tiles divide every dimension of the synthesized model (hidden 48, expert ffn 28): transformers 5.24
    # derives the tile from the scale grid (rows // scale_rows), which is only right for whole tiles
    moe = synth(LAYOUTS / "qwen3-moe-fp8", root / "moe-fp8", "--fp8-block", "4x4")
    return {"bf16": root / "bf16", "fp8": root / "fp8", "moe-fp8": moe, "root": root}


@pytest.fixture(scope="module")
def results(ckpts: dict[str, Path]) -> dict[str, list[dict[str, object]]]:
    return run_cases([Case("fp8-tp2", str(ckpts["fp8"]), tp=2),
                      Case("moe-fp8-ep2", str(ckpts["moe-fp8"]), ep=2, etp=1)])


def test_scan_recognises_block_fp8_and_shares_the_unquantized_bridge(ckpts: dict[str, Path]) -> None:
    from mapgen.contract.fingerprint import fingerprint
    from mapgen.infer import scan

    fp8, bf16 = scan(str(ckpts["fp8"])), scan(str(ckpts["bf16"]))
    assert fp8.quantization == "fp8_block"
    assert bf16.quantization == "none"
    assert not fp8.unclassified
    assert fingerprint(fp8) == fingerprint(bf16)
    assert fp8.language_model == bf16.language_model  # the scales are read with their weights, not mapped


@pytest.mark.distributed
def test_import_is_transformers_dequantization_bit_for_bit(ckpts: dict[str, Path]) -> None:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    root = ckpts["root"]
    assert mapgen_main(["convert", str(ckpts["fp8"]), str(root / "mc"), "--tp", "2"]) == 0
    assert mapgen_main(["export", str(root / "mc"), str(root / "hf"), "--source", str(ckpts["fp8"])]) == 0
    src, out = load_tensors(ckpts["fp8"]), load_tensors(root / "hf")
    assert set(out) == {k for k in src if not k.endswith("_scale_inv")}
    dequant = Fp8Dequantize(None)
    quantized = 0
    for key, got in out.items():
        if key + "_scale_inv" in src:
            want = dequant._dequantize_one(src[key], src[key + "_scale_inv"], output_dtype=torch.bfloat16)
            quantized += 1
        else:
            want = src[key]
        assert got.dtype == want.dtype == torch.bfloat16, key
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), key
    assert quantized == 14  # 2 layers x (q, k, v, o, gate, up, down)
    config = json.loads((root / "hf" / "config.json").read_text())
    assert "quantization_config" not in config  # the weights are written dequantized

    # --quantize: the source's format, every tensor byte for byte (streaming and in memory)
    assert_quantize_round_trip(root / "mc", ckpts["fp8"], root)


@pytest.mark.distributed
def test_verify_tp2_quantize_round_trip_and_logits(results: dict[str, list[dict[str, object]]],
                                                    ckpts: dict[str, Path]) -> None:
    r0 = assert_case(results, "fp8-tp2")
    assert r0["keys"] == 39  # 25 tensors + 14 scales, all reproduced
    # each rank reads its half of every projection with the scale tiles covering it, the (tiny, replicated)
    # norms and its part of the vocabulary (rank 0 holds 128 of the 160 rows padded to 256): together the
    # ranks read no more than the checkpoint's files hold, so nothing but the norms is read twice
    total = sum(p.stat().st_size for p in ckpts["fp8"].glob("*.safetensors"))
    reads = [int(r["bytes_read"]) for r in results["fp8-tp2"]]  # type: ignore[call-overload]
    assert sum(reads) <= total, (reads, total)
    assert all(0 < b < 0.65 * total for b in reads), (reads, total)


@pytest.mark.distributed
def test_synth_writes_a_release_layout_that_verifies_at_ep2(results: dict[str, list[dict[str, object]]],
                                                            ckpts: dict[str, Path]) -> None:
    from mapgen.infer import scan

    layout = scan(str(ckpts["moe-fp8"]))
    assert layout.quantization == "fp8_block"
    config = json.loads((ckpts["moe-fp8"] / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [4, 4]
    keys = json.loads((ckpts["moe-fp8"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.0.down_proj.weight_scale_inv" in keys
    assert "model.layers.0.mlp.gate.weight_scale_inv" not in keys  # the router stays unquantized, as released
    assert_case(results, "moe-fp8-ep2")


@pytest.mark.parametrize("shape", [(48, 40), (37, 70), (8, 8)])
def test_dequantizing_reader_reads_slices_exactly(shape: tuple[int, int]) -> None:
    from mapgen.ops._base import DictReader
    from mapgen.runtime.quant import BlockFp8, DequantizingReader, dequantize

    gen = torch.Generator().manual_seed(sum(shape))
    block = (16, 16)
    q, s = _quantize(torch.randn(shape, generator=gen), block)
    inner = DictReader({"w.weight": q, "w.weight_scale_inv": s})
    reader = DequantizingReader(inner, BlockFp8(block, {"w.weight": "w.weight_scale_inv"}))  # type: ignore[arg-type]
    full = dequantize(q, s, block, torch.float32)
    want = (q.float() * s.repeat_interleave(16, 0)[: shape[0]].repeat_interleave(16, 1)[:, : shape[1]])
    assert torch.equal(full, want)
    rows, cols = shape
    cases = [  # index, its rows, its columns
        ((slice(3, rows - 5),), (3, rows - 5), (0, cols)),
        ((slice(None), slice(5, cols)), (0, rows), (5, cols)),
        ((5,), (5, 6), (0, cols)),
        ((slice(0, rows), 7), (0, rows), (7, 8)),
        ((slice(rows // 2, rows), slice(0, cols // 2)), (rows // 2, rows), (0, cols // 2)),
    ]
    for index, (r0, r1), (c0, c1) in cases:
        inner.reset()
        got = reader.read("w.weight", index)
        assert torch.equal(got, full.to(torch.bfloat16)[index]), index
        # only the slice's FP8 elements, and exactly the scale tiles covering it
        assert inner.elements_read["w.weight"] == got.numel() == (r1 - r0) * (c1 - c0)
        tiles = (-(-r1 // 16) - r0 // 16) * (-(-c1 // 16) - c0 // 16)
        assert inner.elements_read["w.weight_scale_inv"] == tiles, index


def test_quantize_blocks_reproduces_an_unchanged_model_and_rescales_changed_tiles() -> None:
    from mapgen.runtime.quant import dequantize, quantize_blocks

    gen = torch.Generator().manual_seed(7)
    q, s = _quantize(torch.randn(37, 70, generator=gen), (16, 16))
    w = dequantize(q, s, (16, 16), torch.bfloat16)
    q2, s2 = quantize_blocks(w, (16, 16), s)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(s2, s)
    w = w.clone()
    w[0, 0] = 3 * float(w[:16, :16].abs().max())  # no longer fits tile (0, 0) under its old scale
    q3, s3 = quantize_blocks(w, (16, 16), s)
    assert s3[0, 0] != s[0, 0]
    assert torch.equal(s3.flatten()[1:], s.flatten()[1:])
    assert abs(float(q3[0, 0].float()) - 448.0) < 1e-6


@pytest.mark.parametrize(("change", "code"), [
    ({"activation_scheme": "static"}, "quant.fp8-unsupported"),
    ({"weight_block_size": None}, "quant.fp8-unsupported"),
    ({"fmt": "e5m2"}, "quant.fp8-unsupported"),
    ("orphan", "quant.fp8-orphan-scale"),
])
def test_malformed_fp8_checkpoints_are_refused_by_name(tmp_path: Path, change: object, code: str) -> None:
    from mapgen.errors import MapgenError
    from mapgen.infer import scan

    src = LAYOUTS / "qwen3-moe-fp8"
    for name in ("config.json", "model.safetensors.index.json"):
        (tmp_path / name).write_text((src / name).read_text())
    if change == "orphan":
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        del index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        config = json.loads((tmp_path / "config.json").read_text())
        config["quantization_config"].update(change)  # type: ignore[call-overload]
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MapgenError) as info:
        scan(str(tmp_path))
    assert code in {d.code for d in info.value.diagnostics}
