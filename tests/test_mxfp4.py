"""MXFP4 checkpoints (gpt-oss releases), imported exactly and exported back byte for byte.

The reference is transformers: its ``convert_moe_packed_tensors`` (the e2m1 table, E8M0 scales, low nibble first,
the last two dimensions transposed) and a ``GptOssForCausalLM`` it loads from the MXFP4 checkpoint on CPU (it
dequantizes while loading). The checkpoint is ``mapgen synth`` of the real gpt-oss-20b release metadata
(``tests/fixtures/corpus/gpt-oss-20b``), so its keys, dtypes, shapes and ``quantization_config`` are the release's.

* tensor level: dequantization = transformers' bit for bit over every byte and scale; ``--quantize`` gives back
  the same blocks and scales for every group, the all-zero, negative-zero, smallest and largest exponents and the
  ambiguous groups (only halves: the values alone do not determine the scale) included; overflowing scales refused;
* a reader's slice reads only its experts, rows and groups (elements counted, and bytes on a real checkpoint);
* scan: ``quantization: mxfp4``, the fingerprint and language model of the dequantized checkpoint; malformed MXFP4
  refused by name; synth writes the release layout (``--mxfp4`` for an unquantized source);
* distributed: ``verify`` at TP=2 x EP=2 (ETP=1) round-trips every blocks/scales tensor byte for byte with logits
  parity, and each rank reads exactly its experts' blocks and scales (against the same model stored in bf16);
  ``convert`` then ``export`` (bf16 by default: transformers' dequantization bit for bit, no quantization_config)
  and ``export --quantize`` (streaming; verify's round trip is the in-memory export): every source tensor byte
  for byte. Opt-in (``MAPGEN_MATRIX=full``): expert-TP slices of blocks at TP=2 x EP=2 x ETP=2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mapgen.cli import main as mapgen_main
from tests.runtime_support import (
    CORPUS,
    LAYOUTS,
    Case,
    assert_case,
    assert_quantize_round_trip,
    load_tensors,
    run_cases,
    synth,
)

SIZES = ("--hidden", "64", "--intermediate", "64", "--head-dim", "16", "--vocab", "128")


def _dequantized_copy(src: Path, out: Path) -> None:
    """``src`` with every MXFP4 pair replaced by transformers' dequantization (bf16) and no quantization_config."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(src / shard))
        new = {k: v for k, v in tensors.items() if not k.endswith(("_blocks", "_scales"))}
        for key in [k for k in tensors if k.endswith("_blocks")]:
            x = key.removesuffix("_blocks")
            new[x] = convert_moe_packed_tensors(tensors[key], tensors[x + "_scales"], dtype=torch.bfloat16)
            del index["weight_map"][key], index["weight_map"][x + "_scales"]
            index["weight_map"][x] = shard
        save_file(new, str(out / shard), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mxfp4")
    mx = synth(CORPUS / "gpt-oss-20b", root / "mx", *SIZES)
    _dequantized_copy(mx, root / "bf16")
    return {"mx": mx, "bf16": root / "bf16", "root": root}


@pytest.fixture(scope="module")
def results(ckpts: dict[str, Path]) -> dict[str, list[dict[str, object]]]:
    return run_cases([Case("mxfp4-tp2-ep2", str(ckpts["mx"]), tp=2, ep=2, etp=1),
                      Case("bf16-tp2-ep2", str(ckpts["bf16"]), tp=2, ep=2, etp=1, logits=False)])


# ---------------------------------------------------------------------------------------------------------
# The format, tensor by tensor
# ---------------------------------------------------------------------------------------------------------
def _groups() -> tuple[torch.Tensor, torch.Tensor]:
    """``[8, 40, 2, 16]`` blocks / ``[8, 40, 2]`` scales: random groups (every byte value occurs) at scales 0..252,
    then the edge cases in experts 6 and 7."""
    gen = torch.Generator().manual_seed(12)
    blocks = torch.randint(0, 256, (8, 40, 2, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, 253, (8, 40, 2), generator=gen, dtype=torch.uint8)
    edge = [  # (byte filling the group, scale): +0, -0, halves only (ambiguous scale), extremes
        (0x00, 127), (0x00, 0), (0x88, 127), (0x88, 252), (0x80, 3), (0x11, 127), (0x99, 40), (0x19, 200),
        (0x77, 252), (0xFF, 252), (0x55, 253), (0x33, 254), (0xBB, 254), (0x11, 0), (0x77, 0), (0x21, 1),
    ]
    for n, (byte, scale) in enumerate(edge):
        blocks[6 + n // 8, n % 8].fill_(byte)
        scales[6 + n // 8, n % 8] = scale
    blocks[7, 10, 0, :8] = 0x70  # a 6 and a +0 in one byte: the largest and smallest magnitudes of a group
    scales[7, 10, 0] = 252
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantization_is_transformers_bit_for_bit(dtype: torch.dtype) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from mapgen.ops._base import DictReader
    from mapgen.runtime.quant import Mxfp4, Mxfp4Reader

    blocks, scales = _groups()
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    reader = Mxfp4Reader(DictReader({"x_blocks": blocks, "x_scales": scales}),  # type: ignore[arg-type]
                         Mxfp4.from_keys(["x_blocks", "x_scales"], out_dtype=dtype))
    got = reader.read("x")
    assert reader.shape("x") == tuple(want.shape) == (8, 64, 40)
    assert got.dtype == want.dtype == reader.dtype("x") == dtype
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(bits), want.view(bits))  # -0.0 included
    assert bool(torch.signbit(got[6, :, 2]).all())  # expert 6, row 2: 0x88, all negative zeros


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_gives_back_every_group(dtype: torch.dtype) -> None:
    from mapgen.runtime.quant import dequantize_mxfp4, quantize_mxfp4

    blocks, scales = _groups()
    values = dequantize_mxfp4(blocks, scales, dtype)
    again, again_scales = quantize_mxfp4(values, scales)
    assert again.dtype == again_scales.dtype == torch.uint8
    assert torch.equal(again, blocks)
    assert torch.equal(again_scales, scales)
    # without the source's scales a group is determined only when it holds a 4 or a 6 (then amax fixes the
    # exponent); a group of halves is the same values under another scale, which is why the source's are kept
    fresh, fresh_scales = quantize_mxfp4(values)
    big = ((blocks & 0x06) == 0x06).any(-1) | ((blocks >> 4 & 0x06) == 0x06).any(-1)
    assert torch.equal(fresh_scales[big], scales[big])
    assert torch.equal(fresh[big], blocks[big])
    assert fresh_scales[6, 5, 0] == 124  # the halves at 2**0 read back as fours at 2**-3
    assert torch.equal(dequantize_mxfp4(fresh, fresh_scales, dtype), values)  # same values either way


def test_a_changed_group_gets_a_fresh_scale() -> None:
    from mapgen.runtime.quant import dequantize_mxfp4, quantize_mxfp4

    blocks, scales = _groups()
    values = dequantize_mxfp4(blocks, scales, torch.float32)
    changed = values.clone()
    changed[0, 0, :32] *= 4  # past 7x its scale: two steps up, the same nibbles
    changed[0, 1, :32] /= 2  # still fits: the scale is kept
    q, s = quantize_mxfp4(changed, scales)
    assert int(s[0, 0, 0]) == int(scales[0, 0, 0]) + 2
    assert torch.equal(q[0, 0, 0], blocks[0, 0, 0])
    assert s[0, 1, 0] == scales[0, 1, 0]
    rest = torch.ones_like(s, dtype=torch.bool)
    rest[0, 0, 0] = False
    assert torch.equal(s[rest], scales[rest])
    # round to nearest, ties to even, saturating at 6 (OCP MX): 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4, 6.5 -> 6
    row = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, -0.25, -5.5, *([4.0] * 22)])
    q, s = quantize_mxfp4(row, torch.tensor([127], dtype=torch.uint8))
    assert s.tolist() == [127]
    assert dequantize_mxfp4(q, s, torch.float32)[:10].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0,
                                                                    -6.0]


def test_rounding_is_nearest_ties_to_even_against_a_naive_encoder() -> None:
    from mapgen.runtime.quant import FP4_VALUES, dequantize_mxfp4, quantize_mxfp4

    gen = torch.Generator().manual_seed(5)
    quarters = torch.arange(-30, 31, dtype=torch.float32) / 4  # every tie, value and saturating quarter
    noise = (torch.randn(4 * 32 - 61 - 3, generator=gen) * 3).clamp(-6.9, 6.9)
    values = torch.cat([quarters, noise, torch.tensor([-0.0, 6.9, 1e-9])])
    q, s = quantize_mxfp4(values, torch.full((4,), 127, dtype=torch.uint8))
    assert s.tolist() == [127] * 4  # every group fits under 2**0 (below 7)
    got = dequantize_mxfp4(q, s, torch.float32)
    for v, g in zip(values.tolist(), got.tolist(), strict=True):  # nearest, then the even code (0, 1, 2, 4, ...)
        want = min(range(16), key=lambda c: (abs(FP4_VALUES[c] - v), c % 2, (c >= 8) != (v < 0 or str(v) == "-0.0")))
        assert str(g) == str(FP4_VALUES[want]), (v, g)


@pytest.mark.parametrize(("byte", "scale"), [(0x00, 255), (0x77, 253), (0x44, 254)])
def test_scales_past_the_dtype_are_refused(byte: int, scale: int) -> None:
    from mapgen.errors import MapgenError
    from mapgen.ops._base import DictReader
    from mapgen.runtime.quant import Mxfp4, Mxfp4Reader

    blocks = torch.full((1, 2, 1, 16), byte, dtype=torch.uint8)
    scales = torch.full((1, 2, 1), 127, dtype=torch.uint8)
    scales[0, 1, 0] = scale
    reader = Mxfp4Reader(DictReader({"x_blocks": blocks, "x_scales": scales}),  # type: ignore[arg-type]
                         Mxfp4.from_keys(["x_blocks"]))
    assert reader.read("x", (0, slice(None), 0)).shape == (32,)  # the row under a fine scale reads
    with pytest.raises(MapgenError) as info:
        reader.read("x")
    assert info.value.diagnostics[0].code == "quant.mxfp4-overflow"


