"""Packaging: the package list in pyproject.toml is explicit (templates/ ships as mapgen.templates, generated/ as
mapgen_bridges), and a wheel installed into a fresh venv emits and converts a layout it does not ship."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_every_package_directory_is_listed() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mapgen").rglob("__init__.py")}
    found.add("mapgen_bridges")  # the repository's generated/ folder, installed under a namespaced name
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert "mapgen.templates" in listed
    assert "generated" not in listed


def test_generated_installs_as_mapgen_bridges() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert data["tool"]["setuptools"]["package-dir"]["mapgen_bridges"] == "generated"
    assert data["project"]["entry-points"]["mapgen.bridges"] == {"mapgen": "mapgen_bridges"}
    import mapgen_bridges

    assert Path(mapgen_bridges.__file__).resolve() == REPO / "generated" / "__init__.py"  # editable install


def test_templates_ship_with_the_package() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert data["package-dir"]["mapgen.templates"] == "templates"
    patterns = data["package-data"]["mapgen.templates"]
    templates = {p.relative_to(REPO / "templates").as_posix() for p in (REPO / "templates").rglob("*.jinja")}
    import fnmatch

    assert all(any(fnmatch.fnmatch(t, pat) for pat in patterns) for t in templates)


TINY_LLAMA = '''
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
out = Path(sys.argv[1]); out.mkdir(parents=True)
h, heads, kv, hd, ffn, vocab, layers = 48, 4, 2, 12, 40, 160, 2
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": ffn,
       "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
       "vocab_size": vocab, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
       "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}
(out / "config.json").write_text(json.dumps(cfg))
g = torch.Generator().manual_seed(0)
def r(*s): return (torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16)
def one(n): return torch.ones(n, dtype=torch.bfloat16)
t = {"model.embed_tokens.weight": r(vocab, h), "model.norm.weight": one(h), "lm_head.weight": r(vocab, h)}
for i in range(layers):
    p = f"model.layers.{i}."
    t |= {p + "input_layernorm.weight": one(h), p + "post_attention_layernorm.weight": one(h),
          p + "self_attn.q_proj.weight": r(heads * hd, h), p + "self_attn.k_proj.weight": r(kv * hd, h),
          p + "self_attn.v_proj.weight": r(kv * hd, h), p + "self_attn.o_proj.weight": r(h, heads * hd),
          p + "mlp.gate_proj.weight": r(ffn, h), p + "mlp.up_proj.weight": r(ffn, h),
          p + "mlp.down_proj.weight": r(h, ffn)}
save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
'''


@pytest.mark.slow
def test_wheel_install_emits_and_converts_a_new_layout(tmp_path: Path) -> None:
    """A non-editable wheel install in a fresh venv: `mapgen emit SRC` then `mapgen convert SRC OUT` from one
    directory, for a layout mapgen does not ship (a tiny untied Llama), with no flag. The venv reaches torch,
    megatron-core and transformers through a .pth line naming this venv's site-packages (offline); a plain path
    line does not run that directory's .pth files, so the editable mapgen there stays invisible (checked)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("mapgen", "generated", "templates"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist"), str(src)], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("mapgen-*.whl"))

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "project_deps.pth").write_text(f"{deps}\n")
    run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)])
    code = "import mapgen, mapgen_bridges; print(mapgen.__file__); print(mapgen_bridges.__file__)"
    where = run([str(py), "-c", code], cwd=tmp_path)
    assert all(line.startswith(str(site)) for line in where.split()), where  # the wheel, not the checkout
    assert (site / "mapgen" / "templates" / "bridge_module.py.jinja").is_file()
    assert not (site / "generated").exists()

    work = tmp_path / "work"
    work.mkdir()
    run([sys.executable, "-c", TINY_LLAMA, str(work / "tiny-llama")], cwd=work)
    mapgen = str(venv / "bin" / "mapgen")
    refused = subprocess.run([mapgen, "convert", "tiny-llama", "out"], cwd=work, capture_output=True, text=True,
                             check=False)
    assert refused.returncode == 1, refused.stderr
    assert "bridge.unknown-layout" in refused.stderr
    assert f"./generated: {work / 'generated'}: no such directory" in refused.stderr
    assert f"package mapgen_bridges ({site / 'mapgen_bridges'})" in refused.stderr

    emitted = run([mapgen, "emit", "tiny-llama"], cwd=work)
    assert "(new)" in emitted
    run([mapgen, "convert", "tiny-llama", "out"], cwd=work)
    assert (work / "out" / "release").is_dir()
    assert "up to date" in run([mapgen, "check"], cwd=work)


def run(cmd: list[str], cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAPGEN_BRIDGES")}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout
