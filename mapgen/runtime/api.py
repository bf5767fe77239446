"""High-level conversion operations used by the CLI (and by frameworks embedding mapgen).

* :func:`load_hf` — build the Megatron model for this rank and fill it from a HF checkpoint.
* :func:`export_hf` — stream a Megatron model back to a HF checkpoint directory (atomic).
* :func:`convert` / :func:`export_megatron` — the same through a Megatron-Core distributed checkpoint.
* :func:`verify` — HF -> Megatron -> HF bitwise round trip and, where transformers runs the architecture,
  logits parity.

Every function here is SPMD: under ``torchrun`` (or :func:`spawn`) every rank calls it; rank 0 writes.
The bridge always comes from a generated registry, keyed by the checkpoint's layout fingerprint
(:mod:`mapgen.runtime.discovery` says which registries are searched).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from mapgen import __version__
from mapgen.contract.bridge import Bridge
from mapgen.contract.expand import Instance, tower_keys
from mapgen.contract.fingerprint import dequantized
from mapgen.contract.hf_config import HFConfig
from mapgen.contract.spec import ModelSpec
from mapgen.errors import Diagnostic, MapgenError, error
from mapgen.infer.build import fp8_scales
from mapgen.ir import Layout, layout_from_json, layout_to_json
from mapgen.runtime._net import free_port as _free_port
from mapgen.runtime.engine import Binding, Coords, Stats, iter_hf_tensors, load_model, shard_order
from mapgen.runtime.export_copy import CopyPlanner, copied_tensors
from mapgen.runtime.hfio import (
    CONFIG_DTYPES,
    DTYPES,
    INDEX_NAME,
    TORCH_TO_ST,
    CopiedTensor,
    SafetensorsReader,
    ShardedWriter,
    commit_dir,
    prepare_target,
    read_weight_map,
    staging_dir,
    write_safetensors,
)
from mapgen.runtime.layout import Parallel as Parallel  # noqa: PLC0414 -- the public name, re-exported
from mapgen.runtime.quant import BlockFp8, DequantizingReader, Format, Mxfp4, Mxfp4Reader, reader_for, requantize

MAPGEN_META = "mapgen.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3


@dataclass
class HFSource:
    """A local HF checkpoint as the runtime needs it: layout, config, weight map, dtypes, metadata."""

    root: Path
    layout: Layout
    weight_map: dict[str, str]
    index_metadata: dict[str, Any]
    dtypes: dict[str, str] = field(default_factory=dict)
    shard_metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    single_file: bool = False
    # block-scaled FP8 weights or MXFP4 experts, dequantized while read (mapgen.runtime.quant); ``dtypes`` then
    # holds the dequantized dtype of each such tensor (by the model's name), ``stored_dtypes`` what is on disk
    quant: Format | None = None
    stored_dtypes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path | str) -> HFSource:
        """Scan ``root`` with every shard header read, so that everything a conversion could trip over is
        refused here, before a model is built or a byte written: malformed JSON, shards missing, truncated or
        outside the directory, keys absent from their shard, shapes and dtypes the config does not imply,
        quantized weights, unclassified keys."""
        from mapgen.infer import infer
        from mapgen.source import read_source

        root = Path(root)
        if not root.is_dir():
            raise error("source.not-a-directory", f"{root} is not a local checkpoint directory", file=str(root),
                        expected="a directory with config.json and model.safetensors(.index.json)",
                        hint="download hub checkpoints first (huggingface-cli download ORG/NAME --local-dir DIR)")
        src = read_source(str(root), headers=True)
        layout = infer(src)
        if layout.unclassified:
            patterns = "\n".join(f"  {u.pattern}  ({u.count} keys)" for u in layout.unclassified)
            raise MapgenError(Diagnostic("error", "scan.unclassified",
                                         f"{sum(u.count for u in layout.unclassified)} keys fit no family",
                                         file=str(root), hint="run `mapgen scan` to see them"),
                              exit_code=2, extra=f"unclassified keys:\n{patterns}")
        if not src.headers_read:
            raise error("checkpoint.missing-shard", "no shard file of the index is in the directory (metadata only)",
                        file=str(root), expected=", ".join(src.shards[:3]) + (", ..." if len(src.shards) > 3 else ""),
                        hint="download the weights; `mapgen scan` works on metadata alone, conversion does not")
        # The scan already parsed the index and every shard header: reuse its weight map and dtypes.
        weight_map = {key: info.shard for key, info in src.tensors.items()}
        dtypes = {key: info.dtype for key, info in src.tensors.items() if info.dtype is not None}
        reader = SafetensorsReader(root, weight_map)
        shard_meta = {shard: reader.header_metadata(shard) for shard in dict.fromkeys(weight_map.values())}
        reader.close()
        quant: Format | None = None
        stored = dict(dtypes)
        out = CONFIG_DTYPES.get(str(layout.config.get("torch_dtype") or layout.config.get("dtype")), torch.bfloat16)
        if layout.quantization == "fp8_block":
            quant = BlockFp8.from_checkpoint(layout.config, weight_map, out_dtype=out)
            dtypes = {k: v for k, v in dtypes.items() if k not in quant.scales.values()}
            dtypes.update(dict.fromkeys(quant.scales, TORCH_TO_ST[out]))
        elif layout.quantization == "mxfp4":
            quant = Mxfp4.from_keys(weight_map, out_dtype=out)
            dtypes = {k: v for k, v in dtypes.items() if k not in quant.stored}
            dtypes.update(dict.fromkeys(quant.pairs, TORCH_TO_ST[out]))
        return cls(root, layout, weight_map, dict(src.index_metadata), dtypes, shard_meta,
                   single_file=not (root / INDEX_NAME).is_file(), quant=quant, stored_dtypes=stored)

    def reader(self, dtype: torch.dtype | None = None) -> SafetensorsReader | DequantizingReader | Mxfp4Reader:
        """A reader of this checkpoint's tensors as the model uses them: FP8 weights dequantized into ``dtype``
        (the Megatron parameters' dtype: ``fp32(q) * scale`` is rounded once, to what the model holds)."""
        quant = self.quant
        if quant is not None and dtype is not None:
            quant = dataclasses.replace(quant, out_dtype=dtype)
        return reader_for(SafetensorsReader(self.root, self.weight_map), quant)

    def to_meta(self, *, quantized: bool = False) -> dict[str, Any]:
        """The layout of an HF checkpoint written back from this one: the same names, shard files and dtypes,
        with block-scaled FP8 weights in their dequantized dtype and without their scales -- or, ``quantized``,
        re-quantized with the source's tiles beside their scales (``"quantize"``: the tile shape)."""
        meta: dict[str, Any] = {"weight_map": self.weight_map, "index_metadata": self.index_metadata,
                                "dtypes": self.dtypes, "shard_metadata": self.shard_metadata,
                                "single_file": self.single_file}
        if self.quant is not None and quantized:
            meta["quantize"] = "mxfp4" if isinstance(self.quant, Mxfp4) else list(self.quant.block)
        elif self.quant is not None:
            meta["weight_map"] = self.model_weight_map
        return meta

    @property
    def model_weight_map(self) -> dict[str, str]:
        """The weight map as the model names the tensors: without FP8 scales, each MXFP4 pair as its ``X`` (in
        the blocks' shard)."""
        if self.quant is None:
            return self.weight_map
        keys = self.quant.model_keys(self.weight_map)
        shard = {x: self.weight_map[b] for x, (b, _) in self.quant.pairs.items()} if isinstance(
            self.quant, Mxfp4) else {}
        return {k: shard.get(k) or self.weight_map[k] for k in keys}


# ---------------------------------------------------------------------------------------------------------
# Bridges and models
# ---------------------------------------------------------------------------------------------------------
def bridge_for(layout: Layout) -> Bridge:
    """The generated bridge for this layout's fingerprint (never a 'similar' one), from the first registry on
    the search path that lists it (:mod:`mapgen.runtime.discovery`)."""
    from mapgen.contract.fingerprint import fingerprint
    from mapgen.runtime import discovery

    fp = fingerprint(layout)
    what = f"layout {fp} (model_type {layout.model_type!r}, {', '.join(layout.architectures) or 'no architectures'})"
    return discovery.bridge(fp, what=what)


UNPROVEN_FLAG = "--allow-unproven-numerics"


def require_numerics(bridge: Bridge, *, allow: bool, command: str) -> dict[str, Any]:
    """Refuse a bridge whose emit did not prove logits parity with transformers, unless the user said
    ``--allow-unproven-numerics``; returns what ``mapgen.json`` records about it."""
    record = {"bridge": bridge.numerics, "proven": bridge.numerically_proven, "allow_unproven_numerics": allow}
    if bridge.numerically_proven or allow:
        return record
    why = bridge.numerics or "it was emitted before mapgen recorded numerical proofs"
    raise error(
        "bridge.unproven-numerics",
        f"the bridge for layout {bridge.fingerprint} (model_type {bridge.model_type!r}) has no numerical proof: {why}",
        expected="a bridge whose `mapgen emit` proved logits parity with transformers on a tiny twin of the layout",
        hint=f"its names and shapes are proven (a bijection), but nothing shows that the Megatron model computes "
        f"what this checkpoint's model computes; pass {UNPROVEN_FLAG} to {command} anyway (recorded in "
        f"{MAPGEN_META}), or re-emit the bridge where transformers has a class for the model",
    )


def bind(layout: Layout, bridge: Bridge | None = None) -> Binding:
    from mapgen.runtime.megatron import mtp_inner_name

    bridge = bridge or bridge_for(layout)
    spec = bridge.megatron_config(HFConfig(layout.config), layout)
    return Binding.create(spec, layout, bridge.rules, mtp_inner_name())


DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
_WIDTH = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


@dataclass(frozen=True)
class DtypePlan:
    """The dtypes of the Megatron model: ``base`` (megatron's ``params_dtype``) and per-parameter
    ``overrides`` (global Megatron name -> dtype name) where the source stores a tensor in another dtype
    (fp32 ``A_log`` in a bf16 checkpoint) or a rule asks for fp32 (the router's expert bias). ``choice`` is
    what the user asked for: ``auto`` (the source's dtypes) or one dtype name."""

    choice: str = "auto"
    base: str = "float32"
    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def params_dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.base]

    def override_map(self) -> dict[str, torch.dtype]:
        return {name: DTYPE_NAMES[d] for name, d in self.overrides}

    def dtype_of(self, megatron: str) -> torch.dtype:
        return self.override_map().get(megatron, self.params_dtype)

    def to_json(self) -> dict[str, Any]:
        return {"choice": self.choice, "params_dtype": self.base, "overrides": dict(self.overrides)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> DtypePlan:
        """A checkpoint's recorded plan; checkpoints written before dtypes were recorded are fp32."""
        if not isinstance(data, Mapping):
            return cls("float32", "float32", ())
        base = str(data.get("params_dtype", "float32"))
        overrides = data.get("overrides") or {}
        names = [base, *map(str, overrides.values())]
        bad = [n for n in names if n not in DTYPE_NAMES]
        if bad:
            raise error("megatron.bad-metadata", f"{MAPGEN_META} names an unknown dtype {bad[0]!r}",
                        expected=", ".join(DTYPE_NAMES))
        return cls(str(data.get("choice", base)), base, tuple(sorted((str(k), str(v)) for k, v in overrides.items())))


def _torch_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_dtypes(binding: Binding, hf_dtypes: Mapping[str, str], choice: str = "auto") -> DtypePlan:
    """The Megatron dtypes for a conversion. ``auto``: the source's own dtypes -- the base is the dtype most
    of the source's tensors have (the config's ``torch_dtype`` on a tie), and every parameter whose source
    tensors are stored in another floating dtype keeps it. An explicit ``choice`` puts every parameter in
    that dtype. Either way a rule that declares ``dtype: fp32`` stays fp32."""
    if choice not in DTYPE_CHOICES:
        raise error("cli.dtype", f"unknown dtype {choice!r}", expected=", ".join(DTYPE_CHOICES))

    def floating(key: str) -> torch.dtype | None:
        dt = DTYPES.get(hf_dtypes.get(key, ""))
        return dt if dt in _WIDTH else None

    if choice == "auto":
        counts: dict[torch.dtype, int] = {}
        for inst in binding.by_megatron.values():
            for key in inst.hf:
                dt = floating(key)
                if dt is not None:
                    counts[dt] = counts.get(dt, 0) + 1
        declared = CONFIG_DTYPES.get(str(HFConfig(binding.layout.config).get("torch_dtype", "dtype", default="")))
        top = max(counts.values(), default=0)
        winners = [d for d, n in counts.items() if n == top]
        base = declared if declared in winners else (max(winners, key=lambda d: _WIDTH[d]) if winners
                                                     else declared or torch.float32)
        if base == torch.float64:
            base = torch.float32
    else:
        base = DTYPE_NAMES[choice]
    overrides: dict[str, str] = {}
    for name, inst in binding.by_megatron.items():
        if inst.rule.option("dtype") == "fp32":
            want = torch.float32
        elif choice == "auto":
            found = {d for d in (floating(k) for k in inst.hf) if d is not None}
            want = max(found, key=lambda d: _WIDTH[d]) if found else base
            if want == torch.float64:
                want = torch.float32
        else:
            want = base
        if want != base:
            overrides[name] = _torch_name(want)
    return DtypePlan(choice, _torch_name(base), tuple(sorted(overrides.items())))


def model_spec_for_parallel(spec: ModelSpec, par: Parallel) -> ModelSpec:
    from mapgen.ops import padded_vocab

    return spec.replace(vocab_size=padded_vocab(spec.vocab_size, par.tp))


def check_parallel(spec: ModelSpec, par: Parallel, world_size: int) -> None:
    from mapgen.runtime.megatron import check_divisibility

    problems = check_divisibility(spec, par.tp, par.ep, par.etp_size, par.pp, world_size)
    if problems:
        raise MapgenError([Diagnostic("error", "parallel.divisibility", p,
                                      hint="choose TP/EP/ETP/PP sizes that divide the model") for p in problems])


def require_tower_source(layout: Layout, source_root: Path | str | None) -> set[str]:
    """The layout's tower keys (a vision tower, a projector: tensors the Megatron model does not hold); an export
    of a layout with any needs the source checkpoint they are copied from."""
    towers = tower_keys(layout)
    if towers and source_root is None:
        raise error("export.towers-need-source", f"the layout carries {len(towers)} tower keys "
                    f"({', '.join(t.name for t in layout.towers)}) that live only in the source checkpoint",
                    hint="pass --source with the original HF checkpoint")
    return towers


def preflight(source_path: str | None, par: Parallel, world: int, *, out: Path | None = None,
              overwrite: bool = False, ckpt: Path | None = None,
              numerics: tuple[bool, str] | None = None) -> None:
    """Every check a command can make before it starts workers or writes a byte, in the launching process:
    the source checkpoint (:meth:`HFSource.open`), the bridge for its layout, TP/EP/ETP/PP divisibility (all
    problems at once) and the output directory. ``ckpt`` (export) must hold ``mapgen.json`` unless a source
    is given, and a layout with towers needs the source (:func:`require_tower_source`). ``numerics`` =
    (allowed, command): the bridge must carry its numerical proof unless allowed (:func:`require_numerics`).
    Imports no megatron-core."""
    if ckpt is not None and not Path(ckpt).is_dir():
        raise error("megatron.not-found", f"{ckpt} is not a directory", file=str(ckpt),
                    expected="a Megatron checkpoint directory written by `mapgen convert`")
    source = HFSource.open(source_path) if source_path else None
    if source is not None:
        layout = source.layout
    else:
        assert ckpt is not None
        layout = layout_from_json(json.dumps(read_megatron_meta(ckpt)["layout"]))
        require_tower_source(layout, None)
    if ckpt is not None and ((Path(ckpt) / "release").is_dir() or (Path(ckpt) / ".metadata").is_file()):
        from mapgen.runtime._safeload import check_dist_checkpoint

        check_dist_checkpoint(Path(ckpt) / "release" if (Path(ckpt) / "release").is_dir() else Path(ckpt))
    bridge = bridge_for(layout)
    if numerics is not None:
        meta = read_megatron_meta(ckpt) if ckpt is not None and (Path(ckpt) / MAPGEN_META).is_file() else {}
        accepted = bool((meta.get("numerics") or {}).get("allow_unproven_numerics"))
        require_numerics(bridge, allow=numerics[0] or accepted, command=numerics[1])
    check_parallel(bridge.megatron_config(HFConfig(layout.config), layout), par, world)
    if out is not None:
        sources = ([source.root] if source is not None else []) + ([Path(ckpt)] if ckpt is not None else [])
        prepare_target(Path(out), overwrite=overwrite, sources=sources)


def build(binding: Binding, par: Parallel, *, device: Literal["cpu", "meta", "cuda"] = "cpu",
          initialize: bool = True, dtypes: DtypePlan | None = None, vocab_tp: int | None = None) -> torch.nn.Module:
    """This rank's Megatron model, in ``dtypes`` (default: fp32 everywhere). ``vocab_tp``: the TP size whose
    vocabulary padding to build (a checkpoint's, when it was written at another TP; default ``par.tp``)."""
    from mapgen.runtime.megatron import build_model, set_param_dtypes

    dtypes = dtypes or DtypePlan("float32", "float32", ())
    padding = par if vocab_tp is None else Parallel(tp=vocab_tp)
    model: torch.nn.Module = build_model(model_spec_for_parallel(binding.spec, padding), device=device,
                                         initialize=initialize, params_dtype=dtypes.params_dtype)
    set_param_dtypes(model, dtypes.override_map(), dtypes.params_dtype)
    return model


# ---------------------------------------------------------------------------------------------------------
# Distributed plumbing
# ---------------------------------------------------------------------------------------------------------
def world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _spawn_entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...],
                 results: Any) -> None:
    import signal
    import traceback

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # Local workers talk over loopback only: the host name may resolve to an interface the peers do not share.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    def stop(signum: int, frame: object) -> None:  # spawn() stops the survivors of a failed peer: unwind, so
        raise SystemExit(128 + signum)  # that staging directories are removed on the way out

    signal.signal(signal.SIGTERM, stop)
    try:
        out = fn(*args)
        results.put((rank, "ok", out))
    except MapgenError as exc:
        results.put((rank, "mapgen", (exc.render(), exc.exit_code)))
        raise SystemExit(exc.exit_code) from None
    except SystemExit as exc:
        results.put((rank, "stopped", str(exc.code)))
        raise
    except BaseException as exc:
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