def test_a_slice_reads_only_its_experts_rows_and_groups() -> None:
    from mapgen.ops._base import DictReader
    from mapgen.runtime.quant import Mxfp4, Mxfp4Reader, dequantize_mxfp4

    blocks, scales = _groups()  # X is [8 experts, 64 in, 40 out]: 2 groups of 32 a row
    inner = DictReader({"x_blocks": blocks, "x_scales": scales})
    reader = Mxfp4Reader(inner, Mxfp4.from_keys(["x_blocks"]))  # type: ignore[arg-type]
    full = dequantize_mxfp4(blocks, scales, torch.bfloat16).transpose(1, 2)
    cases = [  # index, experts, in-groups, out-rows
        ((3,), 1, 2, 40),
        ((slice(2, 6),), 4, 2, 40),
        ((5, slice(None), slice(20, 40)), 1, 2, 20),  # an expert-TP column slice: half the rows
        ((5, slice(32, 64)), 1, 1, 40),  # a row-parallel slice of the input: one group of each row
        ((1, slice(30, 34), slice(3, 4)), 1, 2, 1),  # straddling a group boundary
        ((7, 63, 39), 1, 1, 1),
    ]
    for index, experts, groups, rows in cases:
        inner.reset()
        got = reader.read("x", index)
        assert torch.equal(got, full[index].contiguous()), index
        assert inner.elements_read["x_scales"] == experts * rows * groups, index
        assert inner.elements_read["x_blocks"] == experts * rows * groups * 16, index


# ---------------------------------------------------------------------------------------------------------
# Scan, synth, a real checkpoint
# ---------------------------------------------------------------------------------------------------------
def test_scan_pairs_blocks_with_scales_and_shares_the_unquantized_bridge(ckpts: dict[str, Path]) -> None:
    from mapgen.contract.fingerprint import fingerprint
    from mapgen.infer import scan

    mx, bf16 = scan(str(ckpts["mx"])), scan(str(ckpts["bf16"]))
    assert (mx.quantization, bf16.quantization) == ("mxfp4", "none")
    assert not mx.unclassified
    assert fingerprint(mx) == fingerprint(bf16) == fingerprint(scan(str(CORPUS / "gpt-oss-20b")))
    assert mx.language_model == bf16.language_model  # the model sees gate_up_proj / down_proj, dequantized


def test_synth_writes_the_release_layout(ckpts: dict[str, Path]) -> None:
    from safetensors import safe_open

    release = json.loads((CORPUS / "gpt-oss-20b" / "config.json").read_text())
    config = json.loads((ckpts["mx"] / "config.json").read_text())
    assert config["quantization_config"] == release["quantization_config"]
    keys = json.loads((ckpts["mx"] / "model.safetensors.index.json").read_text())["weight_map"]
    released = json.loads((CORPUS / "gpt-oss-20b" / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k for k in keys if ".layers.0." in k} == {k for k in released if ".layers.0." in k}
    want = {"gate_up_proj_blocks": (4, 128, 2, 16), "gate_up_proj_scales": (4, 128, 2),
            "down_proj_blocks": (4, 64, 2, 16), "down_proj_scales": (4, 64, 2)}  # [E, 2I|H, H/32|I/32, 16]
    for name, shape in want.items():
        key = f"model.layers.1.mlp.experts.{name}"
        with safe_open(str(ckpts["mx"] / keys[key]), framework="pt") as f:
            t = f.get_slice(key)
            assert (t.get_dtype(), tuple(t.get_shape())) == ("U8", shape), key


def test_synth_mxfp4_of_an_unquantized_source_and_the_fixture_layout(tmp_path: Path) -> None:
    from mapgen.contract.fingerprint import fingerprint
    from mapgen.errors import MapgenError
    from mapgen.infer import scan
    from mapgen.synth import SynthOptions, synthesize
    from tests import tiny_gptoss

    plain = tiny_gptoss.write("gpt-oss", tmp_path / "plain")
    out = synth(plain, tmp_path / "mx", "--mxfp4", *SIZES)
    layout = scan(str(out))
    assert layout.quantization == "mxfp4"
    assert fingerprint(layout) == fingerprint(scan(str(plain)))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mxfp4"
    assert "model.layers.*.self_attn.q_proj" in qc["modules_to_not_convert"]
    assert not any("experts" in m for m in qc["modules_to_not_convert"])
    with pytest.raises(MapgenError) as info:  # blocks of 32: a 40-wide expert cannot be packed
        synthesize(scan(str(plain)), SynthOptions(mxfp4=True, intermediate=40))
    assert info.value.diagnostics[0].code == "synth.bad-option"
    fixture = scan(str(LAYOUTS / "gpt-oss-mxfp4"))  # gpt-oss-120b's layout, shrunk
    assert (fixture.quantization, fixture.unclassified, fingerprint(fixture)) == ("mxfp4", (), fingerprint(layout))


def test_transformers_loaded_model_equals_the_reader(ckpts: dict[str, Path]) -> None:
    """transformers dequantizes the MXFP4 checkpoint while loading it on CPU; each rank's reader gives the same."""
    import transformers

    from mapgen.runtime._cpu import quiet_transformers
    from mapgen.runtime.api import HFSource

    quiet_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpts["mx"]), dtype=torch.float32)
    source = HFSource.open(ckpts["mx"])
    reader = source.reader(torch.float32)
    params = dict(model.named_parameters())
    checked = 0
    for key in source.quant.pairs:  # type: ignore[union-attr]
        assert torch.equal(reader.read(key), params[key].data), key
        checked += 1
    assert checked == 4  # 2 layers x (gate_up_proj, down_proj)
    # bytes: expert 3's down_proj, the second half of its input (a row-parallel slice) = one group of each row
    before = reader.bytes_read
    reader.read("model.layers.0.mlp.experts.down_proj", (3, slice(32, 64)))
    assert reader.bytes_read - before == 64 * 1 * (16 + 1)  # 64 rows x 1 group x (16 bytes + 1 scale)
    reader.close()


@pytest.mark.parametrize(("change", "code"), [
    ("orphan", "quant.mxfp4-orphan"),
    ("undeclared", "quant.mxfp4-unsupported"),
    ("field", "quant.mxfp4-unsupported"),
    ("dtype", "quant.mxfp4-shape"),
    ("declared", "quant.mxfp4-unsupported"),  # the config says mxfp4, the tensors are plain
])
def test_malformed_mxfp4_is_refused_by_name(ckpts: dict[str, Path], tmp_path: Path, change: str, code: str) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from mapgen.errors import MapgenError
    from mapgen.infer import scan

    root = tmp_path / "bad"
    shutil.copytree(ckpts["bf16" if change == "declared" else "mx"], root)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    config = json.loads((root / "config.json").read_text())
    key = "model.layers.0.mlp.experts.down_proj_scales"
    if change == "orphan":
        del index["weight_map"][key]
    elif change == "undeclared":
        del config["quantization_config"]
    elif change == "declared":
        config["quantization_config"] = {"quant_method": "mxfp4"}
    elif change == "field":
        config["quantization_config"]["group_size"] = 64
    else:
        shard = root / index["weight_map"][key]
        tensors = load_file(str(shard))
        tensors[key] = tensors[key].to(torch.int16)
        save_file(tensors, str(shard), metadata={"format": "pt"})
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(MapgenError) as info:
        scan(str(root))
    assert code in {d.code for d in info.value.diagnostics}


