"""The package list in pyproject.toml is explicit (templates/ ships as mapgen.templates): keep it complete."""

from __future__ import annotations

import tomllib
from pathlib import Path

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
