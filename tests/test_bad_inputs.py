"""The bad-input catalog: every broken checkpoint (or bad command line) gets a specific diagnostic.

Each case builds a small broken checkpoint in its own temporary directory (from ``tests/tiny.py``'s
transformers-written Qwen3 / Qwen3-MoE, or from the metadata-only fixtures), runs the real CLI as a subprocess
(``python -m mapgen ...``, working directory = that temporary directory) and asserts:

* the exit status (1 for bad input, 2 for unclassified keys) and the diagnostic code on stderr;
* no ``Traceback`` anywhere in the output;
* the whole temporary directory is byte-identical before and after: the source is untouched, and no output
  directory, hidden staging directory (``.OUT.partial-*``, ``.OUT.new-*``) or stray file was left behind.

``scan`` is used for metadata problems (it is fast), ``convert`` / ``export`` / ``verify`` for what the
runtime must refuse before it starts workers or writes a byte (each of those costs a torch import, ~3 s),
``emit`` for key names crafted to inject code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = REPO / "tests" / "fixtures" / "layouts"
CORPUS = REPO / "tests" / "fixtures" / "corpus"
INDEX = "model.safetensors.index.json"
TIMEOUT_S = 180


# ---------------------------------------------------------------------------------------------------------
# Checkpoint surgery
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiny import write

    root = tmp_path_factory.mktemp("tiny")
    return {kind: write(kind, root / kind) for kind in ("qwen3", "qwen3-moe")}


def _index(d: Path) -> dict:
    return json.loads((d / INDEX).read_text())


def _write_index(d: Path, doc: dict) -> None:
    (d / INDEX).write_text(json.dumps(doc, indent=2))


def _config(d: Path, **changes: object) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def _edit_shard(path: Path, edit: Callable[[dict], None]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open handles have no __contains__)
        meta = f.metadata()
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def _drop(d: Path, *keys: str) -> None:
    """Remove keys from the index and from their shards."""
    doc = _index(d)
    for key in keys:
        shard = doc["weight_map"].pop(key)
        _edit_shard(d / shard, lambda t, key=key: t.pop(key))
    _write_index(d, doc)


def _put(d: Path, key: str, tensor: object, shard: str | None = None) -> None:
    """Add (or replace) a tensor in a shard and the index."""
    doc = _index(d)
    shard = shard or doc["weight_map"].get(key) or sorted(set(doc["weight_map"].values()))[0]
    doc["weight_map"][key] = shard
    _edit_shard(d / shard, lambda t: t.__setitem__(key, tensor))
    _write_index(d, doc)


def _copy(src: Path, tmp: Path, name: str = "src") -> Path:
    return Path(shutil.copytree(src, tmp / name))


def _metadata_only(src: Path, tmp: Path) -> Path:
    d = tmp / "src"
    d.mkdir()
    for name in ("config.json", INDEX):
        shutil.copy(src / name, d / name)
    return d


# ---------------------------------------------------------------------------------------------------------
# Cases: each builds its input under ``tmp`` and returns the mapgen arguments
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path, dict[str, Path]], list[str]]
    code: str  # the diagnostic code expected on stderr (``error: CODE:``)
    exit: int = 1
    also: tuple[str, ...] = ()  # further substrings expected on stderr


CASES: list[Case] = []


def case(code: str, exit: int = 1, also: tuple[str, ...] = ()) -> Callable:
    def register(fn: Callable[[Path, dict[str, Path]], list[str]]) -> Callable:
        CASES.append(Case(fn.__name__, fn, code, exit, also))
        return fn

    return register


def _scan(d: Path) -> list[str]:
    return ["scan", str(d), "-q"]


# -- files and JSON ----------------------------------------------------------------------------------------
@case("source.missing-file", also=("config.json not found",))
def missing_config(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    (d / "config.json").unlink()
    return _scan(d)


@case("source.missing-index")
def missing_index(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    (d / INDEX).unlink()
    return _scan(d)


@case("json.malformed", also=("config.json is not valid JSON",))
def malformed_config(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    (d / "config.json").write_text('{"model_type": "qwen3",')
    return _scan(d)


@case("json.malformed", also=("the safetensors index is not valid JSON",))
def malformed_index(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    (d / INDEX).write_text((d / INDEX).read_text()[:-40])
    return _scan(d)


@case("json.duplicate-key", also=("'lm_head.weight' more than once",))
def index_duplicate_key(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    text = (d / INDEX).read_text()
    line = next(x for x in text.splitlines() if '"lm_head.weight"' in x)
    (d / INDEX).write_text(text.replace(line, line.rstrip(",") + ",\n" + line.rstrip(",") + ",", 1))
    return _scan(d)


@case("index.missing-shard")
def index_names_absent_shard(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    sorted(d.glob("model-*.safetensors"))[-1].unlink()
    return _scan(d)


@case("index.key-not-in-shard", also=("model.layers.0.mlp.up_proj.weight",))
def index_key_absent_from_shard(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    doc = _index(d)
    key = "model.layers.0.mlp.up_proj.weight"
    _edit_shard(d / doc["weight_map"][key], lambda t: t.pop(key))
    return _scan(d)


# -- safetensors headers -----------------------------------------------------------------------------------
@case("safetensors.truncated", also=("too short",))
def shard_header_truncated(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:5])
    return _scan(d)


@case("safetensors.truncated", also=("data bytes follow the header",))
def shard_data_truncated(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    return _scan(d)


@case("safetensors.header-too-large", also=("refusing more than",))
def shard_header_too_large(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    """The length field is over the bound and the (sparse) file is long enough to hold it: only the bound can
    refuse it, before the header is read (reading it would end in a malformed-header error instead)."""
    from mapgen.source import MAX_HEADER_BYTES

    d = tmp / "src"
    d.mkdir()
    shutil.copy(tiny["qwen3"] / "config.json", d / "config.json")
    with open(d / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        fh.truncate(8 + MAX_HEADER_BYTES + 1 + 4096)
    return _scan(d)


# -- shapes, dtypes and quantization -----------------------------------------------------------------------
@case("shape.mismatch", also=("config implies [32, 48]",))
def shape_disagrees_with_config(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    _config(d, intermediate_size=32)
    return _scan(d)


@case("dtype.mismatch", also=("stored as I8",))
def dtype_disagrees_with_config(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    import torch

    d = _copy(tiny["qwen3"], tmp)
    _put(d, "model.layers.0.mlp.up_proj.weight", torch.zeros(40, 48, dtype=torch.int8))
    return _scan(d)


@case("quant.fp8-unsupported", also=("F8_E4M3", "not supported"))
def fp8_weights_without_scales(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    import torch

    d = _copy(tiny["qwen3"], tmp)
    _put(d, "model.layers.1.self_attn.o_proj.weight", torch.zeros(48, 48, dtype=torch.float8_e4m3fn))
    return _scan(d)


@case("quant.fp8-unsupported", also=("weight_scale_inv",))
def fp8_block_scales(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _metadata_only(CORPUS / "llama-3.2-3b-instruct", tmp)
    doc = _index(d)
    for key, shard in list(doc["weight_map"].items()):
        if key.endswith("proj.weight"):
            doc["weight_map"][key + "_scale_inv"] = shard
    _write_index(d, doc)
    return _scan(d)


@case("quant.mlx-unsupported", also=("not supported",))
def mlx_quantized(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _metadata_only(CORPUS / "qwen3-1.7b-mlx-bf16", tmp)
    _config(d, quantization={"group_size": 64, "bits": 4})
    doc = _index(d)
    for key, shard in list(doc["weight_map"].items()):
        if key.endswith("proj.weight"):
            stem = key.removesuffix(".weight")
            doc["weight_map"][stem + ".scales"] = shard
            doc["weight_map"][stem + ".biases"] = shard
    _write_index(d, doc)
    return _scan(d)


@case("quant.mlx-unsupported", also=("config 'quantization'",))
def mlx_quantized_config_only(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    _config(d, quantization={"group_size": 64, "bits": 4})
    return _scan(d)


# -- experts -----------------------------------------------------------------------------------------------
_EXPERT = "model.layers.0.mlp.experts.{e}.{w}.weight"


@case("experts.missing", also=("expert 2 has no",))
def expert_ids_with_a_gap(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3-moe"], tmp)
    _drop(d, *(_EXPERT.format(e=2, w=w) for w in ("gate_proj", "up_proj", "down_proj")))
    return _scan(d)


@case("experts.duplicate", also=("'01' duplicates expert 1",))
def expert_id_written_twice(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    import torch

    d = _copy(tiny["qwen3-moe"], tmp)
    _put(d, "model.layers.0.mlp.experts.01.gate_proj.weight", torch.zeros(24, 48, dtype=torch.bfloat16))
    return _scan(d)


@case("config.experts-mismatch", also=("the config declares 3 experts",))
def expert_count_disagrees_with_config(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3-moe"], tmp)
    _config(d, num_experts=3)
    return _scan(d)


@case("experts.mixed-storage", also=("both per expert",))
def packed_and_per_expert_in_one_block(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    import torch

    d = _copy(tiny["qwen3-moe"], tmp)
    _put(d, "model.layers.1.mlp.experts.gate_up_proj", torch.zeros(4, 48, 48, dtype=torch.bfloat16))
    _put(d, "model.layers.1.mlp.experts.down_proj", torch.zeros(4, 24, 48, dtype=torch.bfloat16))
    return _scan(d)


# -- MTP, unclassified keys --------------------------------------------------------------------------------
@case("mtp.incomplete", also=("MTP depth 0 lacks hnorm.weight",))
def mtp_declared_but_incomplete(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _metadata_only(LAYOUTS / "glm4-moe-mtp", tmp)
    doc = _index(d)
    del doc["weight_map"]["model.layers.4.hnorm.weight"]
    _write_index(d, doc)
    return _scan(d)


@case("unclassified key(s)", exit=2, also=("model.layers.0.mlp.mystery.weight",))
def unclassified_key(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    import torch

    d = _copy(tiny["qwen3"], tmp)
    _put(d, "model.layers.0.mlp.mystery.weight", torch.zeros(4, dtype=torch.bfloat16))
    return _scan(d)


# -- paths outside the checkpoint --------------------------------------------------------------------------
@case("index.unsafe-shard-name", also=("'../outside.safetensors'",))
def shard_name_with_dotdot(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    shutil.copy(d / "model-00001-of-00003.safetensors", tmp / "outside.safetensors")
    doc = _index(d)
    doc["weight_map"] = {k: ("../outside.safetensors" if v.startswith("model-00001") else v)
                         for k, v in doc["weight_map"].items()}
    _write_index(d, doc)
    return _scan(d)


@case("index.unsafe-shard-name", also=("'/",))
def shard_name_absolute(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    doc = _index(d)
    absolute = str((d / "model-00001-of-00003.safetensors").resolve())
    doc["weight_map"] = {k: (absolute if v.startswith("model-00001") else v) for k, v in doc["weight_map"].items()}
    _write_index(d, doc)
    return _scan(d)


@case("index.shard-outside-checkpoint")
def symlinked_shard_outside(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    shard = d / "model-00002-of-00003.safetensors"
    (tmp / "elsewhere").mkdir()
    shard.rename(tmp / "elsewhere" / shard.name)
    shard.symlink_to(tmp / "elsewhere" / shard.name)
    return _scan(d)


# -- injection into generated modules ----------------------------------------------------------------------
_EVIL_KEY = 'model.layers.0.mlp.down_proj.weight"); __import__("os").system("touch PWNED") #'


@case("emit.unclassified", exit=2, also=("touch PWNED",))
def key_crafted_to_inject_code(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    """emit refuses the layout (the key fits no family) and writes nothing; no PWNED file appears (the whole
    directory is compared). Strings that *are* rendered reach modules only through repr (test_emit_injection)."""
    import torch

    d = _copy(tiny["qwen3"], tmp)
    _put(d, _EVIL_KEY, torch.zeros(4, dtype=torch.bfloat16))
    return ["emit", str(d), "--out", str(tmp / "generated")]


# -- runtime: refused before workers start or anything is written -------------------------------------------
@case("parallel.divisibility", also=("num_attention_heads=4 is not divisible by tp=3",
                                     "num_query_groups=2 is not divisible by tp=3",
                                     "ffn_hidden_size=40 is not divisible by tp=3",
                                     "num_layers=2 is not divisible by pp=4"))
def convert_tp_pp_do_not_divide(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    """All four problems at once, from the launching process (no 12-worker world is started)."""
    d = _copy(tiny["qwen3"], tmp)
    return ["convert", str(d), str(tmp / "out"), "--tp", "3", "--pp", "4"]


@case("parallel.divisibility", also=("num_moe_experts=4 is not divisible by ep=3",))
def convert_ep_does_not_divide_experts(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3-moe"], tmp)
    return ["convert", str(d), str(tmp / "out"), "--ep", "3"]


@case("parallel.divisibility", also=("not divisible by tp=5",))
def verify_tp_does_not_divide(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    return ["verify", str(d), "--tp", "5"]


@case("output.exists", also=("--overwrite",))
def convert_output_exists(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("not a checkpoint\n")
    return ["convert", str(d), str(tmp / "out")]


@case("output.overlaps-source", also=("contains the source",))
def convert_overwrite_a_parent_of_the_source(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    """``--overwrite`` replaces the whole target: pointed at the source's parent it would delete the source."""
    _copy(tiny["qwen3"], tmp / "models", "qwen3")
    return ["convert", str(tmp / "models" / "qwen3"), str(tmp / "models"), "--overwrite"]