# ---------------------------------------------------------------------------------------------------------
# Distributed: convert, verify, export
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_verify_tp2_ep2_round_trips_blocks_and_scales(results: dict[str, list[dict[str, object]]],
                                                      ckpts: dict[str, Path]) -> None:
    r0 = assert_case(results, "mxfp4-tp2-ep2")
    assert r0["keys"] == 41  # 33 plain tensors + 2 layers x 2 (blocks, scales), all reproduced byte for byte
    # each rank reads the blocks and scales of its 2 experts, its half of attention and vocabulary: together no
    # more than the files hold beyond the small replicated tensors
    total = sum(p.stat().st_size for p in ckpts["mx"].glob("*.safetensors"))
    reads = [int(r["bytes_read"]) for r in results["mxfp4-tp2-ep2"]]  # type: ignore[call-overload]
    assert sum(reads) <= total, (reads, total)
    assert all(0 < b < 0.65 * total for b in reads), (reads, total)
    # exactly: the same model stored dequantized (bf16) reads the same slices of everything else, so per rank the
    # difference is its own 2 experts x 2 layers, bf16 gate_up [64, 128] + down [64, 64] against their blocks
    # (128 + 64 rows x 2 groups x 16 bytes) and scales (one byte a group)
    assert_case(results, "bf16-tp2-ep2", logits="skipped")
    plain = [int(r["bytes_read"]) for r in results["bf16-tp2-ep2"]]  # type: ignore[call-overload]
    per_expert = (64 * 128 + 64 * 64) * 2 - (128 + 64) * 2 * (16 + 1)
    assert [p - m for p, m in zip(plain, reads, strict=True)] == [2 * 2 * per_expert] * 2, (plain, reads)


@pytest.mark.distributed
def test_convert_export_dequantized_and_quantize_byte_for_byte(ckpts: dict[str, Path]) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    root = ckpts["root"]
    assert mapgen_main(["convert", str(ckpts["mx"]), str(root / "mc"), "--tp", "2", "--ep", "2", "--etp", "1"]) == 0
    assert mapgen_main(["export", str(root / "mc"), str(root / "hf"), "--source", str(ckpts["mx"])]) == 0
    src, out = load_tensors(ckpts["mx"]), load_tensors(root / "hf")
    assert set(out) == {k.removesuffix("_blocks") for k in src if not k.endswith("_scales")}
    for key, got in out.items():
        if key + "_blocks" in src:
            want = convert_moe_packed_tensors(src[key + "_blocks"], src[key + "_scales"], dtype=torch.bfloat16)
        else:
            want = src[key]
        assert got.dtype == want.dtype == torch.bfloat16, key
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), key
    assert "quantization_config" not in json.loads((root / "hf" / "config.json").read_text())
    # every source tensor byte for byte (streaming; verify's round trip is the in-memory export)
    assert_quantize_round_trip(root / "mc", ckpts["mx"], root, in_memory=False)


@pytest.mark.distributed
@pytest.mark.skipif(os.environ.get("MAPGEN_MATRIX") != "full", reason="opt-in: MAPGEN_MATRIX=full (about 80 s)")
def test_expert_tp_slices_blocks_exactly(tmp_path: Path) -> None:
    """gpt-oss's biased experts need ETP=1; expert-TP slices of MXFP4 blocks (each rank its half of the rows)
    are exercised on Qwen3-VL-MoE's packed experts stored as MXFP4 (``synth --mxfp4``) at TP=2 x EP=2 x ETP=2:
    the round trip is byte for byte (transformers has no MXFP4 loader for it: logits are not compared)."""
    vl = synth(CORPUS / "qwen3-vl-30b-a3b", tmp_path / "vl", "--mxfp4", "--hidden", "64", "--moe-intermediate",
               "32", "--intermediate", "64")
    results = run_cases([Case("mxfp4-etp2", str(vl), tp=2, ep=2, etp=2, logits=False)])
    assert assert_case(results, "mxfp4-etp2", logits="skipped")["keys"] == 380
