"""What a checkpoint's metadata looks like once read: :class:`Source` and :class:`TensorInfo`.

Also the pieces every reader shares: JSON files read with specific diagnostics, shard-name validation,
and assembling a :class:`Source` from a config, a weight map and (optionally) shard headers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple

from mapgen.errors import Diagnostic, MapgenError
from mapgen.source.safetensors_header import HeaderEntry, read_header

SourceKind = Literal["local_dir", "single_file", "hub"]
CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class TensorInfo(NamedTuple):
    """Where a tensor lives and, when a header was read, its dtype and shape."""

    shard: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Source:
    """A checkpoint's metadata: parsed config, every tensor key, and provenance hashes.

    ``config_sha256`` / ``index_sha256`` hash the *canonical* JSON (``json.dumps(obj, sort_keys=True)``,
    UTF-8) of the parsed config and index (for a single-file checkpoint, of the synthesised index
    ``{"metadata": {}, "weight_map": {key: file}}``), so whitespace or line endings never change them.
    They are computed on first use (hashing a 20k-key index costs more than classifying it).
    """

    origin: str
    kind: SourceKind
    root: Path | None
    config: dict[str, Any]
    tensors: Mapping[str, TensorInfo]
    shards: tuple[str, ...]
    index_metadata: Mapping[str, Any]
    index_doc: Any = field(default=None, repr=False, compare=False)
    headers_read: bool = False
    diagnostics: tuple[Diagnostic, ...] = field(default=())

    @property
    def keys(self) -> list[str]:
        return sorted(self.tensors)

    @cached_property
    def config_sha256(self) -> str:
        return canonical_sha256(self.config)

    @cached_property
    def index_sha256(self) -> str:
        return canonical_sha256(self.index_doc)


def canonical_sha256(obj: Any) -> str:
    """sha256 of ``json.dumps(obj, sort_keys=True)`` encoded as UTF-8."""
    import hashlib  # lazily: scanning does not need it

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def read_json(path: Path, *, display: str, what: str, hint: str = "") -> Any:
    """Parse a JSON file; missing or malformed files become specific diagnostics (never executed)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise MapgenError(
            Diagnostic("error", "source.missing-file", f"{what} not found", file=display, hint=hint)
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MapgenError(
            Diagnostic("error", "source.unreadable", f"cannot read {what}: {exc}", file=display)
        ) from None
    duplicates: list[str] = []

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):  # rare: only then look for which keys repeat
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    duplicates.append(k)
                seen.add(k)
        return obj

    try:
        doc = json.loads(text)
        # Each key of the text is followed by exactly one ':' outside any string, so the text's colons bound the
        # number of keys from above; when the parsed objects hold that many, no key repeated (json.loads would
        # have kept only the last). Otherwise (a repeat, or colons inside strings) parse again and find out: the
        # hook (a tuple per key, a second dict per object) costs more than counting, so it runs only then.
        if text.count(":") != _key_count(doc):
            doc = json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as exc:
        raise MapgenError(
            Diagnostic(
                "error",
                "json.malformed",
                f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                file=display,
                expected="a JSON object",
            )
        ) from None
    if duplicates:  # json.loads would silently keep the last one: a tensor could change shard unnoticed
        raise MapgenError(
            Diagnostic(
                "error",
                "json.duplicate-key",
                f"{what} names {duplicates[0]!r} more than once ({len(duplicates)} duplicate key(s))",
                file=display,
                key=duplicates[0],
                expected="each key once",
            )
        )
    return doc


def _key_count(doc: Any) -> int:
    """How many object keys ``doc`` (parsed JSON) holds, nested objects included. The values of a flat object (a
    weight map) are looked at by type only, in one pass at C speed."""
    values: Iterable[Any]
    if isinstance(doc, dict):
        count, values = len(doc), doc.values()
    elif isinstance(doc, list):
        count, values = 0, doc
    else:
        return 0
    kinds = set(map(type, values))
    if dict in kinds or list in kinds:
        count += sum(map(_key_count, values))
    return count


