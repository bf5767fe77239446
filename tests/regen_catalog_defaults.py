"""Regenerate ``mapgen/catalog/defaults.json`` from the installed transformers:
``.venv/bin/python -m tests.regen_catalog_defaults`` (from the repo root).

For every model_type transformers registers, the default its config class gives each *semantic* catalog key
(rows whose value changes the maths: routing, activation, windows, multipliers, RoPE, epsilon), so that a key
absent from a checkpoint's config.json takes transformers' value, never megatron-core's. Dimensions are left
out on purpose: their class defaults describe some other model. ``tests/test_catalog.py`` fails when the
committed file differs from what this computes.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "mapgen" / "catalog" / "defaults.json"
# Mapped keys with a bridge fallback: their transformers default is compared with the bridge's.
EXTRA_KEYS = ("rope_parameters", "rope_theta", "partial_rotary_factor", "rms_norm_eps", "layer_norm_eps",
              "use_sliding_window")


def semantic_keys() -> list[str]:
    from mapgen.catalog.fields import TOP

    return sorted({r.name for r in TOP if r.transformers_default} | set(EXTRA_KEYS))


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def compute() -> dict[str, Any]:
    import logging

    import transformers
    from transformers import CONFIG_MAPPING

    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    keys = semantic_keys()
    model_types: dict[str, dict[str, Any]] = {}
    text_types: dict[str, str] = {}
    for model_type in sorted(CONFIG_MAPPING.keys()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = CONFIG_MAPPING[model_type]()
                data = config.to_dict()
        except Exception:  # a config class that needs arguments has no defaults to offer
            continue
        found = {k: data[k] for k in keys if data.get(k) is not None and _jsonable(data[k])}
        if found:
            model_types[model_type] = found
        text = data.get("text_config")
        if isinstance(text, dict) and isinstance(text.get("model_type"), str) and text["model_type"] != model_type:
            text_types[model_type] = text["model_type"]
    return {"transformers_version": transformers.__version__, "keys": keys, "model_types": model_types,
            "text_model_types": text_types}


def render(data: dict[str, Any]) -> str:
    """One model_type per line: reviewable diffs, stable bytes."""
    lines = ["{", f'"transformers_version": {json.dumps(data["transformers_version"])},',
             f'"keys": {json.dumps(data["keys"])},', '"text_model_types": {']
    text = data["text_model_types"]
    lines += [f"  {json.dumps(k)}: {json.dumps(text[k])}{',' if i < len(text) - 1 else ''}"
              for i, k in enumerate(sorted(text))]
    lines += ["},", '"model_types": {']
    types = data["model_types"]
    lines += [f"  {json.dumps(k)}: {json.dumps(types[k], sort_keys=True)}{',' if i < len(types) - 1 else ''}"
              for i, k in enumerate(sorted(types))]
    lines += ["}", "}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.path.insert(0, str(REPO))
    TARGET.write_text(render(compute()), encoding="utf-8", newline="\n")
    print(f"wrote {TARGET.relative_to(REPO)}")


if __name__ == "__main__":
    main()
