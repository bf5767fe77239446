"""Megatron-Bridge's own adapter checkpoints: megatron-core torch_dist checkpoints holding only the adapters.

Megatron-Bridge saves a PEFT run like any training run (``training/checkpointing.py``): ``<save>/iter_<7
digits>/`` (or ``release/``) is a torch_dist checkpoint of ``{"model": model.sharded_state_dict(), ...}`` filtered
by ``apply_peft_adapter_filter_to_state_dict`` to the keys ``PEFT.adapter_key_filter`` accepts (``.adapter.`` in
the key), with ``run_config.yaml`` (the run's config, its ``peft`` section: ``dim``, ``alpha``, ``dropout``,
``target_modules``) beside it. Each adapter tensor is a ShardedTensor at the key of its base weight with
``weight`` replaced by ``adapter.linear_in.weight`` / ``adapter.linear_out.weight``, the same leading (layer,
expert) axes as the base weight, and ``ParallelLinearAdapter``'s TP layout: ``linear_in`` split on its rows
(column-parallel base) or columns (row-parallel base), ``linear_out`` on its rows, ``linear_fc1``'s
``linear_out`` through megatron-core's ``apply_swiglu_sharded_factory``; a replicated base (router) replicated.

Here the ShardedTensors are *derived* from the ones megatron-core plans for the base weights
(``model.sharded_state_dict()`` on the meta device, factories applied): key, leading axes and replica id come
from there, so the keys are whatever megatron-core 0.16.1 names the base (per-layer keys, expert axes), and
megatron-core's ``dist_checkpointing.save`` / ``load`` write and read them (load reshards: the export reads at
TP=EP=PP=1 whatever layout was saved). ``mapgen_adapter.json`` (mapgen's side file: per module form, alpha,
components, the PEFT config) makes the round trip exact; without it (a checkpoint trained in Megatron-Bridge)
the ``peft`` section of ``run_config.yaml`` gives one alpha for all modules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch

from mapgen import ops
from mapgen.errors import error
from mapgen.lora.plan import IN, OUT, MegatronAdapter, adaptable, gather_pieces, module_of
from mapgen.runtime.api import HFSource, Parallel, bind
from mapgen.runtime.engine import Binding

SIDE_NAME = "mapgen_adapter.json"
RUN_CONFIG = "run_config.yaml"
TRACKER = "latest_checkpointed_iteration.txt"
FORMAT = "mapgen-megatron-bridge-lora"
_LINEAR = 2  # [out, in]: the weights an adapter sits on
_GROUP = re.compile(r"\.\d+\.")
LORA_TARGET = "megatron.bridge.peft.lora.LoRA"


# -- the layout ---------------------------------------------------------------------------------------------
def checkpoint_dir(path: Path) -> Path | None:
    """The torch_dist directory of a Megatron-Bridge adapter checkpoint at ``path``: ``path`` itself (it holds
    ``metadata.json``), or the iteration the tracker names (``release`` or a number), or the newest ``iter_*``."""
    root = Path(path)
    if (root / "metadata.json").is_file():
        return root
    tracker = root / TRACKER
    if tracker.is_file():
        text = tracker.read_text(encoding="utf-8").strip()
        sub = root / ("release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else text)
        return sub if (sub / "metadata.json").is_file() else None
    if (root / "release" / "metadata.json").is_file():
        return root / "release"
    iters = sorted(p for p in root.glob("iter_*") if (p / "metadata.json").is_file())
    return iters[-1] if iters else None


def is_bridge_checkpoint(path: Path) -> bool:
    return checkpoint_dir(path) is not None


# -- ShardedTensors derived from the base weights' ---------------------------------------------------------
class BaseShard(NamedTuple):
    """The ShardedTensor megatron-core plans for a base weight and, where its factory splits the weight into
    named parts (``GatedDeltaNet.in_proj``: ``weight.query`` / ``.key`` / ...), each part's name and local rows."""

    st: Any
    split: tuple[tuple[str, int], ...]

    @property
    def prefix(self) -> str:
        """The module's key prefix (``...linear_qkv.``): the adapter's keys follow it."""
        key = str(self.st.key)
        at = key.rfind("weight")
        if at < 0:
            raise error("adapter.bad-key", f"the base ShardedTensor key {key!r} has no 'weight'", key=key)
        return key[:at]