def _describe_exit(code: int | None) -> str:
    import signal

    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code} without reporting a result"


def spawn(fn: Callable[..., Any], world: int, *args: Any, grace_s: float = 5.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world`` local gloo processes; return each rank's result (rank order).

    Never waits forever: the workers are watched, not joined one by one. As soon as one fails or dies
    (killed, out of memory) the others, which may be blocked in a collective waiting for it, get SIGTERM
    (they unwind and remove their staging directories), then SIGKILL after ``grace_s``. A worker that died
    without reporting is named first (``worker.died``); a mapgen error on a worker is re-raised as such."""
    from multiprocessing.connection import wait

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_spawn_entry, args=(r, world, port, fn, args, results)) for r in range(world)]
    outs: dict[int, Any] = {}
    failures: list[tuple[int, str, Any]] = []

    def drain() -> None:
        while not results.empty():
            rank, status, payload = results.get()
            if status == "ok":
                outs[rank] = payload
            else:
                failures.append((rank, status, payload))

    try:
        for p in procs:
            p.start()
        deadline: float | None = None
        causes: list[int] = []  # the workers whose exit made the others stop: what gets reported
        while any(p.is_alive() for p in procs):
            wait([p.sentinel for p in procs if p.is_alive()], timeout=0.2)
            drain()
            if deadline is None and any(p.exitcode not in (0, None) for p in procs):
                causes = [r for r, p in enumerate(procs) if p.exitcode not in (0, None)]
                deadline = time.monotonic() + grace_s
                for q in procs:
                    if q.is_alive():
                        q.terminate()
            if deadline is not None and time.monotonic() > deadline:
                for q in procs:
                    if q.is_alive():
                        q.kill()
        drain()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    reports = {r: (status, payload) for r, status, payload in failures}
    causes = causes or [r for r, (status, _) in sorted(reports.items()) if status != "stopped"]
    if causes:
        rank = min(causes, key=lambda r: (r in reports, r))  # a worker that died without a word comes first
        if rank not in reports or reports[rank][0] == "stopped":
            how = _describe_exit(procs[rank].exitcode)
            raise MapgenError(Diagnostic("error", "worker.died", f"worker rank {rank} {how}; the other {world - 1} "
                                         "worker(s) were stopped",
                                         hint="run the same command again (an output directory is renamed into "
                                         "place only when complete; a hidden .NAME.partial-* left by a killed run "
                                         "can be deleted)"))
        status, payload = reports[rank]
        if status == "mapgen":
            text, code = payload
            raise MapgenError(Diagnostic("error", "worker.failed", f"rank {rank}:\n{text}"), exit_code=code)
        raise RuntimeError(f"worker rank {rank} failed: {payload}")
    if len(outs) != world:
        raise MapgenError(Diagnostic("error", "worker.died", "workers were stopped before reporting: "
                                     + ", ".join(f"rank {r} {_describe_exit(p.exitcode)}"
                                                 for r, p in enumerate(procs) if r not in outs)))
    return [outs[r] for r in range(world)]


class parallel_context:
    """The runtime's SPMD entry: megatron's model-parallel state for ``par`` over the process group (created on
    first use), as :func:`mapgen.runtime.megatron.parallel` with ``keep_process_group``; yields this rank's
    :class:`~mapgen.runtime.engine.Coords`.

    Only megatron's model-parallel state is torn down after the block: the process group stays for the next
    layout (re-creating a default group on the same port in several processes is racy) and ends with the
    process. :func:`mapgen.runtime.megatron.parallel`, without ``keep_process_group``, also drops the group
    it created."""

    def __init__(self, par: Parallel) -> None:
        self.par = par
        self._stack = ExitStack()

    def __enter__(self) -> Coords:
        from mapgen.runtime.megatron import parallel

        par = self.par
        self._stack.enter_context(parallel(par.tp, par.ep, par.etp_size, par.pp, keep_process_group=True))
        return Coords.current()

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)


class progress_bar:
    """A tqdm bar on rank 0 when stderr is a terminal (or ``MAPGEN_PROGRESS=1``); otherwise silent.
    Called as ``bar(done, total)``."""

    def __init__(self, what: str, total: int, *, unit: str = "tensor") -> None:
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        wanted = os.environ.get("MAPGEN_PROGRESS", "1" if sys.stderr.isatty() else "0") == "1"
        self._bar: Any = None
        self._bytes = unit == "B"
        if rank0 and wanted:
            from tqdm import tqdm

            self._bar = tqdm(total=total or None, desc=what, unit=unit, leave=False, unit_scale=self._bytes,
                             unit_divisor=1024 if self._bytes else 1000)

    def __enter__(self) -> Callable[[int, int], None] | None:
        return self if self._bar is not None else None

    def __call__(self, done: int, total: int) -> None:
        if total and self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        if self._bytes or done == total or done % 64 == 0:
            self._bar.refresh()

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def _counted(stream: Iterator[tuple[str, torch.Tensor]], what: str) -> Iterator[tuple[str, torch.Tensor]]:
    bar = progress_bar(what, 0)
    with bar as tick:
        for i, item in enumerate(stream, 1):
            if tick is not None:
                tick(i, 0)
            yield item


def log(message: str) -> None:
    """Progress on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------
# HF -> Megatron
# ---------------------------------------------------------------------------------------------------------
def load_hf(source: HFSource, par: Parallel, *, bridge: Bridge | None = None,
            dtype: str = "auto") -> tuple[torch.nn.Module, Binding, Stats]:
    """Build this rank's Megatron model (in the source's dtypes, or ``dtype``) and fill it from ``source``.
    Call inside :class:`parallel_context`. ``stats.extra["dtypes"]`` is the :class:`DtypePlan` used."""
    binding = bind(source.layout, bridge)
    dtypes = plan_dtypes(binding, source.dtypes, dtype)
    # No random initialisation: load_model writes every parameter exactly once (or raises), and the
    # initialisation costs several times the load itself on CPU.
    model = build(binding, par, initialize=False, dtypes=dtypes)
    reader = source.reader(dtypes.params_dtype)
    try:
        with progress_bar("HF -> Megatron", len(binding.by_megatron)) as bar:
            stats = load_model(model, binding, reader, progress=bar)
    finally:
        reader.close()
    stats.extra["dtypes"] = dtypes
    return model, binding, stats


# ---------------------------------------------------------------------------------------------------------
# Megatron -> HF
# ---------------------------------------------------------------------------------------------------------
def _dtype_picker(layout: Layout, dtypes: Mapping[str, str],
                  force: str | None = None) -> Callable[[str, torch.Tensor], torch.dtype]:
    default = CONFIG_DTYPES.get(str(HFConfig(layout.config).get("torch_dtype", "dtype", default="float32")),
                                torch.float32)
    if force is not None:
        forced = DTYPE_NAMES[force]
        return lambda key, tensor: forced if tensor.is_floating_point() else tensor.dtype

    def pick(key: str, tensor: torch.Tensor) -> torch.dtype:
        if key in dtypes:
            return DTYPES[dtypes[key]]
        return tensor.dtype if tensor.dtype == torch.float32 and default == torch.float32 else default

    return pick


def stream_hf(models: list[torch.nn.Module] | torch.nn.Module, binding: Binding, *,
              target: Mapping[str, Any] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The in-memory streaming API: ``(hf_name, tensor)`` pairs in bounded memory, for refitting an
    inference engine (RL weight sync). Rank 0 yields; every rank must exhaust it."""
    target = target or {}
    weight_map = target.get("weight_map") or {}
    order = shard_order(weight_map) if weight_map else None
    return iter_hf_tensors(models, binding, order=order,
                           dtype_for=_dtype_picker(binding.layout, target.get("dtypes") or {},
                                                   target.get("force_dtype")))


def _requantizer(target: Mapping[str, Any], root: Path | None) -> tuple[Format, SafetensorsReader] | None:
    """For a target that asks for the source's quantization (``to_meta(quantized=True)``: block-scaled FP8 or
    MXFP4): the format and a reader of the source's scales."""
    block = target.get("quantize")
    if not block:
        return None
    if root is None:
        raise error("export.quantize-needs-quantized-source", "--quantize reuses the source's scales (FP8 tiles, MXFP4 "
                    "groups)", hint="pass --source with the quantized checkpoint")
    weight_map = target["weight_map"]
    fmt: Format = Mxfp4.from_keys(weight_map) if block == "mxfp4" else BlockFp8(
        (int(block[0]), int(block[1])), fp8_scales(weight_map))
    return fmt, SafetensorsReader(root, weight_map)


def written_config(layout: Layout, target: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of an exported checkpoint: the source's, less a ``quantization_config`` whose weights
    are written dequantized (block-scaled FP8 or MXFP4 without ``--quantize``)."""
    return dict(layout.config if target.get("quantize") else dequantized(layout).config)


def export_hf(models: list[torch.nn.Module] | torch.nn.Module, binding: Binding, out: Path, *,
              target: Mapping[str, Any] | None = None, source_root: Path | None = None, overwrite: bool = False,
              shard_bytes: int = DEFAULT_SHARD_BYTES) -> Stats:
    """Write a HF checkpoint. With ``target`` (the source's weight map, dtypes, shard metadata) the output
    reproduces the source's key names, dtypes and shard assignment; tower tensors are copied from
    ``source_root``. Atomic: written into a staging directory and renamed at the end."""
    start = time.perf_counter()
    coords = Coords.current()
    target = dict(target or {})
    layout = binding.layout
    towers = require_tower_source(layout, source_root) if coords.rank == 0 else set()  # rank 0 writes them
    stream = stream_hf(models, binding, target=target)
    fp8 = None
    if coords.rank == 0:
        stream = _counted(stream, "Megatron -> HF")
        fp8 = _requantizer(target, source_root)
        if fp8 is not None:
            stream = requantize(stream, *fp8)
    if coords.rank != 0:
        for _ in stream:
            pass
        return Stats()
    writer = ShardedWriter(out, overwrite=overwrite)
    stats = Stats()
    try:
        weight_map: dict[str, str] = dict(target.get("weight_map") or {})
        shard_meta: dict[str, dict[str, str]] = dict(target.get("shard_metadata") or {})
        if weight_map:
            _write_known_layout(stream, writer, weight_map, shard_meta, towers, source_root, stats)
        else:
            _write_budgeted(stream, writer, shard_bytes, stats)
        config_text = json.dumps(written_config(layout, target), indent=2, sort_keys=True) + "\n"
        writer.write_text("config.json", config_text)
        if source_root is not None:
            _copy_side_files(Path(source_root), writer.staging)
        writer.finish(index_metadata=target.get("index_metadata"), single_file=bool(target.get("single_file")))
    except BaseException:
        writer.abort()
        raise
    finally:
        if fp8 is not None:
            fp8[1].close()
    stats.seconds = time.perf_counter() - start
    return stats


def _write_known_layout(stream: Iterator[tuple[str, torch.Tensor]], writer: ShardedWriter,
                        weight_map: Mapping[str, str], shard_meta: Mapping[str, dict[str, str]], towers: set[str],
                        source_root: Path | None, stats: Stats) -> None:
    need: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        need.setdefault(shard, set()).add(key)
    pending: dict[str, dict[str, torch.Tensor]] = {s: {} for s in need}
    reader = SafetensorsReader(source_root, weight_map) if source_root is not None and towers else None
    done: set[str] = set()

    def flush_ready() -> None:
        for shard in list(pending):
            missing = need[shard] - set(pending[shard])
            if missing and reader is not None and missing <= towers:
                for key in sorted(missing):
                    pending[shard][key] = reader.read(key)
                missing = set()
            if not missing:
                writer.write_shard(shard, pending.pop(shard), shard_meta.get(shard))
                done.add(shard)

    for key, tensor in stream:
        found = weight_map.get(key)
        if found is None:
            raise error("export.unknown-key", "the bridge produced a key the target layout does not have", key=key)
        shard = found
        if key in pending.get(shard, {}) or shard in done:
            raise error("export.duplicate-key", "the bridge produced this key twice", key=key)
        pending[shard][key] = tensor
        stats.tensors += 1
        stats.bytes += tensor.numel() * tensor.element_size()
        if need[shard] <= set(pending[shard]) | towers:
            flush_ready()
    flush_ready()
    if pending:
        raise MapgenError([Diagnostic("error", "export.incomplete", f"{len(need[s] - set(p))} keys of {s} were never "
                                      "produced", key=sorted(need[s] - set(p))[0]) for s, p in pending.items()])
    if reader is not None:
        reader.close()


def _write_budgeted(stream: Iterator[tuple[str, torch.Tensor]], writer: ShardedWriter, shard_bytes: int,
                    stats: Stats) -> None:
    current: dict[str, torch.Tensor] = {}
    size = 0
    parts: list[dict[str, torch.Tensor]] = []
    names: list[str] = []

    def flush() -> None:
        nonlocal current, size
        if current:
            name = f"part-{len(names):05d}.safetensors"
            writer.write_shard(name, current, {"format": "pt"})
            names.append(name)
            current, size = {}, 0

    for key, tensor in stream:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[key] = tensor
        size += nbytes
        stats.tensors += 1
        stats.bytes += nbytes
    flush()
    del parts
    total = len(names)
    renames = {n: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, n in enumerate(names)}
    for old, new in renames.items():
        (writer.staging / old).rename(writer.staging / new)
    writer.weight_map = {k: renames[v] for k, v in writer.weight_map.items()}


_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "preprocessor_config.json")


def _copy_side_files(source_root: Path, staging: Path) -> None:
    for name in _SIDE_FILES:
        src = source_root / name
        if src.is_file() and not src.is_symlink():
            shutil.copyfile(src, staging / name)


# ---------------------------------------------------------------------------------------------------------
# Megatron distributed checkpoints
# ---------------------------------------------------------------------------------------------------------
def _stream_to_dist(model: torch.nn.Module, binding: Binding, source: HFSource, path: Path,
                    dtype: torch.dtype | None = None, *, fsync: bool = True) -> Stats:
    """Write this rank's part of the dist checkpoint of ``model`` (built on meta) straight from the HF
    slices, entry by entry (:func:`mapgen.runtime.megatron.save_dist_checkpoint_streaming`)."""
    from mapgen.runtime.engine import EntryProducer
    from mapgen.runtime.megatron import save_dist_checkpoint_streaming

    start = time.perf_counter()
    reader = source.reader(dtype)
    try:
        with progress_bar("HF -> Megatron", 0, unit="B") as bar:
            producer = EntryProducer(model, binding, reader, progress=bar)
            if bar is not None:  # bytes this rank writes, for the bar's total and rate
                from mapgen.runtime.megatron import planned_writes

                producer.total_bytes = sum(planned_writes(model).values())
            producer.check_duplicates()
            written = save_dist_checkpoint_streaming(model, path, producer, fsync=fsync)
    finally:
        reader.close()
    stats = producer.stats
    stats.bytes_read = reader.bytes_read
    stats.extra["bytes_written"] = written
    stats.seconds = time.perf_counter() - start
    return stats


def convert(source_path: str, out: Path, par: Parallel, *, overwrite: bool = False,
            config_check: dict[str, Any] | None = None, dtype: str = "auto", streaming: bool = True,
            allow_unproven_numerics: bool = False, fsync: bool = True) -> Stats:
    """HF checkpoint -> Megatron-Core distributed checkpoint (torch_dist), loadable by Megatron-LM:
    ``OUT/release/`` plus ``latest_checkpointed_iteration.txt``; ``OUT/mapgen.json`` records the layout and
    the dtypes (the source's by default, ``dtype`` to choose one), and ``config_check`` (the config catalog's
    verdicts, with any --assume-inert / --accept-semantic-gap). ``streaming`` (default): no Megatron model
    is materialised, each rank writes its shards entry by entry from the HF slices (memory: a few times the
    largest tensor); otherwise the model is loaded in memory and saved by megatron-core. A bridge without its
    numerical proof is refused unless ``allow_unproven_numerics`` (recorded in ``mapgen.json``). ``fsync``
    (default): every rank's data file is on disk before the checkpoint's metadata is written, as megatron-core's
    own writer does; ``fsync=False`` (streaming only) leaves the data to the kernel's writeback -- complete,
    but not durable against a crash of the machine until written back -- and ``mapgen.json`` says so."""
    from mapgen.runtime.megatron import save_dist_checkpoint

    source = HFSource.open(source_path)
    out = Path(out)
    world = world_from_env()
    bridge = bridge_for(source.layout)
    numerics = require_numerics(bridge, allow=allow_unproven_numerics, command="convert")
    binding = bind(source.layout, bridge)
    check_parallel(binding.spec, par, world)
    prepare_target(out, overwrite=overwrite, sources=[source.root])
    with parallel_context(par) as coords:
        log(f"mapgen convert: {source.root} -> {out} ({par.describe()}, world {world}"
            f"{', in memory' if not streaming else ''})")
        if streaming:
            dtypes = plan_dtypes(binding, source.dtypes, dtype)
            model = build(binding, par, device="meta", dtypes=dtypes)
        else:
            model, binding, stats = load_hf(source, par, bridge=bridge, dtype=dtype)
            dtypes = stats.extra["dtypes"]
        with staged_output(out, coords) as staging:
            if streaming:
                stats = _stream_to_dist(model, binding, source, staging / "release", dtypes.params_dtype, fsync=fsync)
            else:
                save_dist_checkpoint(model, staging / "release")
            if coords.rank == 0:
                (staging / "latest_checkpointed_iteration.txt").write_text("release\n")
                from mapgen.runtime.megatron_args import ARGS_FILE, ArgsError, megatron_args, to_text

                try:
                    argv: list[str] | None = megatron_args(
                        binding.spec, tp=par.tp, pp=par.pp, ep=par.ep, etp=par.etp_size, dtype=dtypes.base,
                        load=str(Path(out).resolve()))
                    args_text = to_text(argv or [])
                except ArgsError as exc:  # megatron-core builds it; Megatron-LM's command line cannot say so
                    argv, args_text = None, f"# no Megatron-LM arguments build this model: {exc}\n"
                (staging / ARGS_FILE).write_text(args_text)
                meta = {"mapgen_version": __version__, "layout": json.loads(layout_to_json(source.layout)),
                        "source": source.to_meta(), "parallel": par.__dict__, "dtype": dtypes.to_json(),
                        "megatron_args": argv, "numerics": numerics, "fsync": fsync or not streaming}
                if config_check is not None:
                    meta["config_check"] = config_check
                (staging / MAPGEN_META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    stats.extra["bytes_read_rank0"] = stats.bytes_read
    return stats


def _rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def dry_run_convert(source_path: str, par: Parallel, *, dtype: str = "auto") -> dict[str, Any]:
    """SPMD: what a streaming :func:`convert` of ``source_path`` would do on this rank, from the model on
    the meta device and the source's headers only -- nothing is read or written. Bytes this rank reads
    (the primitives run on meta tensors of the source's shapes) and writes (the main replicas megatron-core's
    sharded state dict assigns it), the largest entry, and a peak-memory estimate (this process now, with
    torch and megatron-core imported, plus the largest entry's read slices, itself, and two more entries
    as large as the largest: the writer works on one while the next is made)."""
    from mapgen.runtime.engine import EntryProducer
    from mapgen.runtime.megatron import planned_writes

    source = HFSource.open(source_path)
    binding = bind(source.layout)
    check_parallel(binding.spec, par, world_from_env())
    with parallel_context(par) as coords:
        dtypes = plan_dtypes(binding, source.dtypes, dtype)
        model = build(binding, par, device="meta", dtypes=dtypes)
        writes = planned_writes(model)
        reader = source.reader(dtypes.params_dtype)
        try:
            producer = EntryProducer(model, binding, reader)
            reads = {local: producer.measure(local) for local in writes}
        finally:
            reader.close()
        entry_bytes = {local: t.numel() * t.element_size() for local, t in producer.entries.items()}
        # in flight: the entry being written, the next one being made (its reads and itself), and the
        # writer's exact-storage view or a clone of a strided piece of the first
        worst = max(writes, key=lambda k: reads[k] + entry_bytes[k], default=None)
        largest = max((entry_bytes[k] for k in writes), default=0)
        peak = _rss_bytes() + (reads[worst] + entry_bytes[worst] + 2 * largest if worst else 0)
        _barrier()
    return {"rank": coords.rank, "read": sum(reads.values()), "write": sum(writes.values()), "entries": len(writes),
            "largest": max(entry_bytes.values(), default=0), "peak": peak, "dtypes": dtypes.to_json()}


def dry_run_export(ckpt: Path, par: Parallel, *, source_path: str | None = None) -> dict[str, Any]:
    """SPMD: what a streaming :func:`export_megatron` would do on this rank, from the TP=1 model on the meta
    device: the output shards it is dealt, the Megatron entries they need (read from the checkpoint) and the
    HF bytes it writes (about the same bytes in the recorded dtypes, without vocabulary padding). Peak: this
    process now plus twice the largest shard's entries (the entries, then the converted HF tensors)."""
    from mapgen.runtime.megatron import local_to_global

    ckpt = Path(ckpt)
    meta = read_megatron_meta(ckpt) if (ckpt / MAPGEN_META).is_file() else {}
    if source_path:
        source = HFSource.open(source_path)
        layout, weight_map = source.layout, source.model_weight_map
    else:
        meta = read_megatron_meta(ckpt)
        layout = layout_from_json(json.dumps(meta["layout"]))
        weight_map = dict((meta.get("source") or {}).get("weight_map") or {})
    dtypes = DtypePlan.from_json(meta.get("dtype"))
    binding = bind(layout)
    with parallel_context(Parallel()) as coords:
        model = build(binding, Parallel(), device="meta", dtypes=dtypes)
        size = {glob: t.numel() * t.element_size() for glob, t in
                ((local_to_global(model)[k], t) for k, t in model.state_dict().items() if isinstance(t, torch.Tensor))}
        producers: dict[str, set[str]] = {}
        for inst in binding.instances:
            for key in inst.hf:
                producers.setdefault(key, set()).add(inst.megatron)
        shards = list(dict.fromkeys(weight_map.values()))
        read, per_shard, mine = 0, [0], 0
        for n, shard in enumerate(shards):
            if n % coords.world != coords.rank:
                continue
            need = {m for k, s in weight_map.items() if s == shard for m in producers.get(k, ())}
            nbytes = sum(size.get(m, 0) for m in need)
            read += nbytes
            per_shard.append(nbytes)
            mine += 1
        peak = _rss_bytes() + 2 * max(per_shard)
        _barrier()
    return {"rank": coords.rank, "read": read, "write": read, "entries": mine, "largest": max(size.values(), default=0),
            "peak": peak, "dtypes": dtypes.to_json()}


def read_floor(root: Path, budget: int = 256 * 2**20) -> tuple[float, int]:
    """Plain ``read()`` throughput of up to ``budget`` bytes of the safetensors files under ``root`` (the page
    cache as it is now): ``(bytes per second, bytes read)``."""
    files = sorted(Path(root).glob("*.safetensors")) or sorted(Path(root).rglob("*.distcp"))
    done, start = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while done < budget:
                chunk = f.read(min(16 * 2**20, budget - done))
                if not chunk:
                    break
                done += len(chunk)
        if done >= budget:
            break
    seconds = max(time.perf_counter() - start, 1e-9)
    return done / seconds, done


def _shared_staging(out: Path, coords: Coords) -> Path:
    """One staging directory name agreed by all ranks."""
    name = [str(staging_dir(out))] if coords.rank == 0 else [""]
    if coords.world > 1:
        dist.broadcast_object_list(name, src=0)
    path = Path(name[0])
    if coords.rank == 0:
        path.mkdir(parents=True)
    _barrier()
    return path


@contextmanager
def staged_output(out: Path, coords: Coords) -> Iterator[Path]:
    """A staging directory every rank writes into, renamed to ``out`` by rank 0 once all ranks are done, and
    removed (by rank 0) if any rank's body raises: nothing half-written ever stands at ``out``."""
    staging = _shared_staging(out, coords)
    try:
        yield staging
        _barrier()
        if coords.rank == 0:
            commit_dir(staging, out)
    except BaseException:
        if coords.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    _barrier()


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def read_megatron_meta(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / MAPGEN_META
    if not path.is_file():
        raise error("megatron.no-metadata", f"{MAPGEN_META} is missing", file=str(path),
                    hint="this directory was not written by `mapgen convert`; pass --source with the HF checkpoint "
                    "it came from so mapgen knows the layout")
    from mapgen.source.base import read_json

    meta = read_json(path, display=str(path), what=MAPGEN_META)
    if not isinstance(meta, dict) or not isinstance(meta.get("layout"), dict):
        raise error("megatron.bad-metadata", f"{MAPGEN_META} has no layout object", file=str(path),
                    hint="pass --source with the HF checkpoint it came from")
    return meta


def copy_planner(spec: ModelSpec, entries: Mapping[str, torch.Tensor], local_of: Mapping[str, str],
                 producers: Mapping[str, list[Instance]], packed_counts: Mapping[str, set[int]],
                 dtype_for: Callable[[str, torch.Tensor], torch.dtype]) -> CopyPlanner | None:
    """The streaming export's planner of file-to-file copies (:mod:`mapgen.runtime.export_copy`); ``None``
    turns them off (every tensor is then read and written from memory: the same bytes)."""
    return CopyPlanner(spec, entries, local_of, producers, packed_counts, dtype_for)


def _export_streaming(binding: Binding, release: Path, out: Path, target: Mapping[str, Any], root: Path | None,
                      dtypes: DtypePlan, overwrite: bool, vocab_tp: int | None = None) -> Stats:
    """SPMD Megatron dist checkpoint -> HF without a model: the output shard files of ``target``'s weight map
    are dealt round-robin to the ranks; each rank reads, for one output shard at a time, just the Megatron
    entries that shard needs (:func:`mapgen.runtime.megatron.load_dist_entries`, resharded from any saved
    layout), converts them with the rules' ``save`` and writes the shard. Rank 0 writes the index, config and
    side files last and renames the directory into place."""
    from mapgen import ops
    from mapgen.runtime.megatron import _checkpoint_entries, load_dist_entries, local_to_global, locate_dist_entries

    start = time.perf_counter()
    coords = Coords.current()
    layout = binding.layout
    model = build(binding, Parallel(), device="meta", dtypes=dtypes, vocab_tp=vocab_tp)
    local_of: dict[str, str] = {}
    for local, glob in local_to_global(model).items():
        local_of.setdefault(glob, local)
    weight_map: dict[str, str] = dict(target["weight_map"])
    shard_meta: Mapping[str, dict[str, str]] = target.get("shard_metadata") or {}
    towers = require_tower_source(layout, root)
    producers: dict[str, list[Instance]] = {}
    for inst in binding.instances:
        for key in inst.hf:
            producers.setdefault(key, []).append(inst)
    packed_counts: dict[str, set[int]] = {}
    for inst in binding.instances:
        if inst.rule.experts and inst.rule.option("layout") == "packed" and inst.expert is not None:
            for key in inst.hf:
                packed_counts.setdefault(key, set()).add(inst.expert)
    dtype_for = _dtype_picker(layout, target.get("dtypes") or {}, target.get("force_dtype"))
    copied_bytes = 0
    shards = list(dict.fromkeys(weight_map.values()))
    staging = _shared_staging(out, coords)
    stats = Stats()
    written: dict[str, str] = {}
    sizes: dict[str, int] = {}
    src = SafetensorsReader(root, weight_map) if root is not None and towers else None
    fp8 = _requantizer(target, root)
    # HF tensors that are byte ranges of the checkpoint are copied file to file (not for a requantized export)
    planner = copy_planner(binding.spec, _checkpoint_entries(model), local_of, producers, packed_counts,
                           dtype_for) if fp8 is None else None
    try:
        with progress_bar("Megatron -> HF", len(shards), unit="shard") as bar:
            for n, shard in enumerate(shards):
                if n % coords.world != coords.rank:
                    continue
                keys = [k for k, s in weight_map.items() if s == shard]
                wanted = fp8[0].model_keys(keys) if fp8 is not None else keys  # MXFP4 X for X_blocks/_scales
                keyset = set(wanted)
                insts = list({id(i): i for k in wanted for i in producers.get(k, [])}.values())
                plan = planner.plan(insts, keyset) if planner is not None else {}
                copies = copied_tensors(plan, locate_dist_entries(model, release, {
                    p.local for planned in plan.values() for p in planned.pieces})) if plan else {}
                insts = [i for i in insts if any(k in keyset and k not in copies for k in i.hf)]
                loaded = load_dist_entries(model, release, {local_of[i.megatron] for i in insts})
                tensors: dict[str, torch.Tensor] = {}
                packed: dict[str, dict[int, torch.Tensor]] = {}
                for inst in insts:
                    for frag in ops.save(inst.rule, inst.hf, binding.spec, loaded[local_of[inst.megatron]],
                                         expert=inst.expert):
                        if frag.key not in keyset or frag.key in copies:
                            continue
                        if frag.index is not None:
                            packed.setdefault(frag.key, {})[frag.index] = frag.tensor
                        elif frag.key in tensors:
                            if inst.rule.option("shared") and not torch.equal(tensors[frag.key], frag.tensor):
                                raise error("export.shared-diverged", f"{frag.key} is one HF tensor for every MTP "
                                            "depth, but the Megatron copies differ between depths", key=inst.megatron,
                                            hint="tie them before exporting")
                        else:
                            tensors[frag.key] = frag.tensor
                del loaded
                for key, slots in packed.items():
                    if len(slots) != len(packed_counts.get(key, ())):
                        raise error("export.incomplete-packed", f"only {len(slots)} expert slots filled", key=key)
                    tensors[key] = torch.stack([slots[e] for e in range(len(slots))])
                tensors = {k: v.to(dtype_for(k, v)).contiguous() for k, v in tensors.items()}
                if fp8 is not None:
                    tensors = dict(requantize(tensors.items(), *fp8))
                for key in keys:
                    if key not in tensors and key not in copies:
                        if src is None or key not in towers:
                            raise error("export.incomplete", "no rule produces this key of the target layout",
                                        key=key)
                        span = src.locate(key) if planner is not None else None  # copied from the source file
                        if span is not None:
                            copies[key] = CopiedTensor(span.dtype, span.shape, ((span.path, span.offset, span.nbytes),))
                        else:
                            tensors[key] = src.read(key)
                out_tensors: dict[str, torch.Tensor | CopiedTensor] = {**tensors, **copies}
                write_safetensors(staging / shard, out_tensors, shard_meta.get(shard))
                for key, value in out_tensors.items():
                    written[key] = shard
                    sizes[key] = value.nbytes
                stats.tensors += len(out_tensors)
                stats.bytes += sum(v.nbytes for v in out_tensors.values())
                copied_bytes += sum(v.nbytes for v in copies.values())
                del tensors, out_tensors
                if bar is not None:
                    bar(n + 1, len(shards))
        maps: list[Any] = [(written, sizes)]
        if coords.world > 1:
            maps = [None] * coords.world
            dist.all_gather_object(maps, (written, sizes))
        if coords.rank == 0:
            all_written = {k: v for w, _ in maps for k, v in w.items()}
            missing = sorted(set(weight_map) - set(all_written))
            if missing:
                raise error("export.incomplete", f"{len(missing)} keys were never written", key=missing[0])
            total = sum(n for _, sz in maps for n in sz.values())
            if not target.get("single_file"):
                meta = dict(target.get("index_metadata") or {})
                meta["total_size"] = total
                index = {"metadata": meta, "weight_map": dict(sorted(all_written.items()))}
                (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            (staging / "config.json").write_text(json.dumps(written_config(layout, target), indent=2,
                                                            sort_keys=True) + "\n")
            if root is not None:
                _copy_side_files(Path(root), staging)
        _barrier()
        if coords.rank == 0:
            if Path(out).exists() and not overwrite:
                raise error("output.exists", "the output directory appeared meanwhile", file=str(out))
            commit_dir(staging, Path(out))
    except BaseException:
        if coords.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        for reader in (src, fp8[1] if fp8 is not None else None):
            if reader is not None:
                reader.close()
    _barrier()
    stats.seconds = time.perf_counter() - start
    stats.extra["bytes_copied"] = copied_bytes
    return stats


def export_megatron(ckpt: Path, out: Path, par: Parallel, *, source_path: str | None = None,
                    overwrite: bool = False, dtype: str = "auto", streaming: bool = True,
                    quantize: bool = False, allow_unproven_numerics: bool = False) -> Stats:
    """Megatron distributed checkpoint (any parallel layout; resharded by dist_checkpointing) -> HF.
    ``streaming`` (default, when the source's shard layout is known): no model, each rank writes its share of
    the output shards (:func:`_export_streaming`); otherwise the model is loaded and gathered to rank 0.
    The model is built in the dtypes ``mapgen.json`` records (fp32 without one: exact for any float
    checkpoint); HF tensors are written in the source's dtypes, or all floating ones in ``dtype``.
    ``quantize``: block-scaled FP8 weights and MXFP4 experts are written as the source stores them (its tiles
    and scales, its blocks and scales). A
    bridge without its numerical proof is refused unless ``allow_unproven_numerics`` or the checkpoint's
    ``mapgen.json`` records that its conversion was allowed."""
    from mapgen.runtime._safeload import check_dist_checkpoint
    from mapgen.runtime.megatron import load_dist_checkpoint

    ckpt = Path(ckpt)
    source = HFSource.open(source_path) if source_path else None
    if quantize and (source is None or source.quant is None):
        raise error("export.quantize-needs-quantized-source",
                    "--quantize writes weights in the source's quantized format (block-scaled FP8, MXFP4)" + (
                        ", but the source is not quantized" if source is not None else
                        ": pass --source with that checkpoint (its scales are reused)"),
                    file=str(source_path or ckpt),
                    expected="a source with quantization_config.quant_method 'fp8' or 'mxfp4'")
    if source is not None:
        layout, target, root = source.layout, source.to_meta(quantized=quantize), source.root
    else:
        meta = read_megatron_meta(ckpt)
        layout = layout_from_json(json.dumps(meta["layout"]))
        target, root = meta.get("source") or {}, None
    recorded = read_megatron_meta(ckpt) if (ckpt / MAPGEN_META).is_file() else {}
    dtypes = DtypePlan.from_json(recorded.get("dtype"))
    if dtype != "auto":
        if dtype not in DTYPE_NAMES:
            raise error("cli.dtype", f"unknown dtype {dtype!r}", expected=", ".join(DTYPE_CHOICES))
        target = dict(target)
        target["dtypes"] = {}
        target["force_dtype"] = dtype
    accepted = bool((recorded.get("numerics") or {}).get("allow_unproven_numerics"))
    bridge = bridge_for(layout)
    require_numerics(bridge, allow=allow_unproven_numerics or accepted, command="export")
    prepare_target(out, overwrite=overwrite, sources=[ckpt] + ([source.root] if source else []))
    binding = bind(layout, bridge)
    check_parallel(binding.spec, par, world_from_env())
    release = ckpt / "release" if (ckpt / "release").is_dir() else ckpt
    # the vocabulary padding the checkpoint was written with (Megatron-LM's: a multiple of 128 * TP), so that a
    # vocabulary of 128 * odd rows written at TP=2 loads at TP=1
    saved = recorded.get("parallel")
    vocab_tp = int(saved["tp"]) if isinstance(saved, dict) and isinstance(saved.get("tp"), int) else None
    if streaming and target.get("weight_map"):
        check_dist_checkpoint(release)  # megatron/torch unpickle .metadata and common.pt: data types only
        with parallel_context(Parallel()):  # every rank sees the whole (TP=1) model on meta; DP = the world
            log(f"mapgen export: {ckpt} -> {out} (streaming, {world_from_env()} rank(s))")
            return _export_streaming(binding, release, Path(out), target, root, dtypes, overwrite, vocab_tp)
    with parallel_context(par):
        log(f"mapgen export: {ckpt} -> {out} ({par.describe()}, in memory)")
        # every tensor comes from the checkpoint (strict load)
        model = build(binding, par, initialize=False, dtypes=dtypes, vocab_tp=vocab_tp)
        check_dist_checkpoint(release)  # megatron/torch unpickle .metadata and common.pt: data types only
        load_dist_checkpoint(model, release)
        stats = export_hf(model, binding, Path(out), target=target, source_root=root, overwrite=overwrite)
        _barrier()
    return stats


# ---------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------
@dataclass
class RoundTrip:
    keys: int
    mismatches: list[str]

    @property
    def ok(self) -> bool:
        return not self.mismatches


def compare_checkpoints(a: Path, b: Path) -> RoundTrip:
    """Same key set, dtypes, tensors (bitwise) and shard assignment."""
    wa, _ = read_weight_map(a)
    wb, _ = read_weight_map(b)
    problems = []
    for key in sorted(set(wa) ^ set(wb)):
        problems.append(f"{key}: only in {'source' if key in wa else 'export'}")
    ra, rb = SafetensorsReader(a, wa), SafetensorsReader(b, wb)
    for key in sorted(set(wa) & set(wb)):
        if wa[key] != wb[key]:
            problems.append(f"{key}: shard {wa[key]} vs {wb[key]}")
        ta, tb = ra.read(key), rb.read(key)
        if ta.dtype != tb.dtype:
            problems.append(f"{key}: dtype {ta.dtype} vs {tb.dtype}")
        elif ta.shape != tb.shape:
            problems.append(f"{key}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
        elif not torch.equal(ta, tb):
            problems.append(f"{key}: values differ (max abs {float((ta.float() - tb.float()).abs().max()):.3g})")
    return RoundTrip(len(wa), problems)
