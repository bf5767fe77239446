"""mapgen.source: local directories, single files, safetensors headers, the hub cache, and bad input."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from scan_support import (
    CORPUS,
    CORPUS_PENDING,
    HUB_CASES,
    HUB_FIXTURES,
    SHARED_CORPUS,
    SNAPSHOT_SHA,
    make_hf_cache,
    safetensors_bytes,
    tiny_config,
    tiny_dense,
    write_checkpoint,
)

from mapgen.errors import MapgenError
from mapgen.source import MAX_HEADER_BYTES, canonical_sha256, parse_hub_id, read_header, read_source


def codes(exc: pytest.ExceptionInfo[MapgenError]) -> list[str]:
    return [d.code for d in exc.value.diagnostics]


# -- local metadata-only directories ---------------------------------------------------------------------
def test_corpus_dir_reads_index_without_shards() -> None:
    src = read_source(str(CORPUS / "qwen3.5-25b-reap-a3b-coding"))
    assert len(src.tensors) == 22213
    assert src.kind == "local_dir"
    assert len(src.shards) == 10
    assert src.index_metadata["total_shards"] == 10
    assert not src.headers_read
    info = src.tensors["lm_head.weight"]
    assert info.shape is None
    assert info.dtype is None
    assert info.shard.endswith(".safetensors")


def test_config_hash_is_canonical(tmp_path: Path) -> None:
    """CRLF line endings and indentation do not change the provenance hash."""
    crlf = CORPUS / "mimo-7b"
    assert b"\r\n" in (crlf / "config.json").read_bytes()
    lf = tmp_path / "mimo"
    lf.mkdir()
    (lf / "config.json").write_text(json.dumps(json.loads((crlf / "config.json").read_text())))
    (lf / "model.safetensors.index.json").write_bytes((crlf / "model.safetensors.index.json").read_bytes())
    a, b = read_source(str(crlf)), read_source(str(lf))
    assert a.config_sha256 == b.config_sha256 == canonical_sha256(a.config)
    assert a.index_sha256 == b.index_sha256


@pytest.mark.skipif(not SHARED_CORPUS.is_dir(), reason="../shared/corpus is only present in CI")
def test_fixture_copies_match_shared_corpus() -> None:
    """Every shared corpus case is copied byte for byte into the repository: supported cases under
    tests/fixtures/corpus/ (scan goldens), the breadth issue's cases under tests/fixtures/corpus_pending/."""
    for case in sorted(p.name for p in SHARED_CORPUS.iterdir() if p.is_dir()):
        home = CORPUS / case if (CORPUS / case).is_dir() else CORPUS_PENDING / case
        for name in ("config.json", "model.safetensors.index.json", "SOURCE.txt"):
            assert (home / name).read_bytes() == (SHARED_CORPUS / case / name).read_bytes(), (case, name)


# -- shards and headers -----------------------------------------------------------------------------------
def test_local_shards_give_shapes_and_dtypes(tmp_path: Path) -> None:
    tensors = tiny_dense()
    half = len(tensors) // 2
    items = list(tensors.items())
    shards = {
        "model-00001-of-00002.safetensors": dict(items[:half]),
        "model-00002-of-00002.safetensors": dict(items[half:]),
    }
    write_checkpoint(tmp_path / "ck", tiny_config(), shards)
    src = read_source(str(tmp_path / "ck"))
    assert src.headers_read
    assert src.tensors["model.layers.1.mlp.down_proj.weight"].shape == (8, 16)
    assert src.tensors["lm_head.weight"].dtype == "BF16"
    assert src.shards == tuple(shards)
    no_headers = read_source(str(tmp_path / "ck"), headers=False)
    assert no_headers.tensors["lm_head.weight"].shape is None