def _base_shards(model: torch.nn.Module) -> dict[str, BaseShard]:
    """Local weight name -> the ShardedTensors megatron-core plans for it (factories applied)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from mapgen.runtime.megatron import _checkpoint_entries, cpu_shims

    with cpu_shims():  # the MTP stage ties its embedding copy over the DP x CP group (megatron-core asks for it)
        group = ps.get_data_parallel_group(with_context_parallel=True)
        sd = cast(Any, model).sharded_state_dict(metadata={"dp_cp_group": group})
        apply_factories(sd)
    by_storage = {t.untyped_storage()._cdata: local for local, t in _checkpoint_entries(model).items()}
    parts: dict[str, list[Any]] = {}
    for v in nested_values(sd):
        if isinstance(v, ShardedTensor):
            local = by_storage.get(v.data.untyped_storage()._cdata)
            if local is not None:
                parts.setdefault(local, []).append(v)
    out = {}
    for local, sts in parts.items():
        first = sts[0]
        split: tuple[tuple[str, int], ...] = ()
        if len({st.key for st in sts}) > 1:  # named parts (a split factory), in the base's row order
            pre = int(first.prepend_axis_num)
            split = tuple((str(st.key).rsplit(".", 1)[1], int(st.local_shape[pre])) for st in sts)
        out[local] = BaseShard(first, split)
    return out


def _adapter_shards(module: str, base: BaseShard, lin: torch.Tensor, lout: torch.Tensor,
                    tp: tuple[int, int, int] | None) -> dict[str, Any]:
    """The two ShardedTensors (or factories) of one adapter on this rank, keyed by the module's Megatron name
    (stacked layers share one ShardedTensor key)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.ssm.gated_delta_net import _split_tensor_factory
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    st = base.st
    pre = int(st.prepend_axis_num)
    offsets = tuple((i, int(st.global_offset[i]), int(st.axis_fragmentations[i])) for i in range(pre))
    prefix = base.prefix
    kin, kout = prefix + IN, prefix + OUT
    # tp = (the base's shard dim, rank, size); linear_in: rows (column base) / columns (row base), linear_out:
    # rows (ColumnParallelLinear in both); None: one piece (TP=1, or a replicated base such as the router)
    tp_in = () if tp is None else ((pre + tp[0], tp[1], tp[2]),)
    tp_out = () if tp is None else ((pre, tp[1], tp[2]),)
    st_in = ShardedTensor.from_rank_offsets(kin, lin, *offsets, *tp_in, replica_id=st.replica_id,
                                            prepend_axis_num=pre)
    st_out: Any = ShardedTensor.from_rank_offsets(kout, lout, *offsets, *tp_out, replica_id=st.replica_id,
                                                  prepend_axis_num=pre)
    if prefix.endswith("linear_fc1."):  # ParallelLinearAdapter.sharded_state_dict: "linear_fc1" in the base name
        st_out = apply_swiglu_sharded_factory(st_out, offsets)
    elif base.split:  # linear_out's rows split into the same named parts as the base weight's rows
        st_out = _split_tensor_factory(st_out, [n for _, n in base.split], [name for name, _ in base.split], pre)
    return {f"{module}.{IN}": st_in, f"{module}.{OUT}": st_out}


def _local_adapters(model: torch.nn.Module,
                    binding: Binding) -> list[tuple[str, Any, BaseShard, int | None, tuple[int, ...]]]:
    """``(module, instance, base ShardedTensor, shard dim, local weight shape)`` of every adaptable linear
    weight on this rank."""
    from mapgen.runtime.engine import _local_instances, _local_params

    shards = _base_shards(model)
    params = _local_params(model)
    out = []
    for local, inst in sorted(_local_instances(params, model, binding).items()):
        if adaptable(inst) and local in shards and params[local].dim() == _LINEAR:
            out.append((module_of(inst.megatron), inst, shards[local], ops.shard_dim(inst.rule),
                        tuple(params[local].shape)))
    return out


def _check_placed(meg: MegatronAdapter, done: set[str], world: int) -> None:
    """Every adapter lands in some rank's sharded state dict: none is dropped silently."""
    held: list[Any] = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(held, sorted(done))
    else:
        held = [sorted(done)]
    lost = sorted(set(meg.modules) - {m for h in held for m in h})
    if lost:
        raise error("adapter.unknown-module", f"{len(lost)} adapters have no base ShardedTensor in megatron-core's "
                    "plan of this model", key=lost[0], hint="use --format mapgen for this adapter")


