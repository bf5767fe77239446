"""Nothing in mapgen unpickles untrusted data, executes checkpoint code, or follows a path out of a checkpoint.

Static part (``ast``, so comments and strings never count): every module of ``mapgen/`` and ``generated/`` is
parsed and these fail the test:

* ``torch.load(...)`` without ``weights_only=True``; ``numpy.load(..., allow_pickle=True)``; ``yaml.load``;
* importing ``pickle``, ``dill``, ``cloudpickle``, ``marshal``, ``shelve`` or ``joblib`` -- except
  ``mapgen/runtime/_safeload.py``, whose only use is an ``Unpickler`` subclass with an allowlist
  ``find_class`` (checked below: no ``pickle.load``/``loads`` calls);
* calling ``eval``, ``exec`` or ``__import__``;
* a ``trust_remote_code=`` keyword set to anything but the constant ``False``;
* ``subprocess`` calls with ``shell=`` anything but ``False``; ``os.system``, ``os.popen``, ``os.exec*``,
  ``os.spawn*``.

Megatron checkpoints: ``megatron.core.dist_checkpointing.load`` (used by ``load_dist_checkpoint``) reads
``common.pt`` with ``torch.load(path, map_location='cpu')`` -- no ``weights_only`` argument, so torch >= 2.6
applies its default ``weights_only=True`` unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set -- and
``torch.distributed.checkpoint``'s ``FileSystemReader.read_metadata`` reads ``.metadata`` with plain
``pickle.load``. mapgen does not patch either: ``mapgen export`` first loads ``common.pt`` with
``weights_only=True`` and ``.metadata`` with an allowlist unpickler (``mapgen/runtime/_safeload.py``) and
refuses the checkpoint (``megatron.unsafe-checkpoint``) if either needs more than data types.

Runtime part: a checkpoint whose index names ``../outside.safetensors``, or whose shard is a symlink to a
file outside it, is refused by scan (``read_source``) and by the conversion path (``HFSource.open`` /
``convert``) before anything is read from the outside file or written; a hostile ``.metadata`` is refused.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PICKLE_MODULES = {"pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "_pickle"}
PICKLE_ALLOWED = {"mapgen/runtime/_safeload.py"}
OS_EXEC = {"system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
           "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "startfile"}


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _kw(call: ast.Call, name: str) -> ast.keyword | None:
    return next((k for k in call.keywords if k.arg == name), None)


def violations(tree: ast.AST, rel: str) -> list[str]:
    out: list[str] = []

    def at(node: ast.AST, what: str) -> None:
        out.append(f"{rel}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in PICKLE_MODULES and rel not in PICKLE_ALLOWED:
                    at(node, f"imports {name}")
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not _is_const(node.value, False):
            at(node, f"trust_remote_code={ast.unparse(node.value)}")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        last = func.rsplit(".", 1)[-1]
        if func in {"eval", "exec", "__import__", "builtins.eval", "builtins.exec"}:
            at(node, f"calls {func}")
        if func.endswith("torch.load") or (func == "load" and isinstance(node.func, ast.Name)):
            kw = _kw(node, "weights_only")
            if kw is None or not _is_const(kw.value, True):
                at(node, f"{func}(...) without weights_only=True")
        if func in {"np.load", "numpy.load"} and (kw := _kw(node, "allow_pickle")) and not _is_const(kw.value, False):
            at(node, f"{func}(allow_pickle=...)")
        if func == "yaml.load":
            at(node, "yaml.load (use yaml.safe_load)")
        if func.startswith("subprocess.") and (kw := _kw(node, "shell")) and not _is_const(kw.value, False):
            at(node, f"{func}(shell={ast.unparse(kw.value)})")
        if func.startswith("os.") and last in OS_EXEC:
            at(node, f"calls {func}")
        if rel in PICKLE_ALLOWED and last in {"load", "loads"} and func.split(".")[0] in PICKLE_MODULES:
            at(node, f"calls {func} (only the allowlist Unpickler may be used here)")
    return out


def _sources() -> list[Path]:
    files = sorted((REPO / "mapgen").rglob("*.py")) + sorted((REPO / "generated").rglob("*.py"))
    assert len(files) > 40
    return files


def test_no_unpickling_code_execution_or_shell_in_mapgen_and_generated() -> None:
    found: list[str] = []
    for path in _sources():
        rel = path.relative_to(REPO).as_posix()
        found += violations(ast.parse(path.read_text(encoding="utf-8"), filename=rel), rel)
    assert not found, "\n".join(found)


def test_safeload_restricts_find_class() -> None:
    tree = ast.parse((REPO / "mapgen/runtime/_safeload.py").read_text())
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    assert [c.name for c in classes] == ["_AllowlistUnpickler"]
    assert "find_class" in {f.name for f in classes[0].body if isinstance(f, ast.FunctionDef)}


@pytest.mark.parametrize(("snippet", "expect"), [
    ("import torch\ntorch.load(p)", "without weights_only=True"),
    ("import torch\ntorch.load(p, weights_only=False)", "without weights_only=True"),
    ("from torch import load\nload(p)", "without weights_only=True"),
    ("import pickle", "imports pickle"),
    ("from dill import loads", "imports dill"),
    ("import marshal", "imports marshal"),
    ("eval('1')", "calls eval"),
    ("exec('x = 1')", "calls exec"),
    ("f(trust_remote_code=True)", "trust_remote_code=True"),
    ("f(trust_remote_code=flag)", "trust_remote_code=flag"),
    ("import subprocess\nsubprocess.run('ls', shell=True)", "shell=True"),
    ("import os\nos.system('ls')", "calls os.system"),
    ("import yaml\nyaml.load(s)", "yaml.load"),
])
def test_the_checker_catches(snippet: str, expect: str) -> None:
    found = violations(ast.parse(snippet), "x.py")
    assert any(expect in v for v in found), found


def test_the_checker_allows_the_safe_forms() -> None:
    ok = ("import torch\ntorch.load(p, weights_only=True)\nf(trust_remote_code=False)\n"
          "import subprocess\nsubprocess.run(['ls'], shell=False)\n# eval(x) pickle.load\nx = 'eval(1)'\n")
    assert violations(ast.parse(ok), "x.py") == []


# ---------------------------------------------------------------------------------------------------------
# Runtime: paths outside the checkpoint
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import write

    return write("qwen3", tmp_path_factory.mktemp("tiny") / "qwen3")


def _dotdot(tmp: Path, src: Path) -> Path:
    d = Path(shutil.copytree(src, tmp / "ckpt"))
    shard = "model-00001-of-00003.safetensors"
    (d / shard).rename(tmp / "outside.safetensors")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../outside.safetensors" if v == shard else v for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def _symlink(tmp: Path, src: Path) -> Path:
    d = Path(shutil.copytree(src, tmp / "ckpt"))
    shard = d / "model-00002-of-00003.safetensors"
    shard.rename(tmp / "outside.safetensors")
    shard.symlink_to(tmp / "outside.safetensors")
    return d


@pytest.mark.parametrize(("make", "code"), [(_dotdot, "index.unsafe-shard-name"),
                                            (_symlink, "index.shard-outside-checkpoint")])
def test_paths_outside_the_checkpoint_are_refused(make, code: str, tmp_path: Path, tiny_qwen3: Path) -> None:
    from mapgen.errors import MapgenError
    from mapgen.runtime.api import HFSource, Parallel, convert
    from mapgen.runtime.hfio import SafetensorsReader
    from mapgen.source import read_source

    ckpt = make(tmp_path, tiny_qwen3)
    outside = (tmp_path / "outside.safetensors").read_bytes()
    for attempt in (lambda: read_source(str(ckpt)), lambda: HFSource.open(ckpt),
                    lambda: convert(str(ckpt), tmp_path / "out", Parallel())):
        with pytest.raises(MapgenError) as exc:
            attempt()
        assert code in {d.code for d in exc.value.diagnostics}
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    # the reader under the engine refuses the same names on its own (defence in depth)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    bad_key = next(k for k, v in index.items() if v.startswith("../") or (ckpt / v).is_symlink())
    with pytest.raises(MapgenError) as exc:
        SafetensorsReader(ckpt, index).read(bad_key)
    assert {d.code for d in exc.value.diagnostics} & {"path.unsafe", "path.outside"}
    assert (tmp_path / "outside.safetensors").read_bytes() == outside


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_hostile_dist_checkpoint_metadata_is_refused(tmp_path: Path) -> None:
    from mapgen.errors import MapgenError
    from mapgen.runtime._safeload import check_dist_checkpoint

    (tmp_path / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": _Boom()}))
    with pytest.raises(MapgenError) as exc:
        check_dist_checkpoint(tmp_path)
    assert exc.value.diagnostics[0].code == "megatron.unsafe-checkpoint"
    assert "builtins.print is not a checkpoint-metadata type" in exc.value.render()


def test_hostile_common_pt_is_refused(tmp_path: Path) -> None:
    import torch

    from mapgen.errors import MapgenError
    from mapgen.runtime._safeload import check_dist_checkpoint

    torch.save({"x": _Boom()}, tmp_path / "common.pt")
    with pytest.raises(MapgenError) as exc:
        check_dist_checkpoint(tmp_path)
    assert exc.value.diagnostics[0].code == "megatron.unsafe-checkpoint"