def test_single_model_safetensors_without_index(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ck", tiny_config(), {"model.safetensors": tiny_dense()}, index=False)
    by_dir = read_source(str(tmp_path / "ck"))
    by_file = read_source(str(tmp_path / "ck" / "model.safetensors"))
    assert set(by_dir.tensors) == set(by_file.tensors) == set(tiny_dense())
    assert by_file.kind == "single_file"
    assert by_file.tensors["model.norm.weight"].shape == (8,)


def test_header_is_read_without_touching_data(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes({"a": (1024, 1024)}))
    header = read_header(path)
    assert header["a"].shape == (1024, 1024)


# -- bad input: each a specific diagnostic ----------------------------------------------------------------
def test_missing_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(MapgenError) as exc:
        read_source(str(tmp_path))
    assert codes(exc) == ["source.missing-file"]
    assert exc.value.diagnostics[0].file == "config.json"


def test_missing_index(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MapgenError) as exc:
        read_source(str(tmp_path))
    assert codes(exc) == ["source.missing-index"]


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
    with pytest.raises(MapgenError) as exc:
        read_source(str(tmp_path))
    d = exc.value.diagnostics[0]
    assert (d.code, d.file) == ("json.malformed", "config.json")
    assert "line 3" in d.message


def test_index_without_weight_map(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(MapgenError) as exc:
        read_source(str(tmp_path))
    assert codes(exc) == ["index.malformed"]


def test_absent_shard_when_others_are_local(tmp_path: Path) -> None:
    items = list(tiny_dense().items())
    shards = {"a.safetensors": dict(items[:5]), "b.safetensors": dict(items[5:])}
    ck = write_checkpoint(tmp_path / "ck", tiny_config(), shards)
    (ck / "b.safetensors").unlink()
    with pytest.raises(MapgenError) as exc:
        read_source(str(ck))
    assert codes(exc) == ["index.missing-shard"]
    assert "b.safetensors" in exc.value.diagnostics[0].message


@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/passwd", "sub/../../x.safetensors", "C:\\x.safetensors"])
def test_unsafe_shard_names(tmp_path: Path, name: str) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(MapgenError) as exc:
        read_source(str(tmp_path))
    assert codes(exc) == ["index.unsafe-shard-name"]


def test_symlinked_shard_outside_checkpoint(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(safetensors_bytes(tiny_dense()))
    ck = write_checkpoint(tmp_path / "ck", tiny_config(), {"model.safetensors": tiny_dense()}, write_shards=False)
    (ck / "model.safetensors").symlink_to(outside)
    with pytest.raises(MapgenError) as exc:
        read_source(str(ck))
    assert codes(exc) == ["index.shard-outside-checkpoint"]


def test_truncated_header(tmp_path: Path) -> None:
    good = safetensors_bytes(tiny_dense())
    ck = write_checkpoint(tmp_path / "ck", tiny_config(), {"model.safetensors": tiny_dense()}, write_shards=False)
    (ck / "model.safetensors").write_bytes(good[:40])
    with pytest.raises(MapgenError) as exc:
        read_source(str(ck))
    assert codes(exc) == ["safetensors.truncated"]
    (ck / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(MapgenError) as exc:
        read_source(str(ck))
    assert codes(exc) == ["safetensors.truncated"]


def test_absurd_header_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(MapgenError) as exc:
        read_header(path)
    assert codes(exc) == ["safetensors.header-too-large"]


def test_header_not_json(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(MapgenError) as exc:
        read_header(path)
    assert codes(exc) == ["safetensors.malformed-header"]


def test_index_key_missing_from_shard_header(tmp_path: Path) -> None:
    ck = write_checkpoint(tmp_path / "ck", tiny_config(), {"model.safetensors": tiny_dense()})
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.ghost.weight"] = "model.safetensors"
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MapgenError) as exc:
        read_source(str(ck))
    assert codes(exc) == ["index.key-not-in-shard"]


def test_not_found_and_not_hub_id() -> None:
    with pytest.raises(MapgenError) as exc:
        read_source("./no/such/dir")
    assert codes(exc) == ["source.not-found"]


# -- hub ids ------------------------------------------------------------------------------------------------
def test_parse_hub_id() -> None:
    assert parse_hub_id("Qwen/Qwen3.6-35B-A3B") == ("Qwen/Qwen3.6-35B-A3B", None)
    assert parse_hub_id("Qwen/Qwen3.6-35B-A3B@main") == ("Qwen/Qwen3.6-35B-A3B", "main")
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for bad in ("a/b/c", "noslash", "../x", "a/..", "/abs/path"):
        assert parse_hub_id(bad) is None, bad


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME in tmp_path, offline. huggingface_hub reads these at import time, so patch its constants too."""
    import huggingface_hub.constants as hc

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HOME", str(home))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return home


def test_hub_id_from_offline_cache(offline_cache: Path) -> None:
    folder, repo = HUB_CASES["hub-qwen3.6-35b-a3b"]
    make_hf_cache(offline_cache, repo, HUB_FIXTURES / folder)
    src = read_source(repo)
    local = read_source(str(HUB_FIXTURES / folder))
    assert src.kind == "hub"
    assert src.origin == repo
    assert set(src.tensors) == set(local.tensors)
    assert src.config == local.config
    assert src.config_sha256 == local.config_sha256
    assert src.index_sha256 == local.index_sha256
    by_rev = read_source(f"{repo}@{SNAPSHOT_SHA}")
    assert by_rev.origin == f"{repo}@{SNAPSHOT_SHA}"
    assert set(by_rev.tensors) == set(src.tensors)


def test_hub_id_not_cached_offline(offline_cache: Path) -> None:
    with pytest.raises(MapgenError) as exc:
        read_source("Nobody/Nothing")
    assert codes(exc) == ["hub.not-cached"]
    assert "HF_HUB_OFFLINE" in exc.value.diagnostics[0].hint


def test_hub_headers_offline_is_a_diagnostic(offline_cache: Path) -> None:
    folder, repo = HUB_CASES["hub-qwen3.5-35b-a3b"]
    make_hf_cache(offline_cache, repo, HUB_FIXTURES / folder)
    with pytest.raises(MapgenError) as exc:
        read_source(repo, headers=True)
    assert codes(exc)[0].startswith("hub.")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
