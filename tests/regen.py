"""Regenerate every golden: ``.venv/bin/python -m tests.regen`` (from the repository root).

One folder per case, ``tests/cases/<case>/``, described by its ``case.json`` (hand-written, never regenerated):

* **scan cases** -- ``{"source": "tests/fixtures/.../<checkpoint>"}``: the checkpoint metadata (a pointer, so
  ``tests/fixtures/corpus/`` stays a byte-for-byte copy of the shared corpus; its ``SOURCE.txt`` says where
  it came from). Expected outputs: ``summary.json`` (the stable ``summary``) and the layout IR. With
  ``"input": NAME`` the case's layout is emitted into the bridges mapgen ships, and its expected layout *is*
  the stored input ``generated/inputs/NAME.json`` (no second copy); otherwise it is ``layout.json`` here.
* **emit cases** -- ``{"builder": NAME}``: ``inputs/`` (layouts built by ``tests/emit_support.py``),
  optional ``plans/`` (hand-written plans, so the renderer is tested without the planner) and ``expected/``
  (the whole rendered tree).

The run rewrites, in this order: every scan case's expected files and stored inputs, every emit case, then
``generated/`` from its stored inputs (the same pipeline as ``mapgen emit --from-inputs``, proof record
included). ``--check`` writes nothing and exits 1 listing what a run would change (``tests/test_regen.py``
runs it, so CI fails on any stale golden). ``--fixtures`` first re-derives the synthetic fixtures from the
installed transformers (``tests/fixtures/hub/make_fixtures.py``, ``tests/fixtures/layouts/make_layouts.py``).
Review ``git diff`` before committing.
"""

from __future__ import annotations

import json
import runpy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import emit_support as es

from mapgen.emit.check import Drift, compare, tree_files
from mapgen.ir import Layout, layout_from_json, layout_to_json, to_jsonable
from mapgen.plan.plan import BridgePlan

REPO = Path(__file__).resolve().parents[1]
CASES = REPO / "tests" / "cases"
GENERATED = REPO / "generated"
COMMAND = ".venv/bin/python -m tests.regen"
NOTE = "Goldens are never edited by hand. If the change is intended, regenerate every golden and review the diff:"
FIXTURE_MAKERS = ("tests/fixtures/hub/make_fixtures.py", "tests/fixtures/layouts/make_layouts.py")

# emit case -> builder of (inputs, hand plans)
BUILDERS: dict[str, Callable[[], tuple[dict[str, Layout], dict[str, BridgePlan]]]] = {
    "qwen3_dense_handplan": lambda: (
        {"qwen3-8b": es.qwen3_dense_layout()},
        {"qwen3-8b": es.qwen3_dense_plan()},
    ),
    "qwen3_dense_two_inputs": lambda: (
        {"qwen3-8b": es.qwen3_dense_layout(4), "qwen3-0.6b": es.qwen3_dense_layout(2)},
        {},
    ),
    "qwen3_5_moe_hybrid": lambda: ({"qwen3.5-moe-tiny": es.qwen3_5_moe_layout()}, {}),
    "injection": lambda: ({"evil": es.evil_layout()}, {"evil": es.evil_plan()}),
}


@dataclass(frozen=True)
class Case:
    name: str
    source: str = ""  # scan case: the checkpoint folder, relative to the repository
    input: str = ""  # scan case emitted into generated/: its stored input name
    builder: str = ""  # emit case

    @property
    def folder(self) -> Path:
        return CASES / self.name

    @property
    def expected_layout(self) -> Path:
        return GENERATED / "inputs" / f"{self.input}.json" if self.input else self.folder / "layout.json"