@case("output.is-source")
def convert_overwrite_the_source(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    return ["convert", str(d), str(d), "--overwrite"]


@case("checkpoint.missing-shard", also=("metadata only",))
def convert_metadata_only_checkpoint(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _metadata_only(tiny["qwen3"], tmp)
    return ["convert", str(d), str(tmp / "out")]


@case("shape.mismatch", also=("model.layers.{layer}.self_attn.k_proj.weight",))
def convert_tensor_with_wrong_shape(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    import torch

    d = _copy(tiny["qwen3"], tmp)
    _put(d, "model.layers.1.self_attn.k_proj.weight", torch.zeros(12, 48, dtype=torch.bfloat16))
    return ["convert", str(d), str(tmp / "out"), "--tp", "2"]


@case("keys.missing-top-level", also=("no final norm tensor",))
def convert_checkpoint_missing_a_tensor(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    _drop(d, "model.norm.weight")
    return ["convert", str(d), str(tmp / "out")]


@case("bridge.unknown-layout", also=("mapgen never falls back to a similar model",))
def convert_layer_missing_a_tensor(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    """Layer 1 without its q_norm is another layout: no bridge is proven for it, so nothing is converted."""
    d = _copy(tiny["qwen3"], tmp)
    _drop(d, "model.layers.1.self_attn.q_norm.weight")
    return ["convert", str(d), str(tmp / "out")]


@case("scan.unclassified", exit=2, also=("model.layers.0.mlp.mystery.weight",))
def convert_unclassified_key(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    import torch

    d = _copy(tiny["qwen3"], tmp)
    _put(d, "model.layers.0.mlp.mystery.weight", torch.zeros(4, dtype=torch.bfloat16))
    return ["convert", str(d), str(tmp / "out")]


@case("semantics.unsupported", also=("norm_topk_prob", "--accept-semantic-gap norm_topk_prob"))
def convert_routing_the_bridge_cannot_express(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    """The round trip would be bitwise, but the Megatron model would route differently: refused by name."""
    d = _copy(tiny["qwen3-moe"], tmp)
    _config(d, num_experts_per_tok=1)  # renormalised top-1: megatron-core requires pre-softmax at top-1
    return ["convert", str(d), str(tmp / "out")]


@case("config.invalid-value", also=("rms_norm_eps must be a positive number",))
def verify_negative_epsilon(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    _config(d, rms_norm_eps=-1)
    return ["verify", str(d), "--tp", "2"]


@case("config.unknown-field", also=("'frobnicate'", "--assume-inert frobnicate"))
def scan_unknown_config_key(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    _config(d, frobnicate=True)
    return _scan(d)


@case("scope.no-lm-head", also=("out of scope",))
def scan_reward_model(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    d = _copy(tiny["qwen3"], tmp)
    _config(d, architectures=["Qwen3ForSequenceClassification"])
    return _scan(d)


@case("megatron.no-metadata", also=("pass --source",))
def export_directory_without_mapgen_metadata(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    (tmp / "ckpt" / "release").mkdir(parents=True)
    (tmp / "ckpt" / "latest_checkpointed_iteration.txt").write_text("release\n")
    return ["export", str(tmp / "ckpt"), str(tmp / "out")]


@case("output.exists")
def export_output_exists(tmp: Path, tiny: dict[str, Path]) -> list[str]:
    from mapgen.infer import scan
    from mapgen.ir import layout_to_json

    ckpt = tmp / "ckpt"
    (ckpt / "release").mkdir(parents=True)
    meta = {"layout": json.loads(layout_to_json(scan(str(tiny["qwen3"]))))}
    (ckpt / "mapgen.json").write_text(json.dumps(meta))
    (tmp / "out").mkdir()
    (tmp / "out" / "config.json").write_text("{}\n")
    return ["export", str(ckpt), str(tmp / "out")]


# ---------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: files by sha256, symlinks by target, directories by name."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_mapgen(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "mapgen", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env, check=False)


def test_catalog_is_large_enough() -> None:
    assert len(CASES) >= 20
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.id.split("_")[0] for c in CASES} >= {"convert", "export", "verify"}


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input(bad: Case, tmp_path: Path, tiny: dict[str, Path]) -> None:
    args = bad.build(tmp_path, tiny)
    before = snapshot(tmp_path)
    result = run_mapgen(args, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == bad.exit, output
    marker = f"error: {bad.code}:" if "." in bad.code else bad.code
    assert marker in result.stderr, output
    for text in bad.also:
        assert text in result.stderr, output
    assert "Traceback" not in output
    after = snapshot(tmp_path)
    assert after == before, f"left behind or changed: {sorted(set(after.items()) ^ set(before.items()))}"