# -- writing (SPMD: every rank of the layout calls it) -----------------------------------------------------------
def save_bridge(meg: MegatronAdapter, source_path: str, path: str, par: Parallel) -> int:
    """Write ``meg`` as a torch_dist checkpoint in ``path`` (``release/`` + tracker + ``run_config.yaml`` +
    side file; rank 0 writes the small files). Returns the number of adapters this rank saved."""
    from mapgen.runtime._cpu import import_megatron

    import_megatron()
    from megatron.core import dist_checkpointing

    from mapgen.runtime.api import build, parallel_context, staged_output
    from mapgen.runtime.hfio import prepare_target
    from mapgen.runtime.megatron import cpu_shims

    source = HFSource.open(source_path)
    binding = bind(source.layout)
    for module, each in meg.modules.items():
        if each.grouped or each.canonical:
            raise error("adapter.unsupported-option", f"{module}: grouped and canonical adapters are not written "
                        "in Megatron-Bridge's torch_dist layout yet", key=module,
                        hint="use --format mapgen for this adapter")
    out = Path(path)
    prepare_target(out, overwrite=False, sources=[source.root])
    with parallel_context(par) as coords:
        model = build(binding, par, device="meta")
        state: dict[str, Any] = {}
        done = set()
        stored = stored_dims(meg)
        for module, inst, base, dim, _ in _local_adapters(model, binding):
            lora = meg.modules.get(module)
            if lora is None:
                continue
            op = ops.OPS[inst.rule.op]
            ctx = op.context(inst.rule, inst.hf, binding.spec, inst.expert)
            shard = coords.shard(inst.rule)
            pad = stored[module] - lora.dim  # zero rows of A / columns of B: B @ A unchanged, exact
            lin = torch.cat([lora.linear_in, lora.linear_in.new_zeros((pad, lora.linear_in.shape[1]))])
            lout = torch.cat([lora.linear_out, lora.linear_out.new_zeros((lora.linear_out.shape[0], pad))], dim=1)
            lin, lout = op.adapter_split(ctx, lin, lout, shard)
            state.update(_adapter_shards(module, base, lin.contiguous(), lout.contiguous(),
                                         (dim, shard.rank, shard.size) if shard.size > 1 and dim is not None
                                         else None))
            done.add(module)
        _check_placed(meg, done, coords.world)
        with staged_output(out, coords) as staging:
            (staging / "release").mkdir(parents=True, exist_ok=True)
            with cpu_shims():
                dist_checkpointing.save({"model": state, "checkpoint_version": 3.0, "iteration": 0},
                                        str(staging / "release"))
            if coords.rank == 0:
                _write_side_files(staging, meg, source, par)
    return len(done)


def stored_dims(meg: MegatronAdapter) -> dict[str, int]:
    """The rank each module is stored at: the largest of the modules that differ only in layer or expert
    index. megatron-core stacks homogeneous layers (and experts) under one key with a leading axis, so they
    share one shape; Megatron-Bridge's LoRA has one ``dim`` everywhere, mapgen's block form and PEFT's
    ``rank_pattern`` need not. Smaller adapters are padded with zero rows of ``linear_in`` and zero columns of
    ``linear_out`` (exact) and sliced back on reading (the side file keeps each module's true ``dim``)."""
    groups: dict[str, int] = {}
    for module, lora in meg.modules.items():
        g = _GROUP.sub(".*.", module)
        groups[g] = max(groups.get(g, 0), lora.dim)
    return {m: groups[_GROUP.sub(".*.", m)] for m in meg.modules}


def run_config(meg: MegatronAdapter) -> dict[str, Any]:
    """The ``peft`` section Megatron-Bridge writes in ``run_config.yaml`` (``LoRA`` dataclass fields)."""
    peft_cfg = meg.meta.get("peft_config") or {}
    stored = stored_dims(meg)
    dims = sorted(set(stored.values()))
    alphas = sorted({lora.alpha / lora.dim * stored[m] for m, lora in meg.modules.items()})
    return {"peft": {"_target_": LORA_TARGET,
                     "target_modules": sorted({m.rsplit(".", 1)[-1] for m in meg.modules}),
                     "dim": dims[0] if len(dims) == 1 else dims,
                     "alpha": alphas[0] if len(alphas) == 1 else alphas,
                     "dropout": float(peft_cfg.get("lora_dropout", meg.meta.get("dropout", 0.0)) or 0.0)}}


