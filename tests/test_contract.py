"""The contract package is the bottom of mapgen's import graph (besides the IR and errors)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOWED = ("mapgen.contract", "mapgen.ir", "mapgen.errors")


def _mapgen_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in {"mapgen", "generated", "torch", "megatron"}}


def test_contract_imports_nothing_above_it() -> None:
    for path in sorted((REPO / "mapgen/contract").glob("*.py")):
        bad = {m for m in _mapgen_imports(path) if not m.startswith(ALLOWED)}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_runtime_never_imports_its_output_package_or_the_planner() -> None:
    for path in sorted((REPO / "mapgen/runtime").glob("*.py")):
        bad = {m for m in _mapgen_imports(path) if m.startswith(("generated", "mapgen.plan"))}
        assert not bad, f"runtime/{path.name} imports {sorted(bad)}"


def test_plan_reaches_the_runtime_only_for_the_proof() -> None:
    for path in sorted((REPO / "mapgen/plan").glob("*.py")):
        bad = {m for m in _mapgen_imports(path) if m.startswith("mapgen.runtime")}
        assert not bad or path.name == "proof.py", f"plan/{path.name} imports {sorted(bad)}"


def test_importing_the_contract_is_cheap() -> None:
    code = ("import sys, mapgen.contract, mapgen.contract.expand; "
            "print(sorted(m for m in ('torch', 'megatron', 'transformers', 'mapgen.plan', 'mapgen.runtime') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
