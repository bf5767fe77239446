"""Scan's fast paths decide exactly what the slow ones did (issue 12, item 6: a 671B index scans within 3x of
``json.load``).

* ``read_json`` parses without the duplicate-key hook when the text's colons prove that no key repeats; a repeat
  anywhere (nested, beside colons inside strings) is still the same ``json.duplicate-key`` error.
* Decoder keys are grouped by the previous key's layer prefix: the layout does not depend on the index's order.
* A layer's derived-buffer passes run only when it holds one; FP8 scales are checked against their weights
  with set operations, and for other quantization tensors only when some suspect is no scale.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from scan_support import CORPUS

from mapgen.errors import MapgenError
from mapgen.infer import scan
from mapgen.source.base import read_json

LAYOUTS = Path(__file__).resolve().parent / "fixtures" / "layouts"
INDEX = "model.safetensors.index.json"


def _read(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "doc.json"
    path.write_text(text)
    return read_json(path, display="doc.json", what="doc.json")


@pytest.mark.parametrize("text", [
    '{"a": "x:y", "b": {"c": "::"}, "d": [{"e": 1}, "f:g"]}',  # colons inside strings: the slow path decides
    '{"a": {"b": [1, {"c": 2}]}, "d": []}',  # nested objects, no colon outside keys
    '{"a" : 1 ,\n "b"\t:\t{"c" :2}}',  # whitespace around the colons
    "[]",
    '"a:b"',
])
def test_documents_without_repeats_parse_as_json_loads_does(tmp_path: Path, text: str) -> None:
    assert _read(tmp_path, text) == json.loads(text)


@pytest.mark.parametrize(("text", "key"), [
    ('{"a": 1, "a": 2}', "a"),
    ('{"x": {"b": 1, "b": 2}, "c": 3}', "b"),  # nested
    ('[{"k": "v"}, {"k": 1, "k": 2}]', "k"),  # in a list
    ('{"a": "x:y:z", "b": 1, "b": "q"}', "b"),  # beside colons inside strings
    ('{"a": "\\u003a", "a": 1}', "a"),  # an escaped colon is no colon of the text
])
def test_a_repeated_key_is_the_same_error_as_before(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(MapgenError) as exc:
        _read(tmp_path, text)
    (d,) = exc.value.diagnostics
    assert (d.code, d.key) == ("json.duplicate-key", key)
    assert f"names {key!r} more than once (1 duplicate key(s))" in d.message


def _reordered(src: Path, dst: Path, order: str) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    doc = json.loads((src / INDEX).read_text())
    keys = list(doc["weight_map"])
    keys = keys[::-1] if order == "reversed" else random.Random(0).sample(keys, len(keys))
    (dst / INDEX).write_text(json.dumps({**doc, "weight_map": {k: doc["weight_map"][k] for k in keys}}))
    return dst


@pytest.mark.parametrize("case", [
    LAYOUTS / "deepseek-v3-mtp",  # extra-layer MTP under model.layers.<n>.
    LAYOUTS / "glm4-moe-mtp",
    LAYOUTS / "qwen3-moe-fp8",  # FP8 scales dropped beside their weights
    CORPUS / "llava-v1.5-7b",  # derived rotary buffers, a vision tower
    CORPUS / "qwen3.5-25b-reap-a3b-coding",  # model.language_model.layers.<n>. (the regex path), mtp.*
], ids=lambda p: p.name)
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_the_layout_does_not_depend_on_the_order_of_the_index(tmp_path: Path, case: Path, order: str) -> None:
    assert scan(str(_reordered(case, tmp_path / case.name, order))) == scan(str(case))


def _fp8_with(tmp_path: Path, extra: dict[str, str]) -> Path:
    dst = tmp_path / "fp8"
    shutil.copytree(LAYOUTS / "qwen3-moe-fp8", dst)
    doc = json.loads((dst / INDEX).read_text())
    doc["weight_map"].update(extra)
    (dst / INDEX).write_text(json.dumps(doc))
    return dst


@pytest.mark.parametrize(("extra", "code", "key"), [
    # ends in weight_scale_inv but is no "<module>.weight_scale_inv": another quantization tensor
    ({"model.layers.0.mlp.gate.xweight_scale_inv": "x.safetensors"}, "quant.fp8-unsupported",
     "model.layers.0.mlp.gate.xweight_scale_inv"),
    ({"model.layers.0.self_attn.q_proj.input_scale": "x.safetensors"}, "quant.fp8-unsupported",
     "model.layers.0.self_attn.q_proj.input_scale"),
    ({"model.layers.0.self_attn.nope.weight_scale_inv": "x.safetensors"}, "quant.fp8-orphan-scale",
     "model.layers.0.self_attn.nope.weight_scale_inv"),
])
def test_fp8_suspects_that_are_no_scale_of_a_present_weight_are_refused(
    tmp_path: Path, extra: dict[str, str], code: str, key: str
) -> None:
    with pytest.raises(MapgenError) as exc:
        scan(str(_fp8_with(tmp_path, extra)))
    assert [(d.code, d.key) for d in exc.value.diagnostics] == [(code, key)]
