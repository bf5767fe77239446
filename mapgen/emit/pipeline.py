"""The one code path behind ``mapgen emit`` and ``mapgen check``: inputs -> plans -> proofs -> files.

``generate(inputs)`` plans every stored/new input, proves every plan against its layout, and renders the
whole generated tree in memory. It writes nothing: ``emit`` writes the result, ``check`` compares it with
the directory on disk. Planner and prover are parameters so tests can substitute them.

**The proof record** (``proofs.json`` in the generated tree). Proving builds the model on the meta device
with megatron-core: seconds per input, plus ~5 s to import torch and megatron-core. Planning and rendering
take about a second for every stored input together, so they are always redone (a hand edit of a module,
a template or renderer change is always caught). Only the proof is skipped, for an input whose record
matches all of: the sha256 of its canonical input, the sha256 of its plan (``repr`` of the rules and config
recipe, so any planner change re-proves), the mapgen version and the installed megatron-core version. The
record is part of the rendered tree (written by emit, drift-checked by check) and is rewritten from the
proofs of the current run, so it never holds a stale or failed proof. ``reprove=True``
(``--reprove``) ignores it; CI runs ``mapgen check --reprove``.

**The numerical proof** (:mod:`mapgen.runtime.numerics`). After the bijection holds, each input's tiny twin
(built and saved by transformers in a temporary directory) runs through the new bridge in megatron-core and
through transformers at TP=1 in fp32: a bridge is rendered only if max |logits diff| <= 1e-4, or if there is
no reference model (the line says why: no transformers class, remote code, a storage transformers does not
write). Its line is recorded beside the bijection proof (``proofs.json``, the module header and the bridge's
``numerics``), and re-run under the same conditions, the installed transformers version included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from mapgen import __version__
from mapgen.contract.bridge import Bridge
from mapgen.emit.names import input_name
from mapgen.emit.render import input_path, input_sha256, render
from mapgen.errors import Diagnostic, MapgenError, error
from mapgen.ir import Layout, layout_from_json, layout_to_json
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
NumericsProver = Callable[[BridgePlan, Layout, str], ProofLike]  # (plan, layout, input path) -> proof


PROOFS_PATH = "proofs.json"
PROOFS_SCHEMA = 2


@dataclass(frozen=True)
class Generation:
    """Everything one run produced, keyed by input name (files by relative path). ``cached`` names the
    inputs whose proofs came from the proof record instead of being re-run; ``numerics`` holds each input's
    numerical-proof line."""

    files: dict[str, str]
    plans: dict[str, BridgePlan]
    proofs: dict[str, ProofLike]
    cached: frozenset[str] = frozenset()
    numerics: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class ProofRecord:
    """One entry of ``proofs.json``: the proof lines of a plan that held (bijection, numerics), and what they
    were proven for."""

    input_sha256: str
    plan_sha256: str
    line: str
    numerics: str


@dataclass(frozen=True)
class CachedProof:
    """A proof taken from the record (it held when the record was written; nothing was re-run)."""

    line: str
    numerics: str = ""
    ok: bool = True
    problems: tuple[Diagnostic, ...] = ()


Versions = tuple[str, str, str]  # mapgen, megatron-core, transformers


@dataclass(frozen=True)
class ProofCache:
    """The proof record of a generated tree. It is used only when the mapgen, megatron-core and transformers
    versions it names are the installed ones."""

    mapgen: str = ""
    megatron_core: str = ""
    transformers: str = ""
    records: Mapping[str, ProofRecord] = dataclasses.field(default_factory=dict)

    def lookup(self, name: str, input_sha: str, plan_sha: str, versions: Versions) -> CachedProof | None:
        record = self.records.get(name)
        if record is None or (self.mapgen, self.megatron_core, self.transformers) != versions:
            return None
        if (record.input_sha256, record.plan_sha256) != (input_sha, plan_sha):
            return None
        return CachedProof(record.line, record.numerics)


def _installed(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def megatron_core_version() -> str:
    """The installed megatron-core's version, read from its metadata (importing it takes seconds)."""
    return _installed("megatron-core")


def installed_versions() -> Versions:
    """What a recorded proof depends on besides its input and plan (metadata only: no import)."""
    return (__version__, megatron_core_version(), _installed("transformers"))


def plan_sha256(plan: BridgePlan) -> str:
    """A digest of everything the proof checks: the rules and the config recipe (``repr`` of the frozen plan)."""
    return hashlib.sha256(repr(plan).encode("utf-8")).hexdigest()


