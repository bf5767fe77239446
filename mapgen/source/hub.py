"""Hugging Face Hub ids (``Org/Name[@revision]``), resolved through ``huggingface_hub``.

Only ``config.json`` and ``model.safetensors.index.json`` are fetched (``hf_hub_download``, which honours
``HF_HOME``, ``HF_HUB_OFFLINE`` and the local cache). Shapes come from the hub's safetensors-metadata API
(``HfApi.get_safetensors_metadata``: it reads shard headers with range requests) only when asked
(``headers=True``), or when the repo has no index and the key list itself must come from a header.
``huggingface_hub`` is imported lazily so that local scans never pay for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mapgen.errors import Diagnostic, MapgenError
from mapgen.source.base import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    Source,
    build_source,
    parse_config,
    parse_index,
    read_json,
)
from mapgen.source.safetensors_header import HeaderEntry, read_header

HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9._/-]*))?$"
)


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``"Org/Name@rev"`` -> ``("Org/Name", "rev")``; ``None`` when ``spec`` is not a hub id."""
    m = HUB_ID.match(spec)
    if m is None or ".." in spec:
        return None
    return m.group("repo"), m.group("rev")


def _hub_error(exc: Exception, *, repo_id: str, filename: str) -> Diagnostic:
    from huggingface_hub import errors as hf_errors

    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = f"{repo_id}/{filename}"
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        return Diagnostic(
            "error",
            "hub.not-cached",
            f"{filename} of {repo_id} is not in the local Hugging Face cache and the hub cannot be reached",
            file=where,
            hint="download it once with network access (or unset HF_HUB_OFFLINE), or point HF_HOME at a cache "
            "that has it, or scan a local directory instead",
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return Diagnostic(
            "error",
            "hub.repo-not-found",
            f"no such model repository {repo_id!r} (or it is private/gated)",
            file=where,
            hint="check the id; for a local path, check the path exists",
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return Diagnostic("error", "hub.revision-not-found", first_line, file=where)
    if isinstance(exc, hf_errors.EntryNotFoundError | hf_errors.RemoteEntryNotFoundError):
        return Diagnostic("error", "hub.file-not-found", f"{repo_id} has no {filename}", file=where)
    return Diagnostic(
        "error",
        "hub.unavailable",
        f"{type(exc).__name__}: {first_line}",
        file=where,
        hint="check network access, or set HF_HUB_OFFLINE=1 to use the local cache only",
    )


def _is_absent(exc: Exception) -> bool:
    """The file is known to be absent (remote says so, or the cache recorded it as missing)."""
    from huggingface_hub import errors as hf_errors

    return isinstance(exc, hf_errors.EntryNotFoundError | hf_errors.RemoteEntryNotFoundError) and not isinstance(
        exc, hf_errors.LocalEntryNotFoundError
    )


def _download(repo_id: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision))


def _remote_headers(
    repo_id: str, revision: str | None
) -> tuple[dict[str, str], dict[str, dict[str, HeaderEntry]], dict[str, Any]]:
    """weight_map, headers by shard, and index metadata from the hub's safetensors-metadata API."""
    from huggingface_hub import HfApi

    meta = HfApi().get_safetensors_metadata(repo_id, revision=revision)
    headers: dict[str, dict[str, HeaderEntry]] = {}
    for fname, fmeta in meta.files_metadata.items():
        headers[fname] = {
            name: HeaderEntry(str(t.dtype), tuple(int(d) for d in t.shape)) for name, t in fmeta.tensors.items()
        }
    return dict(meta.weight_map), headers, dict(meta.metadata or {})


def _guard(call: Callable[[], Any], *, repo_id: str, filename: str) -> Any:
    try:
        return call()
    except MapgenError:
        raise
    except Exception as exc:  # huggingface_hub/httpx errors become diagnostics, never tracebacks
        raise MapgenError(_hub_error(exc, repo_id=repo_id, filename=filename)) from None


def read_hub(repo_id: str, revision: str | None = None, *, headers: bool = False) -> Source:
    origin = f"{repo_id}@{revision}" if revision else repo_id
    config_path: Path = _guard(lambda: _download(repo_id, CONFIG_NAME, revision), repo_id=repo_id, filename=CONFIG_NAME)
    snapshot = config_path.parent
    config = parse_config(read_json(config_path, display=CONFIG_NAME, what="config.json"), display=CONFIG_NAME)

    index_path: Path | None = None
    try:
        index_path = _download(repo_id, INDEX_NAME, revision)
    except Exception as exc:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, SINGLE_NAME, revision=revision)
        if isinstance(cached, str):  # a single-file checkpoint already in the cache
            return _single_cached(Path(cached), origin=origin, config=config, snapshot=snapshot)
        if not _is_absent(exc):  # neither the index nor a single file is available
            raise MapgenError(_hub_error(exc, repo_id=repo_id, filename=INDEX_NAME)) from None

    if index_path is not None:
        index_doc = read_json(index_path, display=INDEX_NAME, what="the safetensors index")
        weight_map, meta = parse_index(index_doc, display=INDEX_NAME)
        known: dict[str, dict[str, HeaderEntry]] | None = None
        if headers:
            _, known, _ = _guard(lambda: _remote_headers(repo_id, revision), repo_id=repo_id, filename="*.safetensors")
        return build_source(
            origin=origin,
            kind="hub",
            root=snapshot,
            config=config,
            weight_map=weight_map,
            index_doc=index_doc,
            index_metadata=meta,
            index_display=INDEX_NAME,
            shard_dir=None,
            allowed_roots=(),
            headers=headers,
            known_headers=known,
        )

    # No index: a single-file checkpoint. The key list itself must come from the header.
    weight_map, known, meta = _guard(lambda: _remote_headers(repo_id, revision), repo_id=repo_id, filename=SINGLE_NAME)
    return _single_file_source(weight_map, known, meta, origin=origin, config=config, snapshot=snapshot)


def _single_cached(path: Path, *, origin: str, config: dict[str, Any], snapshot: Path) -> Source:
    header = read_header(path, display=SINGLE_NAME)
    weight_map = dict.fromkeys(header, SINGLE_NAME)
    return _single_file_source(weight_map, {SINGLE_NAME: header}, {}, origin=origin, config=config,
                               snapshot=snapshot)


def _single_file_source(
    weight_map: dict[str, str], known: dict[str, dict[str, HeaderEntry]], meta: dict[str, Any], *, origin: str,
    config: dict[str, Any], snapshot: Path,
) -> Source:
    """A hub checkpoint without an index: its one header (cached or fetched) gives the key list."""
    return build_source(
        origin=origin,
        kind="hub",
        root=snapshot,
        config=config,
        weight_map=weight_map,
        index_doc={"metadata": {}, "weight_map": weight_map},
        index_metadata=meta,
        index_display=SINGLE_NAME,
        shard_dir=None,
        allowed_roots=(),
        headers=True,
        known_headers=known,
    )
