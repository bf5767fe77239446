"""Local checkpoints: a directory (``config.json`` + index, or a single ``model.safetensors``) or a single
``.safetensors`` file with ``config.json`` beside it.

Only metadata is read: JSON files, and the headers of shard files that are present (never tensor data).
A directory holding only the JSON files is scanned from the index alone (no shapes).
"""

from __future__ import annotations

from pathlib import Path

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
from mapgen.source.safetensors_header import read_header


def read_checkpoint_dir(
    directory: Path,
    *,
    origin: str,
    headers: bool = True,
) -> Source:
    """Read a checkpoint directory; shard headers are read when ``headers`` and the shards are present."""
    roots = (directory.resolve(),)
    config_path = directory / CONFIG_NAME
    config = parse_config(
        read_json(
            config_path,
            display=CONFIG_NAME,
            what="config.json",
            hint=f"a checkpoint directory needs {CONFIG_NAME} beside its weights",
        ),
        display=CONFIG_NAME,
    )
    index_path = directory / INDEX_NAME
    if index_path.exists():
        index_doc = read_json(index_path, display=INDEX_NAME, what="the safetensors index")
        weight_map, meta = parse_index(index_doc, display=INDEX_NAME)
        return build_source(
            origin=origin,
            kind="local_dir",
            root=directory,
            config=config,
            weight_map=weight_map,
            index_doc=index_doc,
            index_metadata=meta,
            index_display=INDEX_NAME,
            shard_dir=directory,
            allowed_roots=roots,
            headers=headers,
        )
    single = directory / SINGLE_NAME
    if single.exists():
        return _single(single, origin=origin, config=config, allowed_roots=roots)
    raise MapgenError(
        Diagnostic(
            "error",
            "source.missing-index",
            f"no {INDEX_NAME} and no {SINGLE_NAME} in the checkpoint directory",
            file=str(directory.name or directory),
            expected=f"{INDEX_NAME} (sharded) or {SINGLE_NAME} (single file)",
        )
    )


def read_single_file(path: Path, *, origin: str) -> Source:
    """A single ``.safetensors`` file: its header gives the key list; ``config.json`` sits beside it."""
    config_path = path.parent / CONFIG_NAME
    config = parse_config(
        read_json(
            config_path,
            display=CONFIG_NAME,
            what="config.json",
            hint=f"put the checkpoint's {CONFIG_NAME} beside {path.name}",
        ),
        display=CONFIG_NAME,
    )
    return _single(path, origin=origin, config=config, allowed_roots=(path.parent.resolve(),))


def _single(path: Path, *, origin: str, config: dict[str, object], allowed_roots: tuple[Path, ...]) -> Source:
    name = path.name
    resolved = path.resolve()
    if not any(resolved.is_relative_to(r) for r in allowed_roots):
        raise MapgenError(
            Diagnostic(
                "error",
                "index.shard-outside-checkpoint",
                f"{name!r} resolves to a path outside the checkpoint directory",
                file=name,
            )
        )
    header = read_header(path, display=name)
    weight_map = dict.fromkeys(header, name)
    index_doc = {"metadata": {}, "weight_map": weight_map}
    return build_source(
        origin=origin,
        kind="single_file",
        root=path.parent,
        config=config,
        weight_map=weight_map,
        index_doc=index_doc,
        index_metadata={},
        index_display=name,
        shard_dir=None,
        allowed_roots=allowed_roots,
        headers=True,
        known_headers={name: header},
    )
