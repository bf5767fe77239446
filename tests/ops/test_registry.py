"""The op registry: one entry per ``Rule.op``, well-formed declarations, option parsing, and the layering rule
that mapgen.ops never imports megatron-core (nor the runtime)."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from mapgen import ops
from mapgen.contract import rules
from mapgen.ops import OPS, DictReader, Op, PrimitiveError, Shard
from mapgen.ops._base import Options

from .support import FFN, H, arange, rule, spec

OPS_DIR = Path(ops.__file__).resolve().parent


def test_registry_and_rule_op_literal_agree() -> None:
    assert list(OPS) == list(typing.get_args(rules.Op))


@pytest.mark.parametrize("name", list(OPS))
def test_op_declaration(name: str) -> None:
    op = OPS[name]
    assert isinstance(op, Op)
    assert op.name == name
    assert op.shardings
    assert op.shardings <= set(typing.get_args(rules.Sharding))
    options = op.options_type
    assert issubclass(options, Options)
    assert dataclasses.is_dataclass(options)
    assert options.__dataclass_params__.frozen  # type: ignore[attr-defined]
    schema = options.schema()
    defaults = options()
    for field in dataclasses.fields(options):
        default = getattr(defaults, field.name)
        allowed = schema[field.name]
        if allowed is None:  # any positive int, or None where the option is off by default
            assert default is None or (isinstance(default, int) and default >= 1), field.name
        else:
            assert default is None or default in allowed, field.name


def test_each_op_lives_in_its_own_module() -> None:
    modules = {type(op).__module__ for op in OPS.values()}
    assert modules == {f"mapgen.ops.{p.stem}" for p in OPS_DIR.glob("*.py") if not p.stem.startswith("_")}


def test_options_parse_defaults_and_canonical_values() -> None:
    qkv = OPS["qkv"]
    assert qkv.options_type.parse(rule("qkv", "qkv_groups")) == qkv.options_type()
    parsed = OPS["gated_fc1"].options_type.parse(rule("gated_fc1", "gated_column", fused=1, part="bias"))
    assert parsed.fused is True  # validated with ==, stored as the declared value
    assert parsed.part == "bias"
    copy = OPS["copy"].options_type.parse(rule("copy", "vocab", divisible_by=64))
    assert copy.divisible_by == 64
    assert copy.transform == "none"


def test_options_schema_rejects_an_undeclarable_field() -> None:
    @dataclasses.dataclass(frozen=True)
    class Bad(Options):
        ratio: float = 1.0

    with pytest.raises(TypeError, match=r"Bad\.ratio: an option is a Literal, bool or int"):
        Bad.schema()


def test_unknown_op() -> None:
    with pytest.raises(PrimitiveError, match=r"m.weight \(nope/column\): unknown op 'nope'"):
        ops.load(rule("nope", "column"), ["w"], spec(), Shard(0, 1), DictReader({"w": arange(FFN, H)}))


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(OPS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_ops_import_neither_megatron_nor_the_runtime(path: Path) -> None:
    heavy = ("megatron", "transformers")
    bad = {n for n in _imports(path) if n.split(".")[0] in heavy or n.startswith("mapgen.runtime")}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_ops_loads_no_megatron() -> None:
    code = (
        "import sys, mapgen.ops; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
