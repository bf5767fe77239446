"""Streaming convert: the dist checkpoint written entry by entry from the HF slices (no Megatron model in
memory) loads into megatron-core models exactly like the one the in-memory path writes.

For every layout the conversion tests cover -- dense and MoE Qwen3 written by transformers, Qwen3.6 (GDN,
packed experts, MTP), Qwen3.5 (per-expert experts, MTP), a GLM extra-layer MTP (duplicated tensors, fp32
router bias) and a mixed-dtype checkpoint (fp32 ``A_log`` among bf16) -- at TP=2, EP=2 (ETP=1), PP=2 and
TP=1, both paths convert the same source; then megatron-core's ``dist_checkpointing.load`` reads each
into a freshly built model and every tensor (values and dtype) is compared. The streamed checkpoint is
then exported both ways -- streaming (no model; each rank writes its share of the output shards) and in
memory at the same layout -- and both must equal the source bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests import tiny
from tests.runtime_support import HUB, LAYOUTS, one_tensor_per_shard, retype, synth

pytestmark = pytest.mark.distributed


def _compare_worker(cases: list[tuple[str, str, dict[str, Any], str]]) -> dict[str, Any]:
    import torch

    from mapgen.runtime.api import (
        DtypePlan,
        HFSource,
        Parallel,
        bind,
        build,
        compare_checkpoints,
        convert,
        export_megatron,
        parallel_context,
        read_megatron_meta,
    )
    from mapgen.runtime.megatron import load_dist_checkpoint

    out: dict[str, Any] = {}
    for name, src, layout, root in cases:
        par = Parallel(**layout)
        a, b = Path(root) / f"{name}-stream", Path(root) / f"{name}-memory"
        sa = convert(src, a, par, streaming=True)
        sb = convert(src, b, par, streaming=False)
        binding = bind(HFSource.open(src).layout)
        meta_a, meta_b = read_megatron_meta(a), read_megatron_meta(b)
        dtypes = DtypePlan.from_json(meta_a["dtype"])
        problems = [] if meta_a["dtype"] == meta_b["dtype"] else [f"dtype plans differ: {meta_a['dtype']}"]
        with parallel_context(par) as coords:
            ma = build(binding, par, initialize=False, dtypes=dtypes)
            mb = build(binding, par, initialize=False, dtypes=dtypes)
            with torch.no_grad():  # different garbage in both, so that a tensor left unloaded shows
                for t in ma.state_dict().values():
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        t.fill_(1.0)
                for t in mb.state_dict().values():
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        t.fill_(2.0)
            load_dist_checkpoint(ma, a / "release")
            load_dist_checkpoint(mb, b / "release")
            sda, sdb = ma.state_dict(), mb.state_dict()
            keys = [k for k, v in sda.items() if isinstance(v, torch.Tensor)]
            if sorted(keys) != sorted(k for k, v in sdb.items() if isinstance(v, torch.Tensor)):
                problems.append("different state-dict keys")
            for k in keys:
                ta, tb = sda[k], sdb[k]
                if ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(ta, tb):
                    problems.append(f"{k}: {ta.dtype}{tuple(ta.shape)} vs {tb.dtype}{tuple(tb.shape)}")
            dtypes_seen = sorted({str(sda[k].dtype) for k in keys})
        # Export both ways (streaming: each rank writes its share of the shards; in memory at the layout).
        ea, eb = Path(root) / f"{name}-hf-stream", Path(root) / f"{name}-hf-memory"
        export_megatron(a, ea, par, source_path=src, streaming=True)
        export_megatron(a, eb, par, source_path=src, streaming=False)
        if coords.rank == 0:
            for label, path in (("streaming export", ea), ("in-memory export", eb)):
                rt = compare_checkpoints(Path(src), path)
                problems += [f"{label}: {m}" for m in rt.mismatches[:5]]
        out[name] = {"problems": problems, "tensors": len(keys), "dtypes": dtypes_seen,
                     "read_stream": sa.bytes_read, "read_memory": sb.bytes_read,
                     "copied": sa.extra.get("bytes_copied", 0), "written": sa.extra["bytes_written"]}
    return out


SOURCES: dict[str, tuple[Path | None, tuple[str, ...]]] = {
    "qwen3": (None, ()),
    "qwen3-moe": (None, ()),
    "qwen3-moe-small-shards": (None, ()),  # one tensor per shard: a layer's experts span many output shards
    "qwen3.6-mtp2": (HUB / "Qwen--Qwen3.6-35B-A3B", ("--mtp-depth", "2")),
    "qwen3.5-mtp1": (HUB / "Qwen--Qwen3.5-35B-A3B", ("--mtp-depth", "1")),
    "glm4-moe-mtp": (LAYOUTS / "glm4-moe-mtp", ()),
    "qwen3.6-mixed": (HUB / "Qwen--Qwen3.6-35B-A3B", ("--mtp-depth", "1")),
}
LAYOUTS_2 = {"tp2": {"tp": 2}, "ep2": {"ep": 2, "etp": 1}, "pp2": {"pp": 2}}
CASES = [
    ("qwen3-tp2", "qwen3", "tp2"), ("qwen3-pp2", "qwen3", "pp2"),
    ("qwen3-moe-tp2", "qwen3-moe", "tp2"), ("qwen3-moe-ep2", "qwen3-moe", "ep2"),
    ("qwen3-moe-small-shards-ep2", "qwen3-moe-small-shards", "ep2"),
    ("qwen3.6-mtp2-tp2", "qwen3.6-mtp2", "tp2"), ("qwen3.6-mtp2-ep2", "qwen3.6-mtp2", "ep2"),
    ("qwen3.5-mtp1-ep2", "qwen3.5-mtp1", "ep2"), ("glm4-moe-mtp-tp2", "glm4-moe-mtp", "tp2"),
    ("qwen3.6-mixed-tp2", "qwen3.6-mixed", "tp2"),
]
CASES_1 = [("qwen3-moe-tp1", "qwen3-moe"), ("qwen3.6-mtp2-tp1", "qwen3.6-mtp2")]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from mapgen.runtime.api import spawn

    root = tmp_path_factory.mktemp("stream")
    paths: dict[str, Path] = {}
    for name, (src, args) in SOURCES.items():
        if name == "qwen3-moe-small-shards":
            paths[name] = tiny.write("qwen3-moe", root / name)
            assert one_tensor_per_shard(paths[name]) > 40
        elif src is None:
            paths[name] = tiny.write(name, root / name)
        else:
            paths[name] = synth(src, root / name, *args)
    assert retype(paths["qwen3.6-mixed"], (".A_log",))
    out = root / "out"
    out.mkdir()
    batch = [(case, str(paths[src]), LAYOUTS_2[lay], str(out)) for case, src, lay in CASES]
    per_rank = spawn(_compare_worker, 2, batch)
    single = spawn(_compare_worker, 1, [(case, str(paths[src]), {}, str(out)) for case, src in CASES_1])
    return {**per_rank[0], **single[0], "_ranks": per_rank, "_out": out, "_paths": paths}


@pytest.mark.parametrize("name", [c[0] for c in CASES] + [c[0] for c in CASES_1])
def test_streaming_checkpoint_loads_like_the_in_memory_one(results: dict[str, Any], name: str) -> None:
    r = results[name]
    assert r["tensors"] > 0
    assert r["problems"] == [], r["problems"][:10]
    want = ["torch.bfloat16", "torch.float32"] if "mixed" in name or "glm4" in name else ["torch.bfloat16"]
    assert r["dtypes"] == want


def test_plain_copies_go_file_to_file(results: dict[str, Any]) -> None:
    """Entries that are byte ranges of the source (whole tensors, row blocks, gate/up halves, q/k/v groups,
    one packed expert) are copied in the kernel rather than produced: most of the bytes at every layout
    (what is left: padded vocabularies, column chunks of row-parallel matrices, GDN, norms with a transform,
    casts). The identity with the in-memory path above covers their bytes."""
    for per_rank in [results["_ranks"][0], {n: results[n] for n, _ in CASES_1}]:
        for name, r in per_rank.items():
            assert 0 < r["copied"] <= r["written"], (name, r)
    # At TP=1 everything but the two vocabulary matrices (160 rows padded to 256: 37% of this tiny model)
    tp1 = results["qwen3-moe-tp1"]
    assert tp1["copied"] == tp1["written"] - 2 * 256 * 48 * 2, tp1


def test_streaming_ranks_read_no_more_than_the_in_memory_path(results: dict[str, Any]) -> None:
    """Each rank reads only what it writes (main replicas), never more than when it filled a whole model."""
    for per_rank in results["_ranks"]:
        for name, r in per_rank.items():
            assert r["read_stream"] <= r["read_memory"], (name, r)


def test_recorded_dtype(tmp_path: Path) -> None:
    """bf16 source -> bf16 checkpoint, recorded in mapgen.json; --dtype float32 is honoured."""
    from mapgen.cli import main

    src = tiny.write("qwen3", tmp_path / "hf")
    assert main(["convert", str(src), str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "mapgen.json").read_text())["dtype"]["params_dtype"] == "bfloat16"
    assert main(["convert", str(src), str(tmp_path / "b"), "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "b" / "mapgen.json").read_text())["dtype"]["params_dtype"] == "float32"
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    for name, want in (("a", "torch.bfloat16"), ("b", "torch.float32")):
        md = FileSystemReader(str(tmp_path / name / "release")).read_metadata()
        stored = {str(m.properties.dtype) for m in md.state_dict_metadata.values() if hasattr(m, "properties")}
        assert stored == {want}, (name, stored)


def test_no_fsync_is_recorded_and_skips_only_the_data_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default every data file is fsynced (as megatron-core's writer does); --no-fsync skips that, says so
    in mapgen.json, and leaves the same checkpoint (the metadata megatron-core writes is still fsynced)."""
    import os

    from torch.distributed.checkpoint.filesystem import FileSystemReader

    from mapgen.cli import main

    src = tiny.write("qwen3", tmp_path / "hf")
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for name, flags in (("a", []), ("b", ["--no-fsync"])):
        synced.clear()
        assert main(["convert", str(src), str(tmp_path / name), *flags]) == 0
        data = [p for p in synced if p.endswith(".distcp")]
        assert (len(data) == 1) == (name == "a"), synced
        assert json.loads((tmp_path / name / "mapgen.json").read_text())["fsync"] == (name == "a")
    a, b = (FileSystemReader(str(tmp_path / n / "release")).read_metadata() for n in ("a", "b"))
    assert a.state_dict_metadata.keys() == b.state_dict_metadata.keys()
    files = [sorted(p.read_bytes() for p in (tmp_path / n / "release").glob("*.distcp")) for n in ("a", "b")]
    assert files[0] == files[1]


