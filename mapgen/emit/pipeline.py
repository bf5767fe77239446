"""The one code path behind ``mapgen emit`` and ``mapgen check``: inputs -> plans -> proofs -> files.

``generate(inputs)`` plans every stored/new input, proves every plan against its layout, and renders the
whole generated tree in memory. It writes nothing: ``emit`` writes the result, ``check`` compares it with
the directory on disk. Planner and prover are parameters so tests can substitute them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from mapgen.emit.names import input_name
from mapgen.emit.render import input_path, render
from mapgen.errors import Diagnostic, MapgenError, error
from mapgen.ir import Layout, layout_from_json
from mapgen.plan.plan import BridgePlan


class ProofLike(Protocol):
    """What :func:`mapgen.plan.proof.prove` returns (``mapgen.plan.proof.Proof``)."""

    @property
    def ok(self) -> bool: ...

    @property
    def line(self) -> str: ...

    @property
    def problems(self) -> Sequence[Diagnostic]: ...


Planner = Callable[[Layout], BridgePlan]
Prover = Callable[[BridgePlan, Layout], ProofLike]


@dataclass(frozen=True)
class Generation:
    """Everything one run produced, keyed by input name (files by relative path)."""

    files: dict[str, str]
    plans: dict[str, BridgePlan]
    proofs: dict[str, ProofLike]


def default_planner() -> Planner:
    from mapgen.plan.planner import plan

    return plan


def default_prover() -> Prover:
    # >>> THE PROOF CALL SITE. Every bridge is proven before it is rendered, by emit and check alike. <<<
    try:
        from mapgen.plan.proof import prove
    except ImportError as exc:
        raise error(
            "emit.proof-unavailable",
            f"the bijection proof cannot be imported ({exc})",
            hint="mapgen refuses to emit unproven bridges; install megatron-core/torch (pip install -e .)",
        ) from exc
    return prove


def parse_input(name: str, text: str) -> Layout:
    """A stored or user-supplied layout JSON -> Layout, with diagnostics naming the file."""
    display = input_path(name) if name else "layout JSON"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error("emit.bad-input", f"not JSON: {exc}", file=display) from exc
    if isinstance(data, dict) and isinstance(data.get("layout"), dict):
        data = data["layout"]  # a wrapper object that carries the layout under "layout"
    if not (isinstance(data, dict) and "language_model" in data and "schema_version" in data):
        raise error("emit.bad-input", "not a layout written by `mapgen scan --json`", file=display,
                    expected="an object with schema_version and language_model",
                    hint="pass a checkpoint (directory, .safetensors file or hub id) or a `mapgen scan --json` file")
    try:
        return layout_from_json(json.dumps(data))
    except (ValueError, TypeError, KeyError) as exc:
        raise error("emit.bad-input", f"cannot read the layout: {exc}", file=display,
                    hint="re-run `mapgen scan --json` with this mapgen version") from exc


def _with_file(d: Diagnostic, path: str) -> Diagnostic:
    return d if d.file else dataclasses.replace(d, file=path)


def generate(
    inputs: Mapping[str, Layout],
    *,
    planner: Planner | None = None,
    prover: Prover | None = None,
) -> Generation:
    """Plan, prove and render ``inputs`` (input name -> layout). Raises :class:`MapgenError` with every
    planning problem, or every proof problem grouped by pattern, before anything is rendered."""
    names = sorted(inputs)
    for name in names:
        input_name(name)
    plan_fn = planner or default_planner()
    plans: dict[str, BridgePlan] = {}
    problems: list[Diagnostic] = []
    for name in names:
        try:
            plans[name] = plan_fn(inputs[name])
        except MapgenError as exc:
            problems += [_with_file(d, input_path(name)) for d in exc.diagnostics]
    if problems:
        raise MapgenError(problems, extra="nothing was written: no bridge could be planned for these inputs")

    proofs: dict[str, ProofLike] = {}
    if names:
        prove = prover or default_prover()
        for name in names:
            proof = prove(plans[name], inputs[name])
            proofs[name] = proof
            if not proof.ok:
                problems.append(
                    Diagnostic("error", "emit.proof-failed",
                               f"the rules of {plans[name].module_name} are not a bijection: {proof.line}",
                               file=input_path(name), hint="fix the problems listed with it (grouped by pattern)")
                )
                problems += [_with_file(d, input_path(name)) for d in proof.problems]
    if problems:
        lines = [f"  {name}: {plans[name].module_name}: {proofs[name].line}" for name in names]
        raise MapgenError(problems, extra="\n".join(["proofs:", *lines, "nothing was written."]))
    return Generation(files=render(plans, inputs), plans=plans, proofs=proofs)
