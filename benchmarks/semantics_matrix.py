"""Print the semantics matrix (issue 10) as markdown: every causal-LM architecture of the installed transformers
through scan -> config catalog -> emit -> ``verify --tp 2`` (EP=2 for MoE). See ``tests/semantics_matrix.py``.

    .venv/bin/python benchmarks/semantics_matrix.py [MODEL_TYPE ...] > /tmp/matrix.md

Takes minutes (every architecture that passes the catalog starts a 2-process verify); the table in
``benchmarks/SEMANTICS.md`` is its output.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from semantics_matrix import causal_lm_types, render, run_matrix


def main() -> None:
    types = sys.argv[1:] or causal_lm_types()
    print(render(run_matrix(types)), end="")


if __name__ == "__main__":
    main()