def layout_sha256(layout: Layout) -> str:
    """sha256 of the canonical stored input (the digest the module headers carry)."""
    return input_sha256(layout_to_json(layout))


def parse_proof_cache(text: str) -> ProofCache:
    """``proofs.json`` -> ProofCache; anything malformed is an empty cache (everything is re-proven, and the
    re-rendered record shows up as a drift)."""
    try:
        data = json.loads(text)
        if data.get("schema") != PROOFS_SCHEMA:
            return ProofCache()
        records = {
            str(name): ProofRecord(str(r["input_sha256"]), str(r["plan_sha256"]), str(r["proof"]), str(r["numerics"]))
            for name, r in data["proofs"].items()
        }
        return ProofCache(str(data["mapgen"]), str(data["megatron_core"]), str(data["transformers"]), records)
    except (ValueError, TypeError, KeyError, AttributeError):
        return ProofCache()


def render_proof_cache(records: Mapping[str, ProofRecord], versions: Versions) -> str:
    data = {
        "about": "Bijection and numerical proofs of the plans in this tree, by input: they are skipped while the "
        "input, its plan and the three versions are unchanged. Written by mapgen emit; `mapgen check --reprove` "
        "re-runs them.",
        "mapgen": versions[0],
        "megatron_core": versions[1],
        "proofs": {
            name: {"input_sha256": r.input_sha256, "numerics": r.numerics, "plan_sha256": r.plan_sha256,
                   "proof": r.line}
            for name, r in sorted(records.items())
        },
        "schema": PROOFS_SCHEMA,
        "transformers": versions[2],
    }
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


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


def default_numerics() -> NumericsProver:
    # >>> THE NUMERICAL PROOF CALL SITE: the tiny twin through the new bridge and through transformers. <<<
    try:
        from mapgen.runtime.numerics import prove_numerics
    except ImportError as exc:
        raise error(
            "emit.proof-unavailable",
            f"the numerical proof cannot be imported ({exc})",
            hint="mapgen refuses to emit unproven bridges; install torch/megatron-core/transformers (pip install -e .)",
        ) from exc

    def run(plan: BridgePlan, layout: Layout, where: str) -> ProofLike:
        bridge = Bridge.from_rules(plan.fingerprint, plan.model_type, plan.facts, plan.rules)
        return prove_numerics(bridge, layout, where=where)

    return run


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
    numerics: NumericsProver | None = None,
    cache: ProofCache | None = None,
) -> Generation:
    """Plan, prove and render ``inputs`` (input name -> layout). Raises :class:`MapgenError` with every
    planning problem, or every proof problem grouped by pattern, before anything is rendered. With a
    ``cache``, an input whose record matches (see the module docstring) is not proven again; the rendered
    tree includes the proof record (``proofs.json``) of this run."""
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
    lines: dict[str, str] = {}
    versions = installed_versions()
    digests = {name: (layout_sha256(inputs[name]), plan_sha256(plans[name])) for name in names}
    cached: set[str] = set()
    prove: Prover | None = None
    prove_numerics: NumericsProver | None = None
    for name in names:
        hit = cache.lookup(name, *digests[name], versions) if cache is not None else None
        if hit is not None:
            proofs[name], lines[name] = hit, hit.numerics
            cached.add(name)
            continue
        prove = prove or prover or default_prover()
        proof = prove(plans[name], inputs[name])
        proofs[name] = proof
        if not proof.ok:
            problems.append(
                Diagnostic("error", "emit.proof-failed",
                           f"the rules of {plans[name].module_name} are not a bijection: {proof.line}",
                           file=input_path(name), hint="fix the problems listed with it (grouped by pattern)")
            )
            problems += [_with_file(d, input_path(name)) for d in proof.problems]
            continue
        prove_numerics = prove_numerics or numerics or default_numerics()
        checked = prove_numerics(plans[name], inputs[name], input_path(name))
        lines[name] = checked.line
        problems += [_with_file(d, input_path(name)) for d in checked.problems]
    if problems:
        summary = [f"  {name}: {plans[name].module_name}: {proofs[name].line}"
                   + (f"; {lines[name]}" if name in lines else "") for name in names]
        raise MapgenError(problems, extra="\n".join(["proofs:", *summary, "nothing was written."]))
    files = render(plans, inputs, numerics=lines)
    records = {name: ProofRecord(*digests[name], proofs[name].line, lines[name]) for name in names}
    files[PROOFS_PATH] = render_proof_cache(records, versions)
    return Generation(files=dict(sorted(files.items())), plans=plans, proofs=proofs, cached=frozenset(cached),
                      numerics=lines)
