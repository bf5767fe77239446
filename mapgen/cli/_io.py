"""Filesystem helpers for the CLI (the only layer that writes).

:func:`write_tree_atomically` renders nothing: it takes a finished ``{relative_path: content}`` tree and
makes a directory hold exactly that tree, or leaves it untouched. The tree is written into a temporary
directory beside the target (same filesystem), fsynced, and swapped in with renames; on any failure the
temporary directory is removed and the previous target restored, so no half-written tree is ever left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from mapgen.errors import error


def _safe_relative(rel: str) -> PurePosixPath:
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts or "\\" in rel or rel != path.as_posix():
        raise error("io.unsafe-path", f"refusing to write {rel!r}: not a plain relative path",
                    expected="a relative POSIX path without '..'")
    return path


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can open directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _default_dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def write_tree_atomically(
    target_dir: str | os.PathLike[str], files: Mapping[str, str | bytes], *, replace_existing: bool
) -> None:
    """Make ``target_dir`` contain exactly ``files`` (str is written as UTF-8, byte for byte, no newline
    translation). ``replace_existing=False`` refuses a target that exists and is not empty;
    ``replace_existing=True`` replaces the whole directory, so files not in ``files`` disappear."""
    target = Path(target_dir).absolute()
    if target.exists() and not target.is_dir():
        raise error("io.not-a-directory", f"{target_dir} exists and is not a directory", file=str(target_dir))
    exists = target.is_dir()
    if exists and not replace_existing and any(target.iterdir()):
        raise error("io.target-exists", f"{target_dir} exists and is not empty", file=str(target_dir),
                    hint="choose another directory or remove it first")
    relpaths = {rel: _safe_relative(rel) for rel in files}
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(target.stat().st_mode) if exists else _default_dir_mode()

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    backup: Path | None = None
    try:
        for rel in sorted(files):
            content = files[rel]
            path = staging.joinpath(*relpaths[rel].parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_file(path, content.encode("utf-8") if isinstance(content, str) else content)
        os.chmod(staging, mode)
        _fsync_dir(staging)
        if exists:
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, backup)  # replaces the empty placeholder directory
        try:
            os.replace(staging, target)
        except BaseException:
            if backup is not None:
                os.replace(backup, target)
                backup = None
            raise
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if backup is not None and not target.exists():
            os.replace(backup, target)
            backup = None
        raise
    finally:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


def read_text(path: Path) -> str:
    """UTF-8 text, diagnostics instead of tracebacks."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError as exc:
        raise error("io.missing", f"{path} does not exist", file=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise error("io.unreadable", f"cannot read {path}: {exc}", file=str(path)) from exc
