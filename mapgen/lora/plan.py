"""LoRA adapters planned from the base bridge's proven rules: PEFT (HF) <-> Megatron-Bridge adapters, and merges.

Pure: no files, no torch.distributed, no megatron-core. Every adapter mapping is *derived* from the rule of the
base weight it adapts, by the rule's op (:meth:`mapgen.ops.Op.adapter_rows` and friends): B's rows move as
W's rows, A's columns as W's columns, and the TP split is Megatron-Bridge's ``ParallelLinearAdapter`` layout.

Megatron side (Megatron-Bridge's names): the adapter of the Megatron parameter ``<module>.weight`` is
``<module>.adapter.linear_in.weight`` (A, ``[dim, in]``) and ``<module>.adapter.linear_out.weight`` (B,
``[out, dim]``), scale ``alpha / dim``. A fused Megatron layer (``linear_qkv``, ``linear_fc1``, the GDN
``in_proj``) fed by several HF modules holds one adapter in one of two exact forms, recorded per module:

``shared``  every adapted HF component has the same A (bitwise) and the same scale: ``linear_in = A``,
            ``linear_out`` = the components' B stacked by the op (components without an adapter: zero rows).
            Export splits B back per component and gives each the shared A: what Megatron-Bridge's LoRA on a
            fused layer means.
``block``   the components' A differ (separate HF adapters): the rank-expanded block form, ``linear_in =
            [A_1; A_2; ...]`` (``dim = sum r_i``) and ``linear_out`` = the op applied to block-diagonal
            ``[B_1 0 ...; 0 B_2 ...]``, ``alpha = scale * dim``. Exact (``B_blk @ A_cat = stack(B_i @ A_i)``)
            whenever the components' scales agree; export slices the blocks back bitwise.

A *grouped* expert adapter (Megatron-Bridge's grouped MLP with ``share_expert_adapters``: one adapter for all
experts, ``<layer>.mlp.experts.linear_fc1``) has no HF counterpart; export gives every expert a copy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mapgen import ops
from mapgen.contract.expand import Instance
from mapgen.contract.spec import ModelSpec
from mapgen.errors import Diagnostic, MapgenError, error
from mapgen.lora.peft import LoraPair, PeftAdapter

Form = Literal["shared", "block"]
IN, OUT = "adapter.linear_in.weight", "adapter.linear_out.weight"
_GROUPED = re.compile(r"\.local_experts\.\d+\.")


@dataclass
class MegatronLora:
    """One Megatron module's adapter in the full (TP=1) layout. ``components`` is, per HF key of the base
    rule (declared order), the HF module and its rank and alpha, or ``None`` for a component without an
    adapter; ``grouped``: one adapter serving every expert of a grouped MLP."""

    linear_in: torch.Tensor
    linear_out: torch.Tensor
    alpha: float
    form: Form = "shared"
    components: tuple[tuple[str, int, float] | None, ...] = ()
    grouped: bool = False
    canonical: tuple[str, ...] = ()  # stored per component under Megatron-Bridge's canonical names (block form)
    rows: tuple[int, ...] = ()  # canonical: each component's output rows (absent components included)

    @property
    def dim(self) -> int:
        return int(self.linear_in.shape[0])

    def meta(self) -> dict[str, Any]:
        return {"dim": self.dim, "alpha": self.alpha, "form": self.form, "grouped": self.grouped,
                "components": [list(c) if c else None for c in self.components], "canonical": list(self.canonical),
                "rows": list(self.rows)}


@dataclass
class MegatronAdapter:
    """A Megatron adapter: module (Megatron parameter name without ``.weight``) -> its LoRA, plus metadata
    (``dropout``, ``target_modules``, the original PEFT config when it came from one)."""

    modules: dict[str, MegatronLora] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def module_of(name: str) -> str:
    return name.removesuffix(".weight")


def grouped_name(megatron_module: str) -> str:
    """``...mlp.experts.local_experts.3.linear_fc1`` -> ``...mlp.experts.linear_fc1`` (the grouped adapter)."""
    return _GROUPED.sub(".", megatron_module)


def adaptable(inst: Instance) -> bool:
    """A rule instance whose parameter is a linear weight a LoRA adapter can sit on."""
    rule = inst.rule
    if not ops.OPS[rule.op].adapters or rule.sharding == "vocab" or rule.option("part", "weight") != "weight":
        return False
    if rule.option("orientation") == "in_out" or rule.option("layout") == "packed":
        return False  # packed HF expert tensors: no PEFT module per expert (below)
    return all(k.endswith(".weight") for k in inst.hf)


@dataclass(frozen=True)
class Target:
    inst: Instance
    index: int  # which HF key of the instance


def targets(instances: Sequence[Instance]) -> dict[str, Target]:
    """HF module (base key without ``.weight``) -> the rule instance and key index it feeds."""
    out: dict[str, Target] = {}
    for inst in instances:
        if adaptable(inst):
            for i, key in enumerate(inst.hf):
                out[module_of(key)] = Target(inst, i)
    return out


def _ctx(inst: Instance, spec: ModelSpec) -> tuple[ops.Op[Any], Any]:
    op = ops.OPS[inst.rule.op]
    return op, op.context(inst.rule, inst.hf, spec, inst.expert)


def block_form(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The rank-expanded block form of separate adapters ``(B_i, A_i)``: ``B_i`` placed in its own column block
    of zeros, and ``A = [A_1; A_2; ...]``, so that ``B_blk_i @ A == B_i @ A_i`` exactly."""
    dim = sum(int(a.shape[0]) for a in as_)
    blocks, start = [], 0
    for b, a in zip(bs, as_, strict=True):
        r = int(a.shape[0])
        blk = b.new_zeros((b.shape[0], dim))
        blk[:, start:start + r] = b
        blocks.append(blk)
        start += r
    return blocks, torch.cat(list(as_), dim=0)