def _write_side_files(root: Path, meg: MegatronAdapter, source: HFSource, par: Parallel) -> None:
    import yaml

    from mapgen.runtime.adapters import fingerprint_of

    (root / TRACKER).write_text("release\n", encoding="utf-8")
    (root / "release" / RUN_CONFIG).write_text(yaml.safe_dump(run_config(meg), sort_keys=True), encoding="utf-8")
    side = {"format": FORMAT, "version": 1, "base_fingerprint": fingerprint_of(source),
            "parallel": {"tp": par.tp, "ep": par.ep, "etp": par.etp_size, "pp": par.pp},
            "peft_config": meg.meta.get("peft_config") or {},
            "modules": {m: lora.meta() for m, lora in sorted(meg.modules.items())}}
    (root / "release" / SIDE_NAME).write_text(json.dumps(side, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -- reading (one process, TP=EP=PP=1: dist_checkpointing reshards) ------------------------------------------------
def _meta(ckpt: Path, found: Mapping[str, int], source: HFSource) -> dict[str, Any]:
    """Per-module metadata: mapgen's side file, else ``run_config.yaml``'s ``peft`` section (one alpha)."""
    from mapgen.runtime.adapters import fingerprint_of

    side = ckpt / SIDE_NAME
    if side.is_file():
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise error("adapter.invalid-meta", f"cannot read {SIDE_NAME}: {exc}", file=str(side)) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise error("adapter.invalid-meta", f"not a {FORMAT} side file", file=str(side))
        fp = fingerprint_of(source)
        if meta.get("base_fingerprint") not in (None, fp):
            raise error("adapter.wrong-base", f"the adapter was made for layout {meta.get('base_fingerprint')}, "
                        f"the base is {fp}", file=str(side), hint="pass the base model the adapter was trained on")
        missing = sorted(set(meta.get("modules", {})) ^ set(found))
        if missing:
            raise error("adapter.invalid-meta", f"{SIDE_NAME} and the checkpoint disagree on the adapted modules",
                        file=str(side), key=", ".join(missing[:4]))
        return meta
    cfg_path = ckpt / RUN_CONFIG
    if not cfg_path.is_file():
        raise error("adapter.missing-config", f"neither {SIDE_NAME} nor {RUN_CONFIG} is in the checkpoint",
                    file=str(ckpt), hint="Megatron-Bridge writes run_config.yaml beside each checkpoint: copy it")
    import yaml

    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise error("adapter.invalid-config", f"not valid YAML: {str(exc)[:160]}", file=str(cfg_path)) from None
    peft_cfg = cfg.get("peft") if isinstance(cfg, dict) else None
    if not isinstance(peft_cfg, dict) or "alpha" not in peft_cfg:
        raise error("adapter.invalid-config", "no peft section with alpha", file=str(cfg_path),
                    expected="peft: {_target_: megatron.bridge.peft.lora.LoRA, dim, alpha, dropout, target_modules}")
    target = str(peft_cfg.get("_target_", LORA_TARGET))
    if not target.endswith(".LoRA"):
        raise error("adapter.unsupported-type", f"peft._target_ is {target}: only LoRA is converted",
                    file=str(cfg_path))
    alpha = float(peft_cfg["alpha"])
    return {"dropout": float(peft_cfg.get("dropout", 0.0) or 0.0),
            "peft_config": {"peft_type": "LORA", "lora_dropout": float(peft_cfg.get("dropout", 0.0) or 0.0)},
            "modules": {m: {"dim": d, "alpha": alpha, "form": "shared", "grouped": False, "components": []}
                        for m, d in found.items()}}


def _load_plan(model: torch.nn.Module, binding: Binding, saved: Mapping[str, Any],
               ckpt: Path) -> tuple[dict[str, Any], dict[str, tuple[str, str, list[str]]], dict[str, int]]:
    """The sharded state dict that reads every saved adapter at TP=EP=PP=1 (its rank from the saved global
    shape), where each module's pieces go (``gather_pieces`` files), and each module's stored rank."""
    state: dict[str, Any] = {}
    where: dict[str, tuple[str, str, list[str]]] = {}
    dims: dict[str, int] = {}
    for module, inst, base, _dim, shape in _local_adapters(model, binding):
        prefix = base.prefix
        kin = prefix + IN
        kouts = [prefix + OUT + (f".{name}" if name else "") for name, _ in base.split or (("", 0),)]
        if kin not in saved and not any(k in saved for k in kouts):
            continue
        if kin not in saved or not all(k in saved for k in kouts):
            raise error("adapter.missing-weights", f"only some of {IN} / {OUT} are saved", file=str(ckpt),
                        key=kin)
        pre = int(base.st.prepend_axis_num)
        gin = tuple(saved[kin].global_shape)
        out_f, in_f = shape
        r = gin[pre]
        gout = tuple(saved[kouts[0]].global_shape) if not base.split else (out_f, r)
        if gin[pre + 1:] != (in_f,) or gout[-2:] != (out_f, r):
            raise error("adapter.shape-mismatch", f"linear_in {gin} / linear_out {gout} do not fit the base "
                        f"weight [{out_f}, {in_f}] with rank {r}", file=str(ckpt), key=prefix.rstrip("."),
                        hint="the adapter was trained on another base model")
        state.update(_adapter_shards(module, base, torch.empty(r, in_f), torch.empty(out_f, r), None))
        where[module] = ("pp0/tp0" if inst.expert is None else "pp0/ep0_etp0", kin, kouts)
        dims[module] = r
    known = {k for _, kin, kouts in where.values() for k in (kin, *kouts)}
    unknown = sorted(k for k in saved if k not in known)
    if unknown:
        raise error("adapter.unknown-module", f"{len(unknown)} saved tensors match no adaptable weight of the "
                    f"base (first: {unknown[0]})", file=str(ckpt), key=unknown[0],
                    hint="is the adapter for another base model? (grouped and canonical adapters are not read "
                    "from this layout yet)")
    return state, where, dims


def load_bridge(path: str, source_path: str) -> MegatronAdapter:
    """Read a Megatron-Bridge adapter checkpoint at TP=EP=PP=1 (SPMD with one rank)."""
    from mapgen.runtime._cpu import import_megatron

    import_megatron()
    from megatron.core import dist_checkpointing

    from mapgen.runtime.api import build, parallel_context
    from mapgen.runtime.megatron import cpu_shims

    ckpt = checkpoint_dir(Path(path))
    if ckpt is None:
        raise error("adapter.not-found", "no torch_dist checkpoint (metadata.json) here", file=str(path))
    from mapgen.runtime._safeload import check_dist_checkpoint

    check_dist_checkpoint(ckpt)
    source = HFSource.open(source_path)
    binding = bind(source.layout)
    par = Parallel(tp=1, ep=1, pp=1)
    with parallel_context(par), cpu_shims():
        saved = dist_checkpointing.load_tensors_metadata(str(ckpt))
        model = build(binding, par, device="meta")
        state, where, dims = _load_plan(model, binding, saved, ckpt)
        loaded = dist_checkpointing.load({"model": state}, str(ckpt))["model"]
    meta = _meta(ckpt, dims, source)
    files: dict[str, dict[str, torch.Tensor]] = {}
    for module, (file, _, _) in where.items():
        files.setdefault(file, {})[f"{module}.{IN}"] = loaded[f"{module}.{IN}"]
        files[file][f"{module}.{OUT}"] = loaded[f"{module}.{OUT}"]
    out = gather_pieces(files, meta, binding.instances, binding.spec)
    for module, lora in out.modules.items():
        dim = int(meta["modules"][module]["dim"])
        if lora.dim > dim:  # stored padded (stored_dims): the padding must be zeros
            if lora.linear_in[dim:].any() or lora.linear_out[:, dim:].any():
                raise error("adapter.invalid-meta", f"{module}: {SIDE_NAME} gives rank {dim}, the checkpoint holds "
                            f"{lora.dim} with non-zero rows beyond it", file=str(ckpt), key=module)
            lora.linear_in, lora.linear_out = lora.linear_in[:dim].contiguous(), lora.linear_out[:, :dim].contiguous()
    return out


__all__ = ["checkpoint_dir", "is_bridge_checkpoint", "load_bridge", "run_config", "save_bridge"]
