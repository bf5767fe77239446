"""Refuse a Megatron distributed checkpoint whose pickled files could run code, before megatron-core reads it.

``megatron.core.dist_checkpointing.load`` (torch_dist format) reads two pickled files: ``common.pt`` through
``torch.load`` (megatron passes no ``weights_only``; torch >= 2.6 then defaults to ``weights_only=True``, unless
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set) and ``.metadata`` through ``torch.distributed.checkpoint``'s
``FileSystemReader.read_metadata``, which calls plain ``pickle.load``. mapgen does not patch either: it reads
both first, ``common.pt`` with ``torch.load(weights_only=True)`` and ``.metadata`` with an unpickler whose
``find_class`` admits only the checkpoint-metadata data classes, and refuses the checkpoint
(``megatron.unsafe-checkpoint``) if either needs anything else. It also refuses entries that are symlinks
leaving the checkpoint directory. This is the only place mapgen uses :mod:`pickle`.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from mapgen.errors import error

_DATA_CLASSES: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING",
    }),
    "torch.distributed.checkpoint.planner": frozenset({
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadItemType", "ReadItem",
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "collections": frozenset({"OrderedDict"}),
}


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch

        if name in _DATA_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                      torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint-metadata type")


def check_dist_checkpoint(directory: Path) -> None:
    """Raise ``megatron.unsafe-checkpoint`` unless ``directory``'s pickled files hold data only."""
    import torch

    directory = Path(directory)
    root = directory.resolve()
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink() and not entry.resolve().is_relative_to(root):
            raise error("megatron.unsafe-checkpoint", f"{entry.name} is a symlink leaving the checkpoint directory",
                        file=str(entry), hint="copy the file into the checkpoint instead of linking it")
    metadata = directory / ".metadata"
    if metadata.is_file():
        try:
            _AllowlistUnpickler(io.BytesIO(metadata.read_bytes())).load()
        except Exception as exc:
            raise error("megatron.unsafe-checkpoint", f".metadata is not plain checkpoint metadata: {exc}",
                        file=str(metadata), hint="refusing to unpickle it; re-create the checkpoint from a trusted "
                        "source") from None
    common = directory / "common.pt"
    if common.is_file():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise error("megatron.unsafe-checkpoint", f"common.pt does not load with weights_only=True: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=str(common),
                        hint="refusing to unpickle it; re-create the checkpoint from a trusted source") from None