# -- HF (PEFT) -> Megatron ----------------------------------------------------------------------------------
def import_adapter(peft: PeftAdapter, instances: Sequence[Instance], spec: ModelSpec,
                   base_shapes: Mapping[str, tuple[int, ...]], *, canonical: bool = False) -> MegatronAdapter:
    """The exact Megatron adapter of a PEFT adapter on this base (``base_shapes``: HF key -> shape).
    ``canonical``: fused layers with a canonical LoRA form keep one adapter per HF component (Megatron-Bridge's
    ``CanonicalLoRA``), held in memory in the block form."""
    tmap = targets(instances)
    problems: list[Diagnostic] = []
    by_inst: dict[str, dict[int, tuple[str, LoraPair]]] = {}
    insts: dict[str, Instance] = {}
    for module, pair in sorted(peft.modules.items()):
        t = tmap.get(module)
        if t is None:
            key = f"{module}.weight"
            why = ("the base has no such weight" if key not in base_shapes
                   else "the base bridge maps it with no linear op an adapter can follow (packed experts, embeddings, "
                        "norms)")
            problems.append(Diagnostic("error", "adapter.unknown-module", f"no adaptable base weight: {why}",
                                       key=module, hint="is the adapter for another base model?"))
            continue
        shape = base_shapes[f"{module}.weight"]
        if (pair.b.shape[0], pair.a.shape[1]) != tuple(shape):
            problems.append(Diagnostic("error", "adapter.shape-mismatch",
                                       f"B @ A is {(pair.b.shape[0], pair.a.shape[1])}, the base weight is {shape}",
                                       key=module, hint="the adapter was trained on another base model"))
            continue
        by_inst.setdefault(t.inst.megatron, {})[t.index] = (module, pair)
        insts[t.inst.megatron] = t.inst
    if problems:
        raise MapgenError(problems)
    out = MegatronAdapter(meta={"peft_config": peft.config})
    for name, parts in sorted(by_inst.items()):
        inst = insts[name]
        op, ctx = _ctx(inst, spec)
        present = [parts.get(i) for i in range(len(inst.hf))]
        pairs = [p for p in present if p is not None]
        first = pairs[0][1]
        scales = {p.scale for _, p in pairs}
        if len(scales) != 1:
            raise error("adapter.mixed-scales", f"the HF modules fused into {module_of(name)} have different scales "
                        f"alpha/r ({sorted(scales)}): no single Megatron adapter holds them exactly",
                        key=", ".join(m for m, _ in pairs), hint="give the fused modules equal lora_alpha / r")
        names = op.canonical_names(ctx) if canonical else None
        shared = names is None and all(
            torch.equal(p.a, first.a) and p.alpha == first.alpha and p.rank == first.rank for _, p in pairs)
        comps = tuple((c[0], c[1].rank, c[1].alpha) if c is not None else None for c in present)
        rows_of = [(inst.hf[i], base_shapes[inst.hf[i]][0]) for i in range(len(inst.hf))]
        if shared:
            bs = [p[1].b if p is not None else first.b.new_zeros((n, first.rank)) for p, (_, n) in
                  zip(present, rows_of, strict=True)]
            a, alpha, form = first.a, first.alpha, "shared"
        else:
            real_bs = [p[1].b for p in pairs]
            blocks, a = block_form(real_bs, [p[1].a for p in pairs])
            it = iter(blocks)
            bs = [next(it) if p is not None else first.b.new_zeros((n, a.shape[0])) for p, (_, n) in
                  zip(present, rows_of, strict=True)]
            alpha = first.scale * a.shape[0]
            if alpha / a.shape[0] != first.scale:
                raise error("adapter.inexact", f"{module_of(name)}: the block form's scale is not exact",
                            key=name)
            form = "block"
        out.modules[module_of(name)] = MegatronLora(
            op.adapter_cols(ctx, a), op.adapter_rows(ctx, bs), float(alpha), form, comps,  # type: ignore[arg-type]
            canonical=tuple(names or ()), rows=tuple(n for _, n in rows_of) if names else ())
    return out