def test_file_to_file_copies_write_the_bytes_the_produced_path_writes(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The same checkpoint, byte for byte, whether its plain entries are copied file to file or produced in
    memory and written by torch.save (the copy path switched off)."""
    from mapgen.cli import main
    from mapgen.runtime.engine import EntryProducer

    src = tiny.write("qwen3-moe", tmp_path / "hf")
    copied: list[int] = []
    real = EntryProducer.copied

    def count(self: EntryProducer, local: str, nbytes: int) -> None:
        copied.append(nbytes)
        real(self, local, nbytes)

    monkeypatch.setattr(EntryProducer, "copied", count)
    assert main(["convert", str(src), str(tmp_path / "a")]) == 0
    assert len(copied) > 20
    monkeypatch.setattr(EntryProducer, "spans", lambda self, local: None)
    assert main(["convert", str(src), str(tmp_path / "b")]) == 0
    files = [{p.name: p.read_bytes() for p in (tmp_path / n / "release").glob("*.distcp")} for n in ("a", "b")]
    assert files[0].keys() == files[1].keys()
    assert files[0] == files[1]


def test_dry_run_predicts_what_convert_reads_and_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run writes nothing; its per-rank read bytes are what the conversion then reads."""
    import re

    from mapgen.cli import main

    src = tiny.write("qwen3-moe", tmp_path / "hf")
    out = tmp_path / "mcore"
    assert main(["convert", str(src), str(out), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert not out.exists()
    assert "dry run" in dry
    assert "disk needed" in dry
    assert "plain-read floor here" in dry
    row = re.search(r"^\s+0\s+([\d.]+) MiB\s+([\d.]+) MiB", dry, re.M)
    assert row, dry
    assert main(["convert", str(src), str(out)]) == 0
    done = capsys.readouterr().out
    read = re.search(r"read rank 0: ([\d.]+) MiB", done)
    assert read, done
    assert read.group(1) == row.group(1)
    assert main(["export", str(out), str(tmp_path / "back"), "--dry-run"]) == 0
    assert "dry run: mapgen export" in capsys.readouterr().out
    assert not (tmp_path / "back").exists()


def _args_worker(cases: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Build the model from megatron_args.txt alone (as Megatron-LM would), load the checkpoint into it with
    dist_checkpointing.load (strict), and export it to HF through the layout's bridge."""
    import dataclasses
    import shutil
    import tempfile

    import torch

    from mapgen.ops import padded_vocab
    from mapgen.runtime.api import (
        HFSource,
        Parallel,
        bind,
        compare_checkpoints,
        export_hf,
        parallel_context,
    )
    from mapgen.runtime.megatron import build_model, load_dist_checkpoint, transformer_config
    from mapgen.runtime.megatron_args import ARGS_FILE, canonical, from_text, spec_from_args

    out: dict[str, Any] = {}
    for name, src, ckpt in cases:
        argv = from_text((Path(ckpt) / ARGS_FILE).read_text())
        spec, run = spec_from_args(argv)
        source = HFSource.open(src)
        binding = bind(source.layout)
        par = Parallel(tp=run["tp"], ep=run["ep"], etp=run["etp"], pp=run["pp"])
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[run["dtype"]]
        with parallel_context(par) as coords:
            mine, theirs = transformer_config(binding.spec), transformer_config(spec)
            differ = [f.name for f in dataclasses.fields(mine)
                      if not callable(getattr(mine, f.name)) and getattr(mine, f.name) != getattr(theirs, f.name)]
            padded = spec.replace(vocab_size=padded_vocab(spec.vocab_size, run["tp"], run["divisible_by"]))
            model = build_model(padded, params_dtype=dtype, initialize=False)
            model.mapgen_vocab_size = spec.vocab_size
            load_dist_checkpoint(model, Path(run["load"]) / "release")
            tmp = Path(tempfile.mkdtemp(prefix="mapgen-args-")) if coords.rank == 0 else Path()
            export_hf(model, binding, tmp / "hf", target=source.to_meta(), source_root=source.root)
            mismatches = compare_checkpoints(source.root, tmp / "hf").mismatches if coords.rank == 0 else []
            if coords.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
        out[name] = {"spec_equal": spec == canonical(binding.spec), "config_differs": differ, "mismatches": mismatches,
                     "load": run["load"], "ckpt": str(Path(ckpt).resolve())}
    return out


ARGS_CASES = ["qwen3-moe-ep2", "qwen3-pp2", "qwen3.6-mtp2-tp2", "glm4-moe-mtp-tp2", "qwen3.6-mixed-tp2"]


def test_megatron_lm_arguments_build_a_model_that_loads_the_checkpoint(results: dict[str, Any]) -> None:
    """megatron_args.txt parses back to the bridge's own ModelSpec and TransformerConfig; a model built from
    it alone loads the checkpoint (dist_checkpointing.load, strict) and exports to the source, bitwise."""
    from mapgen.runtime.api import spawn

    src = {case: lay for case, lay, _ in CASES}
    cases = [(c, str(results["_paths"][src[c]]), str(results["_out"] / f"{c}-stream")) for c in ARGS_CASES]
    per_rank = spawn(_args_worker, 2, cases)
    for name, r in per_rank[0].items():
        assert r["spec_equal"], name
        assert r["config_differs"] == [], (name, r["config_differs"])
        assert r["mismatches"] == [], (name, r["mismatches"][:5])
        assert r["load"] == r["ckpt"]