def parse_config(obj: Any, *, display: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise MapgenError(
            Diagnostic(
                "error",
                "config.not-object",
                "config.json is not a JSON object",
                file=display,
                expected='{"model_type": ..., "architectures": [...], ...}',
            )
        )
    return obj


def parse_index(obj: Any, *, display: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Validate an index document; return (weight_map, metadata)."""
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise MapgenError(
            Diagnostic(
                "error",
                "index.malformed",
                "index has no weight_map object of tensor name -> shard file name",
                file=display,
                expected='{"metadata": {...}, "weight_map": {"<tensor name>": "<shard file name>"}}',
            )
        )
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return wm, meta if isinstance(meta, dict) else {}


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def check_shard_name(name: str, *, display: str) -> Diagnostic | None:
    """A shard name must be a plain relative path inside the checkpoint: no ``..``, no absolute path."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(name) or ".." in parts or "" in parts:
        return Diagnostic(
            "error",
            "index.unsafe-shard-name",
            f"shard name {name!r} is not a relative path inside the checkpoint directory",
            file=display,
            expected="a file name such as 'model-00001-of-00004.safetensors'",
            hint="the index is corrupt or hostile; refusing to read outside the checkpoint",
        )
    return None


def _tensor_infos(
    weight_map: Mapping[str, str],
    shards: tuple[str, ...],
    header_by_shard: Mapping[str, Mapping[str, HeaderEntry]],
    index_display: str,
    errors: list[Diagnostic],
) -> dict[str, TensorInfo]:
    """Key -> TensorInfo; shards without a header share one record (scanning 20k keys stays cheap)."""
    bare = {shard: TensorInfo(shard) for shard in shards if shard not in header_by_shard}
    if not header_by_shard:
        return {key: bare[shard] for key, shard in weight_map.items()}
    tensors: dict[str, TensorInfo] = {}
    for key, shard in weight_map.items():
        header = header_by_shard.get(shard)
        if header is None:
            tensors[key] = bare[shard]
            continue
        entry = header.get(key)
        if entry is None:
            errors.append(
                Diagnostic(
                    "error",
                    "index.key-not-in-shard",
                    f"the index places {key!r} in {shard!r} but that shard's header has no such tensor",
                    file=index_display,
                    key=key,
                    expected=f"a tensor named {key!r} in {shard}",
                )
            )
            continue
        tensors[key] = TensorInfo(shard, entry.dtype, entry.shape)
    return tensors


def build_source(
    *,
    origin: str,
    kind: SourceKind,
    root: Path | None,
    config: dict[str, Any],
    weight_map: Mapping[str, str],
    index_doc: Any,
    index_metadata: Mapping[str, Any],
    index_display: str,
    shard_dir: Path | None,
    allowed_roots: tuple[Path, ...],
    headers: bool,
    known_headers: Mapping[str, Mapping[str, HeaderEntry]] | None = None,
    diagnostics: tuple[Diagnostic, ...] = (),
) -> Source:
    """Validate shard names, check local shards (presence, symlinks), read their headers, build a Source.

    ``known_headers`` supplies headers obtained elsewhere (the hub's metadata API), by shard name.
    """
    errors: list[Diagnostic] = []
    warnings: list[Diagnostic] = list(diagnostics)
    shards = tuple(dict.fromkeys(weight_map.values()))
    for shard in shards:
        bad = check_shard_name(shard, display=index_display)
        if bad is not None:
            errors.append(bad)
    if errors:
        raise MapgenError(errors)

    header_by_shard: dict[str, Mapping[str, HeaderEntry]] = dict(known_headers or {})
    if shard_dir is not None:
        present = [s for s in shards if (shard_dir / s).exists() or (shard_dir / s).is_symlink()]
        if present:  # shards are local: every one named must be there
            for shard in shards:
                if shard not in present:
                    errors.append(
                        Diagnostic(
                            "error",
                            "index.missing-shard",
                            f"the index names shard {shard!r} but it is not in the checkpoint directory",
                            file=index_display,
                            key=next(k for k, v in weight_map.items() if v == shard),
                            expected=f"{shard} beside the index (the other shards are present)",
                            hint="finish the download, or remove the partial shards to scan metadata only",
                        )
                    )
            for shard in present:
                path = shard_dir / shard
                resolved = path.resolve()
                if not any(resolved.is_relative_to(r) for r in allowed_roots):
                    errors.append(
                        Diagnostic(
                            "error",
                            "index.shard-outside-checkpoint",
                            f"shard {shard!r} resolves to a path outside the checkpoint directory",
                            file=index_display,
                            expected="shard files (or symlinks) that stay inside the checkpoint directory",
                            hint="copy the shard into the checkpoint directory instead of symlinking it",
                        )
                    )
                elif not resolved.exists():
                    errors.append(
                        Diagnostic(
                            "error",
                            "index.missing-shard",
                            f"shard {shard!r} is a dangling symlink",
                            file=index_display,
                        )
                    )
            if errors:
                raise MapgenError(errors)
            if headers:
                for shard in present:
                    try:
                        header_by_shard[shard] = read_header(shard_dir / shard, display=shard)
                    except MapgenError as exc:
                        errors.extend(exc.diagnostics)
                if errors:
                    raise MapgenError(errors)

    tensors = _tensor_infos(weight_map, shards, header_by_shard, index_display, errors)
    for shard, header in sorted(header_by_shard.items()):
        extra = sorted(set(header) - set(weight_map))
        if extra:
            warnings.append(
                Diagnostic(
                    "warning",
                    "shard.key-not-in-index",
                    f"{len(extra)} tensor(s) in {shard!r} are not in the index and are ignored",
                    file=shard,
                    key=extra[0],
                )
            )
    if errors:
        raise MapgenError(errors)
    return Source(
        origin=origin,
        kind=kind,
        root=root,
        config=config,
        tensors=tensors,
        shards=shards,
        index_metadata=dict(index_metadata),
        index_doc=index_doc,
        headers_read=bool(header_by_shard),
        diagnostics=tuple(warnings),
    )