# -- Megatron -> HF (PEFT) ----------------------------------------------------------------------------------
def _index(instances: Sequence[Instance]) -> tuple[dict[str, Instance], dict[str, list[Instance]]]:
    """Adaptable instances by Megatron module, and the expert instances of each grouped-experts module."""
    by_megatron = {module_of(i.megatron): i for i in instances if adaptable(i)}
    experts: dict[str, list[Instance]] = {}
    for inst in by_megatron.values():
        if inst.expert is not None:
            experts.setdefault(grouped_name(module_of(inst.megatron)), []).append(inst)
    return by_megatron, experts


def _unknown(module: str) -> Diagnostic:
    return Diagnostic("error", "adapter.unknown-module", "no adaptable Megatron parameter of the base has this name",
                      key=module, hint="is the adapter for another base model?")


def _instances_of(module: str, lora: MegatronLora, by_megatron: Mapping[str, Instance],
                  experts: Mapping[str, list[Instance]]) -> list[Instance]:
    if lora.grouped:
        return experts.get(module, [])
    inst = by_megatron.get(module)
    return [inst] if inst is not None else []


def export_adapter(meg: MegatronAdapter, instances: Sequence[Instance], spec: ModelSpec) -> PeftAdapter:
    """The PEFT adapter of a Megatron adapter: fused adapters become exact per-module HF adapters (B split by
    the op, A shared; block form sliced back), a grouped expert adapter one adapter per expert."""
    by_megatron, experts = _index(instances)
    problems: list[Diagnostic] = []
    modules: dict[str, LoraPair] = {}
    for module, lora in sorted(meg.modules.items()):
        found = _instances_of(module, lora, by_megatron, experts)
        if not found:
            problems.append(_unknown(module))
            continue
        for inst in found:
            op, ctx = _ctx(inst, spec)
            try:
                bs = op.adapter_rows_back(ctx, lora.linear_out)
                a = op.adapter_cols_back(ctx, lora.linear_in)
            except ops.PrimitiveError as exc:
                problems.append(Diagnostic("error", "adapter.shape-mismatch", str(exc), key=module,
                                           hint="the adapter was trained on another base model"))
                continue
            # a grouped adapter (or one written without component records) adapts every component of each expert
            comps = (lora.components if lora.components and not lora.grouped
                     else tuple((module_of(k), lora.dim, lora.alpha) for k in inst.hf))
            start = 0
            for key, b, comp in zip(inst.hf, bs, comps, strict=True):
                if comp is None:
                    continue
                _, rank, alpha = comp
                if lora.form == "block":
                    modules[module_of(key)] = LoraPair(a[start:start + rank].contiguous(),
                                                       b[:, start:start + rank].contiguous(), alpha)
                    start += rank
                else:
                    modules[module_of(key)] = LoraPair(a.contiguous(), b.contiguous(), alpha)
    if problems:
        raise MapgenError(problems)
    config = dict(meg.meta.get("peft_config") or {})
    if not config:
        config = {"peft_type": "LORA", "lora_dropout": float(meg.meta.get("dropout", 0.0))}
    return PeftAdapter(config, modules)


