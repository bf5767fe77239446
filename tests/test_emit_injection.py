"""Checkpoint-controlled strings must not become code.

Hostile key names, model_type, descriptions, comments and option values (quotes, newlines,
``"); __import__('os').system('x') #``, ``\\u2028``, bidi controls, NUL...) are rendered; the module must
contain no call outside the runtime API, be pure ASCII, and give back the exact strings through the
Rule objects when imported.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from emit_support import EVIL_STRINGS, evil_layout, evil_plan, import_tree, write_tree

from mapgen.emit.render import render, validate_python
from mapgen.errors import MapgenError
from mapgen.plan.planner import plan

ALLOWED_CALLS = {"Bridge", "Facts", "Group", "op", "copy", "qkv", "gated_fc1", "experts_fc1", "experts_fc2",
                 "gdn_in_proj", "gdn_conv1d", "mtp_eh_proj", "duplicate"}


def _calls(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            out.add(ast.unparse(node.func))
    return out


def _check_module(text: str) -> ast.Module:
    tree = ast.parse(text)
    assert _calls(tree) <= ALLOWED_CALLS
    assert "__import__" not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    kinds = {type(stmt).__name__ for stmt in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Assign", "AnnAssign", "FunctionDef"}
    imports = [stmt for stmt in tree.body if isinstance(stmt, ast.ImportFrom)]
    assert [i.module for i in imports] == ["mapgen.contract"]
    assert text.isascii()
    assert text.splitlines() == text.split("\n")[:-1]  # no exotic line breaks anywhere
    return tree


def test_hostile_plan_renders_inert(tmp_path: Path) -> None:
    p, layout = evil_plan(), evil_layout()
    files = render({"evil": p}, {"evil": layout})
    _check_module(files[f"{p.module_name}.py"])
    write_tree(tmp_path / "pkg", files)
    with import_tree(tmp_path / "pkg") as package:
        bridge = package.get_bridge(p.fingerprint)
        assert bridge.model_type == p.model_type
        assert bridge.rules == p.rules  # exact strings: keys, domains, option names and values, in order
        module = __import__(f"{package.__name__}.{p.module_name}", fromlist=["x"])
        assert getattr(module, f"BRIDGE_{p.fingerprint}") is bridge
        # the docstring carries the (sanitised) description, never raw control characters
        doc = module.__doc__
        assert doc is not None
        assert doc.isascii()
        assert "\u2028" not in doc
        assert "\x00" not in doc


def test_hostile_layout_through_the_planner(tmp_path: Path) -> None:
    layout = evil_layout()
    p = plan(layout)
    files = render({"evil": p}, {"evil": layout})
    _check_module(files[f"{p.module_name}.py"])
    write_tree(tmp_path / "pkg", files)
    with import_tree(tmp_path / "pkg") as package:
        bridge = package.get_bridge(p.fingerprint)
        hf_keys = {k for r in bridge.rules for k in r.hf}
        assert "model.layers.{layer}.\n__import__('os').system('x')#q\u2028__import__('os').system('x')" in hf_keys
        assert "emb\"\"\"\n__import__('os')" in hf_keys
        assert "head'\r\n#" in hf_keys
        assert bridge.model_type == layout.model_type


def test_hostile_markdown_cannot_add_rows() -> None:
    p, layout = evil_plan(), evil_layout()
    md = render({"evil": p}, {"evil": layout})["SUPPORTED.md"]
    table_rows = [line for line in md.splitlines() if line.startswith("| ")]
    # header + rule per table: 2 + 1 layout, 2 + 1 checkpoint, 2 + one per family
    families = {r.family for r in p.rules}
    assert len(table_rows) == 2 + 1 + 2 + 1 + 2 + len(families)
    assert md.isascii()


@pytest.mark.parametrize("evil", EVIL_STRINGS)
def test_each_hostile_string_round_trips_as_a_key(evil: str, tmp_path: Path) -> None:
    p = evil_plan()
    rule = dataclasses.replace(p.rules[0], hf=(evil,), megatron=evil, comment=evil, options=((evil, evil),))
    p = dataclasses.replace(p, rules=(rule,), description=(evil,))
    files = render({"evil": p}, {"evil": evil_layout()})
    _check_module(files[f"{p.module_name}.py"])
    write_tree(tmp_path / "pkg", files)
    with import_tree(tmp_path / "pkg") as package:
        (got,) = package.get_bridge(p.fingerprint).rules
        assert got.hf == (evil,)
        assert got.megatron == evil
        assert got.options == ((evil, evil),)


def test_hostile_identifiers_are_refused() -> None:
    p = evil_plan()
    for bad in (
        dataclasses.replace(p, module_name="x\nimport os"),
        dataclasses.replace(p, fingerprint="abc'; import os; '"),
    ):
        with pytest.raises(MapgenError):
            render({"evil": bad}, {"evil": evil_layout()})


def test_validate_python_rejects_unexpected_calls() -> None:
    with pytest.raises(MapgenError, match="calls __import__"):
        validate_python("m.py", "x = __import__('os')\n", allowed_calls=frozenset({"Rule"}))
    with pytest.raises(MapgenError, match="not valid Python"):
        validate_python("m.py", "x = (\n")
