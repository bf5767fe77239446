"""A conversion or export killed mid-way leaves nothing that looks complete, and running it again works.

``mapgen convert`` / ``mapgen export`` run at TP=2 as a subprocess (two spawned gloo workers) on a synthesized
Llama-layout checkpoint of ~50 MB. As soon as the hidden staging directory (``.OUT.partial-*``) appears --
the workers have loaded and are writing -- one worker gets SIGKILL. Asserted:

* the command ends by itself (``spawn`` notices the dead worker and stops the other; it must not hang in a
  collective), non-zero, with ``worker.died`` naming the killed rank and no traceback;
* ``OUT`` does not exist; at most hidden ``.OUT.partial-*`` staging directories remain, and none of them is at
  the target path or holds a finished index;
* the same command run again succeeds, and a further identical run produces identical bytes.

Identical bytes: for ``export`` every file of the HF output. For ``convert`` every file of the Megatron
checkpoint except ``release/.metadata``: torch.distributed.checkpoint's ``StorageMeta`` in it records a random
``save_id`` (uuid4) and the ``checkpoint_id`` path it was written to (mapgen's staging directory, whose name is
random too). Its other fields (``state_dict_metadata``, ``planner_data``, ``storage_data``, ``version``) are
loaded with mapgen's allowlist unpickler and compared equal.

Each subprocess starts two workers that import torch and megatron-core (~20 s on two cores); the module takes
about two and a half minutes, hence ``slow``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mapgen.cli import main as mapgen_main

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "llama"
    code = mapgen_main(["synth", str(REPO / "tests/fixtures/corpus/llama-3.2-3b-instruct"), str(out), "--layers", "4",
                        "--hidden", "512", "--heads", "8", "--kv-heads", "4", "--intermediate", "1536",
                        "--vocab", "32000", "--shards", "4"])
    assert code == 0
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return env


def _staging(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-"))


def run_ok(args: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "mapgen", *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                       env=_env(), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def run_and_kill(args: list[str], out: Path, victim: int) -> tuple[int, str]:
    """Start ``mapgen ARGS``; SIGKILL worker ``victim`` (0 = rank 0, the writer) once writing has started."""
    proc = subprocess.Popen([sys.executable, "-m", "mapgen", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not _staging(out):
            assert proc.poll() is None, "the command ended before it could be killed"
            assert time.monotonic() < deadline, "no staging directory appeared"
            time.sleep(0.02)
        workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 2, workers
        workers.sort(key=lambda c: c.create_time())  # rank order: started one after the other
        workers[victim].send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)  # must not hang on the surviving worker
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, output


def _assert_nothing_complete(out: Path, *markers: str) -> None:
    assert not out.exists(), f"{out} exists after a killed run"
    for left in _staging(out):  # hidden, beside the target, never a finished checkpoint
        assert left.name.startswith("."), left
        for marker in markers:
            assert not (left / marker).exists(), f"{left / marker} looks complete"


def _hashes(root: Path, skip: set[str] = frozenset()) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).as_posix() not in skip}


def _dcp_metadata(path: Path) -> tuple[object, ...]:
    from mapgen.runtime._safeload import _AllowlistUnpickler

    with open(path, "rb") as fh:
        meta = _AllowlistUnpickler(fh).load()
    return meta.state_dict_metadata, meta.planner_data, meta.storage_data, meta.version


def test_convert_killed_midway_then_rerun(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "megatron"
    args = ["convert", str(source), str(out), "--tp", "2"]
    code, output = run_and_kill(args, out, victim=1)
    assert code != 0, output
    assert "error: worker.died: worker rank 1 was killed by SIGKILL" in output, output
    assert "Traceback" not in output, output
    _assert_nothing_complete(out, "latest_checkpointed_iteration.txt", "mapgen.json")

    run_ok(args)  # the same command, with whatever the killed run left beside it
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release\n"
    first = _hashes(out, {"release/.metadata"})
    first_meta = _dcp_metadata(out / "release" / ".metadata")
    shutil.rmtree(out)
    run_ok(args)
    assert _hashes(out, {"release/.metadata"}) == first
    assert _dcp_metadata(out / "release" / ".metadata") == first_meta

    # export: kill rank 0 (the writer) while it writes shards
    hf = tmp_path / "hf"
    export = ["export", str(out), str(hf), "--tp", "2"]
    code, output = run_and_kill(export, hf, victim=0)
    assert code != 0, output
    assert "error: worker.died: worker rank 0 was killed by SIGKILL" in output, output
    assert "Traceback" not in output, output
    _assert_nothing_complete(hf, "model.safetensors.index.json", "config.json")

    run_ok(export)
    exported = _hashes(hf)
    assert "model.safetensors.index.json" in exported
    shutil.rmtree(hf)
    run_ok(export)
    assert _hashes(hf) == exported
    shards = {k: v for k, v in exported.items() if k.endswith(".safetensors")}
    assert shards == {k: v for k, v in _hashes(source).items() if k.endswith(".safetensors")}  # bit for bit