# -- merging --------------------------------------------------------------------------------------------------
def merged(weight: torch.Tensor, pair: LoraPair, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W + alpha/r * B @ A`` computed in fp32 and cast once to W's dtype (or ``dtype``)."""
    delta = pair.b.float() @ pair.a.float()
    return (weight.float() + pair.scale * delta).to(dtype or weight.dtype)


def merge_local(weight: torch.Tensor, lin: torch.Tensor, lout: torch.Tensor, alpha: float, dim: int) -> torch.Tensor:
    """Megatron-Bridge's ``LoRAMerge`` on one rank: ``lin``/``lout`` are the *gathered* factor where the base
    is column- (``linear_in``) or row-parallel (``linear_out``) and this rank's piece otherwise."""
    delta = lout.float() @ lin.float()
    return (weight.float() + alpha / dim * delta).to(weight.dtype)


# -- the parallel layout of a Megatron adapter ----------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """One rank's piece of one adapter tensor: the file (pipeline stage, TP or EP/ETP coordinate) it lives in."""

    file: str
    key: str
    tensor: torch.Tensor


def _stage(inst: Instance, spec: ModelSpec, pp: int) -> int:
    if pp == 1:
        return 0
    if inst.rule.domain.startswith("mtp"):
        return pp - 1
    per = spec.num_layers // pp
    return int(inst.layer or 0) // per


def shard_pieces(meg: MegatronAdapter, instances: Sequence[Instance], spec: ModelSpec, *, tp: int, ep: int,
                 etp: int, pp: int) -> Iterator[Piece]:
    """Every rank's pieces: dense adapters split over TP (file ``pp{p}/tp{t}``), expert adapters over ETP and
    placed by EP (``pp{p}/ep{e}_etp{t}``), both under the global (unsharded) names Megatron-Bridge's
    dist-checkpoint keys use."""
    by_megatron, experts = _index(instances)
    for module, lora in sorted(meg.modules.items()):
        found = _instances_of(module, lora, by_megatron, experts)
        if not found:
            raise MapgenError(_unknown(module))
        inst = found[0]
        op, ctx = _ctx(inst, spec)
        stage = _stage(inst, spec, pp)
        size = etp if inst.expert is not None else tp
        parts = canonical_parts(lora, op, ctx)
        for rank in range(size):
            shard = ops.Shard(rank, size)
            pieces = ([(f"{module}.adapter.{n}.linear_in.weight", f"{module}.adapter.{n}.linear_out.weight",
                        _rows(ctx, a, shard), _rows(ctx, b, shard)) for n, a, b in parts] if parts else
                      [(f"{module}.{IN}", f"{module}.{OUT}",
                        *op.adapter_split(ctx, lora.linear_in, lora.linear_out, shard))])
            if inst.expert is None:
                files = [f"pp{stage}/tp{rank}"]
            elif lora.grouped:
                files = [f"pp{stage}/ep{e}_etp{rank}" for e in range(ep)]  # every EP rank holds the shared one
            else:
                per = (spec.num_moe_experts or 1) // ep
                files = [f"pp{stage}/ep{int(inst.expert) // per}_etp{rank}"]
            for f in files:
                for kin, kout, lin, lout in pieces:
                    yield Piece(f, kin, lin)
                    yield Piece(f, kout, lout)


def gather_pieces(files: Mapping[str, Mapping[str, torch.Tensor]], meta: Mapping[str, Any],
                  instances: Sequence[Instance], spec: ModelSpec) -> MegatronAdapter:
    """The inverse of :func:`shard_pieces` from any parallel layout: ``files`` maps a piece file to its
    tensors, ``meta`` is the adapter's metadata (``modules``: each module's form, alpha, components)."""
    by_megatron, experts = _index(instances)
    out = MegatronAdapter(meta={k: v for k, v in meta.items() if k != "modules"})
    problems: list[Diagnostic] = []
    for module, info in sorted(meta["modules"].items()):
        lora = MegatronLora(torch.empty(0), torch.empty(0), float(info["alpha"]), info["form"],
                            tuple(tuple(c) if c else None for c in info["components"]), bool(info["grouped"]),
                            tuple(info.get("canonical") or ()), tuple(info.get("rows") or ()))
        found = _instances_of(module, lora, by_megatron, experts)
        if not found:
            problems.append(_unknown(module))
            continue
        op, ctx = _ctx(found[0], spec)
        if lora.canonical:
            lora.linear_in, lora.linear_out = _from_canonical(module, lora, op, ctx, files)
            out.modules[module] = lora
            continue
        ins: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for name in sorted(files, key=_file_order):
            if f"{module}.{IN}" in files[name]:
                ins.append((name, files[name][f"{module}.{IN}"], files[name][f"{module}.{OUT}"]))
        # one stage and one EP rank hold the module; its TP/ETP pieces are in rank order
        if lora.grouped or found[0].expert is not None:
            first_ep = min(_file_order(n)[1] for n, _, _ in ins)
            ins = [x for x in ins if _file_order(x[0])[1] == first_ep]
        lin, lout = op.adapter_gather(ctx, [x[1] for x in ins], [x[2] for x in ins])
        lora.linear_in, lora.linear_out = lin, lout
        out.modules[module] = lora
    if problems:
        raise MapgenError(problems)
    return out


def _file_order(name: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"pp(\d+)/(?:tp(\d+)|ep(\d+)_etp(\d+))", name)
    if m is None:
        raise error("adapter.bad-file", f"unexpected piece file {name!r}", key=name,
                    expected="pp<P>/tp<T> or pp<P>/ep<E>_etp<T>")
    if m.group(2) is not None:
        return int(m.group(1)), 0, int(m.group(2))
    return int(m.group(1)), int(m.group(3)), int(m.group(4))


# -- canonical LoRA (per-component adapters on a fused layer) ---------------------------------------------------
def canonical_parts(lora: MegatronLora, op: ops.Op[Any], ctx: Any) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, A_i, B_i)`` of each present component of a canonical adapter (sliced from the block form:
    B_i's rows in HF order, as canonical LoRA's separate ``linear_out`` holds them)."""
    if not lora.canonical:
        return []
    bs = op.adapter_rows_back(ctx, lora.linear_out)
    a = op.adapter_cols_back(ctx, lora.linear_in)
    out, start = [], 0
    for name, b, comp in zip(lora.canonical, bs, lora.components, strict=True):
        if comp is None:
            continue
        rank = comp[1]
        out.append((name, a[start:start + rank].contiguous(), b[:, start:start + rank].contiguous()))
        start += rank
    return out


def _rows(ctx: Any, x: torch.Tensor, shard: ops.Shard) -> torch.Tensor:
    """Canonical pieces: ``linear_in`` (rank rows) and ``linear_out`` (HF rows of the whole heads / halves this
    rank holds) are both plain row chunks (``ColumnParallelLinear``)."""
    start, stop = shard.bounds(x.shape[0], "rows", ctx.rule)
    return x[start:stop].contiguous()


def _from_canonical(module: str, lora: MegatronLora, op: ops.Op[Any], ctx: Any,
                    files: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    order = sorted(files, key=_file_order)
    keys = {f"{module}.adapter.{c}.linear_in.weight" for c in lora.canonical}
    first_ep = min((_file_order(n)[1] for n in order if keys & set(files[n])), default=0)
    bs, as_ = [], []
    for name, comp in zip(lora.canonical, lora.components, strict=True):
        if comp is None:
            continue
        kin, kout = f"{module}.adapter.{name}.linear_in.weight", f"{module}.adapter.{name}.linear_out.weight"
        held = [n for n in order if kin in files[n] and _file_order(n)[1] == first_ep]
        as_.append(torch.cat([files[n][kin] for n in held]))
        bs.append(torch.cat([files[n][kout] for n in held]))
    blocks, a = block_form(bs, as_)
    it = iter(blocks)
    full_bs = [next(it) if c is not None else blocks[0].new_zeros((n, a.shape[0]))
               for c, n in zip(lora.components, lora.rows, strict=True)]
    return op.adapter_cols(ctx, a), op.adapter_rows(ctx, full_bs)