def cases() -> list[Case]:
    out = []
    for path in sorted(CASES.glob("*/case.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        out.append(Case(path.parent.name, data.get("source", ""), data.get("input", ""), data.get("builder", "")))
    return out


def scan_cases() -> list[Case]:
    return [c for c in cases() if c.source]


def emit_cases() -> list[Case]:
    return [c for c in cases() if c.builder]


def case(name: str) -> Case:
    return next(c for c in cases() if c.name == name)


# ---------------------------------------------------------------------------------------------------------
# What each golden should hold
# ---------------------------------------------------------------------------------------------------------
def render_scan_case(c: Case) -> dict[Path, str]:
    """The scan of the case's checkpoint: absolute path -> expected text."""
    from mapgen.infer import scan

    layout = scan(str(REPO / c.source))
    summary = json.dumps(to_jsonable(layout.summary), indent=2, sort_keys=True) + "\n"
    return {c.folder / "summary.json": summary, c.expected_layout: layout_to_json(layout)}


def build_emit_case(c: Case) -> dict[str, str]:
    """An emit case's ``inputs/`` and ``plans/`` files (relative to the case folder), from its builder."""
    layouts, plans = BUILDERS[c.builder]()
    files = {f"inputs/{n}.json": layout_to_json(layout) for n, layout in layouts.items()}
    files.update({f"plans/{n}.json": es.plan_to_json(p) for n, p in plans.items()})
    return files


def load_emit_case(folder: Path) -> tuple[dict[str, Layout], dict[str, BridgePlan]]:
    """An emit case's inputs and plans as stored (hand-written plans where present, else the planner's)."""
    files = {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
             for sub in ("inputs", "plans") for p in sorted((folder / sub).glob("*.json"))}
    return parse_emit_case(files)


def parse_emit_case(files: dict[str, str]) -> tuple[dict[str, Layout], dict[str, BridgePlan]]:
    from mapgen.plan.planner import plan

    inputs = {rel[len("inputs/"):-len(".json")]: layout_from_json(text)
              for rel, text in sorted(files.items()) if rel.startswith("inputs/")}
    plans = {}
    for name, layout in inputs.items():
        hand = files.get(f"plans/{name}.json")
        plans[name] = es.plan_from_json(hand) if hand is not None else plan(layout)
    return inputs, plans


def render_emit_case(inputs: dict[str, Layout], plans: dict[str, BridgePlan]) -> dict[str, str]:
    """The expected tree (relative paths) of an emit case."""
    from mapgen.emit.render import render

    return render(plans, inputs)


def generated_tree(stored: dict[str, str]) -> dict[str, str]:
    """``generated/`` rendered from ``stored`` (input name -> canonical JSON), through emit's pipeline with
    the committed proof record (only inputs whose input or plan changed are proven)."""
    from mapgen.cli.emit import load_proof_cache
    from mapgen.emit.pipeline import generate, parse_input

    inputs = {name: parse_input(name, text) for name, text in stored.items()}
    return generate(inputs, cache=load_proof_cache(GENERATED)).files


# ---------------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------------
def expected_trees() -> dict[Path, dict[str, str]]:
    """Every directory the run owns -> exactly the files it should hold (relative path -> text)."""
    trees: dict[Path, dict[str, str]] = {}
    stored = {p.stem: p.read_text(encoding="utf-8") for p in sorted((GENERATED / "inputs").glob("*.json"))}
    for c in scan_cases():
        files = render_scan_case(c)
        tree = {"case.json": (c.folder / "case.json").read_text(encoding="utf-8")}
        for path, text in files.items():
            if path.parent == c.folder:
                tree[path.name] = text
            else:
                stored[c.input] = text
        trees[c.folder] = tree
    for c in emit_cases():
        inputs = build_emit_case(c)
        tree = {"case.json": (c.folder / "case.json").read_text(encoding="utf-8"), **inputs}
        # Rendered from the freshly built inputs, so a builder change and its tree land in one run.
        tree.update({f"expected/{rel}": text for rel, text in render_emit_case(*parse_emit_case(inputs)).items()})
        trees[c.folder] = tree
    trees[GENERATED] = generated_tree(stored)
    return trees


def drifts(trees: dict[Path, dict[str, str]]) -> dict[Path, Drift]:
    """Per owned directory, how the files on disk differ from what the run would write. Directories under
    tests/cases/ without a case.json are reported as orphans."""
    out = {d: compare(files, d) for d, files in trees.items()}
    for folder in sorted(p for p in CASES.iterdir() if p.is_dir() and p not in trees):
        out[folder] = Drift(orphaned=tuple(tree_files(folder)) or ("(empty folder)",))
    return {d: drift for d, drift in out.items() if not drift.clean}


def write(trees: dict[Path, dict[str, str]]) -> list[str]:
    from mapgen.cli._io import write_tree_atomically

    changed = []
    for directory, files in trees.items():
        if not compare(files, directory).clean:
            write_tree_atomically(directory, files, replace_existing=True)
            changed.append(directory.relative_to(REPO).as_posix())
    return changed


def main(argv: list[str]) -> int:
    if "--fixtures" in argv:
        for maker in FIXTURE_MAKERS:
            runpy.run_path(str(REPO / maker), run_name="__main__")
    trees = expected_trees()
    if "--check" in argv:
        found = drifts(trees)
        for directory, drift in found.items():
            print(drift.render(directory.relative_to(REPO).as_posix(), COMMAND, note=NOTE))
        return 1 if found else 0
    changed = write(trees)
    print("\n".join(f"wrote {d}" for d in changed) or "every golden is up to date")
    orphans = [d for d in drifts(trees) if d.parent == CASES and d not in trees]
    for folder in orphans:
        print(f"orphaned case folder (no case.json): {folder.relative_to(REPO)}")
    return 1 if orphans else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
