"""LoRA adapters at run time: read PEFT / Megatron adapter directories, lay them out, merge, and prove them.

The mapping itself is :mod:`mapgen.lora.plan` (pure). Here: reading (safetensors only, never a pickle), the
bytes of the trees the CLI writes, the merged HF checkpoint in the base's exact layout, and the proof
(:func:`verify_adapter`): transformers + peft logits, the merged HF checkpoint's logits in transformers, and
megatron-core's logits with the adapter merged rank by rank from its TP/EP pieces (Megatron-Bridge's
``LoRAMerge``), plus the HF -> Megatron -> HF adapter round trip, bitwise.

Megatron adapter directory (``mapgen adapter import``): ``adapter_meta.json`` (format, parallel layout, base
fingerprint, per module: dim, alpha, form, components, grouped; dropout, target modules, the PEFT config) and
one safetensors file per piece, ``pp<P>/tp<T>.safetensors`` (dense modules, this TP rank's pieces) and
``pp<P>/ep<E>_etp<T>.safetensors`` (expert modules), keyed by Megatron-Bridge's names in the global
namespace, ``<module>.adapter.linear_in.weight`` / ``<module>.adapter.linear_out.weight``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from mapgen.errors import Diagnostic, MapgenError, error
from mapgen.lora import peft as peft_fmt
from mapgen.lora.hf_names import ModelView, view_for
from mapgen.lora.peft import PeftAdapter
from mapgen.lora.plan import (
    IN,
    OUT,
    MegatronAdapter,
    MegatronLora,
    adaptable,
    export_adapter,
    gather_pieces,
    grouped_name,
    import_adapter,
    merged,
    module_of,
    shard_pieces,
)
from mapgen.runtime.api import HFSource, Parallel, bind, check_parallel
from mapgen.runtime.engine import Binding

META_NAME = "adapter_meta.json"
FORMAT = "mapgen-megatron-lora"


# -- reading ------------------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:
        raise error("adapter.unreadable", f"cannot read safetensors: {type(exc).__name__}: {str(exc)[:160]}",
                    file=str(path)) from None


def is_megatron_adapter(path: Path) -> bool:
    return (Path(path) / META_NAME).is_file()


def hf_view(binding: Binding) -> tuple[ModelView, int | None]:
    """How PEFT names this base's modules (:mod:`mapgen.lora.hf_names`) and its routed-expert count."""
    experts = binding.spec.num_moe_experts
    return view_for(binding.layout.model_type), int(experts) if experts else None


def read_peft(path: Path | str, binding: Binding) -> PeftAdapter:
    root = Path(path)
    if not root.is_dir():
        raise error("adapter.not-found", f"{root} is not a directory", file=str(root),
                    expected="a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)")
    cfg = root / peft_fmt.CONFIG_NAME
    if not cfg.is_file():
        raise error("adapter.missing-config", f"{peft_fmt.CONFIG_NAME} is missing", file=str(root),
                    expected="a PEFT adapter directory written by save_pretrained",
                    hint="the adapter's rank, alpha and targets live there; copy it from where the adapter was saved")
    weights = root / peft_fmt.WEIGHTS_NAME
    if not weights.is_file():
        pickled = (root / "adapter_model.bin").is_file()
        raise error("adapter.missing-weights", f"{peft_fmt.WEIGHTS_NAME} is missing"
                    + (" (adapter_model.bin is a pickle: mapgen never unpickles)" if pickled else ""),
                    file=str(root), hint="save the adapter with safe_serialization=True")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise error("adapter.invalid-config", f"not valid JSON: {exc}", file=str(cfg)) from None
    if not isinstance(config, dict):
        raise error("adapter.invalid-config", "not a JSON object", file=str(cfg))
    view, experts = hf_view(binding)
    return peft_fmt.parse(config, _read_safetensors(weights), where=str(root), view=view, num_experts=experts)


def open_base(base: Path | str) -> tuple[HFSource, Binding, dict[str, tuple[int, ...]]]:
    from mapgen.runtime.hfio import SafetensorsReader

    source = HFSource.open(base)
    binding = bind(source.layout)
    reader = SafetensorsReader(source.root, source.weight_map)
    try:
        shapes = {k: tuple(reader.shape(k)) for k in source.weight_map}
    finally:
        reader.close()
    return source, binding, shapes


def fingerprint_of(source: HFSource) -> str:
    from mapgen.contract.fingerprint import fingerprint

    return fingerprint(source.layout)


def read_megatron(path: Path | str, binding: Binding, source: HFSource) -> MegatronAdapter:
    root = Path(path)
    try:
        meta = json.loads((root / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise error("adapter.invalid-meta", f"cannot read {META_NAME}: {exc}", file=str(root)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise error("adapter.invalid-meta", f"not a {FORMAT} adapter", file=str(root / META_NAME))
    fp = fingerprint_of(source)
    if meta.get("base_fingerprint") not in (None, fp):
        raise error("adapter.wrong-base", f"the adapter was made for layout {meta.get('base_fingerprint')}, the "
                    f"base is {fp}", file=str(root / META_NAME), hint="pass the base model the adapter was trained on")
    files: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(root.glob("pp*/*.safetensors")):
        files[f"{f.parent.name}/{f.stem}"] = _read_safetensors(f)
    if not files:
        raise error("adapter.missing-weights", "no pp*/*.safetensors piece files", file=str(root))
    return gather_pieces(files, meta, binding.instances, binding.spec)


def read_any(path: Path | str, binding: Binding, source: HFSource) -> tuple[PeftAdapter, MegatronAdapter | None]:
    """A PEFT directory, or a Megatron adapter (mapgen's container or Megatron-Bridge's torch_dist checkpoint,
    :mod:`mapgen.runtime.adapter_dist`) exported to PEFT (with the Megatron adapter)."""
    from mapgen.runtime.adapter_dist import is_bridge_checkpoint, load_bridge

    if is_bridge_checkpoint(Path(path)):
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # a 1-rank gloo group when none is running yet
        meg = load_bridge(str(path), str(source.root))
        return export_adapter(meg, binding.instances, binding.spec), meg
    if is_megatron_adapter(Path(path)):
        meg = read_megatron(path, binding, source)
        return export_adapter(meg, binding.instances, binding.spec), meg
    return read_peft(path, binding), None


# -- trees the CLI writes ------------------------------------------------------------------------------------
def peft_tree(adapter: PeftAdapter, binding: Binding, base: str | None = None) -> dict[str, str | bytes]:
    view, experts = hf_view(binding)
    config, tensors = peft_fmt.render(adapter, view=view, num_experts=experts)
    if base is not None and not config.get("base_model_name_or_path"):
        config["base_model_name_or_path"] = base
    return {peft_fmt.CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True) + "\n",
            peft_fmt.WEIGHTS_NAME: st_save(tensors, metadata={"format": "pt"})}


def megatron_tree(meg: MegatronAdapter, binding: Binding, source: HFSource, par: Parallel,
                  world: int) -> dict[str, str | bytes]:
    check_parallel(binding.spec, par, world)
    files: dict[str, dict[str, torch.Tensor]] = {}
    for piece in shard_pieces(meg, binding.instances, binding.spec, tp=par.tp, ep=par.ep, etp=par.etp_size,
                              pp=par.pp):
        files.setdefault(piece.file, {})[piece.key] = piece.tensor.contiguous()
    peft_cfg = meg.meta.get("peft_config") or {}
    meta = {"format": FORMAT, "version": 1, "base_fingerprint": fingerprint_of(source),
            "parallel": {"tp": par.tp, "ep": par.ep, "etp": par.etp_size, "pp": par.pp},
            "dropout": float(peft_cfg.get("lora_dropout", meg.meta.get("dropout", 0.0)) or 0.0),
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in meg.modules}),
            "peft_config": peft_cfg,
            "modules": {m: lora.meta() for m, lora in sorted(meg.modules.items())}}
    tree: dict[str, str | bytes] = {META_NAME: json.dumps(meta, indent=2, sort_keys=True) + "\n"}
    for name, tensors in sorted(files.items()):
        tree[f"{name}.safetensors"] = st_save(tensors, metadata={"format": "pt"})
    return tree


class LazyTree(Mapping[str, str | bytes]):
    """A ``{relative path: content}`` tree whose contents are made when read: the atomic writer reads one file
    at a time, so a merged checkpoint holds one shard in memory, not the model."""

    def __init__(self, makers: Mapping[str, Callable[[], str | bytes]]) -> None:
        self._makers = dict(makers)

    def __getitem__(self, key: str) -> str | bytes:
        return self._makers[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


def merged_hf_tree(source: HFSource, adapter: PeftAdapter, *, keep_fp32: bool = False) -> LazyTree:
    """The base checkpoint with ``W + alpha/r * B @ A`` (fp32, cast once) in place of every adapted weight:
    the same key names, dtypes, shard files, index and side files. ``keep_fp32`` (the proof): merged weights
    stay fp32, so that a bf16 base is compared without the rounding of its merged weights."""
    keys = {f"{m}.weight": pair for m, pair in adapter.modules.items()}
    missing = sorted(k for k in keys if k not in source.weight_map)
    if missing:
        raise MapgenError([Diagnostic("error", "adapter.unknown-module", "the base has no such weight", key=k)
                           for k in missing])

    def side(path: Path) -> Callable[[], bytes]:
        return path.read_bytes

    def shard(name: str) -> Callable[[], bytes]:
        def make() -> bytes:
            with safe_open(str(source.root / name), framework="pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            for k, t in tensors.items():
                if k in keys:
                    tensors[k] = merged(t, keys[k], torch.float32 if keep_fp32 else None)
            return st_save(tensors, metadata=meta)
        return make

    makers: dict[str, Callable[[], str | bytes]] = {
        p.name: side(p) for p in sorted(source.root.iterdir()) if p.is_file() and p.suffix != ".safetensors"}
    makers.update({name: shard(name) for name in dict.fromkeys(source.weight_map.values())})
    return LazyTree(makers)


# -- the proof ----------------------------------------------------------------------------------------------
def round_trip(peft: PeftAdapter, binding: Binding, source: HFSource, par: Parallel) -> dict[str, Any]:
    """HF -> Megatron (pieces at ``par``) -> HF: the tensors and the config, compared bitwise."""
    meg = import_adapter(peft, binding.instances, binding.spec, _shapes(source))
    files: dict[str, dict[str, torch.Tensor]] = {}
    for piece in shard_pieces(meg, binding.instances, binding.spec, tp=par.tp, ep=par.ep, etp=par.etp_size,
                              pp=par.pp):
        files.setdefault(piece.file, {})[piece.key] = piece.tensor
    meta = {"modules": {m: lora.meta() for m, lora in meg.modules.items()}, "peft_config": peft.config}
    back = export_adapter(gather_pieces(files, meta, binding.instances, binding.spec), binding.instances,
                          binding.spec)
    problems = []
    for m in sorted(set(peft.modules) ^ set(back.modules)):
        problems.append(f"{m}: only in {'source' if m in peft.modules else 'round trip'}")
    for m in sorted(set(peft.modules) & set(back.modules)):
        a, b = peft.modules[m], back.modules[m]
        if not (torch.equal(a.a, b.a) and torch.equal(a.b, b.b) and a.a.dtype == b.a.dtype and a.alpha == b.alpha):
            problems.append(f"{m}: differs")
    view, experts = hf_view(binding)
    if peft_fmt.render(back, view=view, num_experts=experts)[0] != peft_fmt.render(peft, view=view,
                                                                                num_experts=experts)[0]:
        problems.append("adapter_config.json differs")
    forms: dict[str, int] = {}
    for lora in meg.modules.values():
        forms[lora.form] = forms.get(lora.form, 0) + 1
    return {"modules": len(peft.modules), "megatron_modules": len(meg.modules), "forms": forms,
            "files": len(files), "mismatches": problems}


def _shapes(source: HFSource) -> dict[str, tuple[int, ...]]:
    from mapgen.runtime.hfio import SafetensorsReader

    reader = SafetensorsReader(source.root, source.weight_map)
    try:
        return {k: tuple(reader.shape(k)) for k in source.weight_map}
    finally:
        reader.close()


def peft_logits(base: Path, adapter_dir: Path, input_ids: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """transformers + peft's own LoRA forward (unmerged), fp32; ``(None, reason)`` without peft."""
    try:
        import peft
        import transformers
    except ImportError as exc:
        return None, f"peft is not installed ({exc.name}); pip install peft to compare against it"
    from mapgen.runtime._cpu import quiet_transformers

    quiet_transformers()
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32,
                                                                  attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits.float(), ""


def merge_into_model(model: torch.nn.Module, binding: Binding, meg: MegatronAdapter) -> int:
    """Merge the adapter into this rank's Megatron parameters from this rank's pieces (Megatron-Bridge's
    ``LoRAMerge``: a column-parallel base gathers ``linear_in`` over TP, a row-parallel one ``linear_out``)."""
    from mapgen import ops
    from mapgen.runtime.engine import Coords, _local_instances, _local_params

    coords = Coords.current()
    params = _local_params(model)
    done = 0
    with torch.no_grad():
        for local, inst in _local_instances(params, model, binding).items():
            if not adaptable(inst):
                continue
            module = module_of(inst.megatron)
            lora = meg.modules.get(module)
            if lora is None:
                lora = meg.modules.get(grouped_name(module))
                if lora is None or not lora.grouped:
                    continue
            op = ops.OPS[inst.rule.op]
            ctx = op.context(inst.rule, inst.hf, binding.spec, inst.expert)
            shard = coords.shard(inst.rule)
            pieces = [op.adapter_split(ctx, lora.linear_in, lora.linear_out, ops.Shard(r, shard.size))
                      for r in range(shard.size)]
            lin, lout = pieces[shard.rank]
            dim = ops.shard_dim(inst.rule)
            if dim == 0:
                lin = torch.cat([p[0] for p in pieces])
            elif dim == 1:
                lout = torch.cat([p[1] for p in pieces])
            target = params[local]
            target.copy_(_merge(target, lin, lout, lora))
            done += 1
    return done


def _merge(weight: torch.Tensor, lin: torch.Tensor, lout: torch.Tensor, lora: MegatronLora) -> torch.Tensor:
    from mapgen.lora.plan import merge_local

    return merge_local(weight, lin, lout, lora.alpha, lora.dim)


def verify_adapter(source_path: str, adapter_path: str, par: Parallel, *, atol: float = 1e-4) -> dict[str, Any]:
    """SPMD entry point: every rank loads the base at ``par``, merges its adapter pieces and runs the forward;
    rank 0 compares with transformers + peft and with the merged HF checkpoint in transformers."""
    from mapgen.runtime.api import _barrier, export_hf, load_hf, parallel_context, world_from_env
    from mapgen.runtime.megatron import logits as megatron_logits
    from mapgen.runtime.verify import _to_fp32, fixed_batch, transformers_logits

    source = HFSource.open(source_path)
    binding = bind(source.layout)
    check_parallel(binding.spec, par, world_from_env())
    peft_ad, meg = read_any(adapter_path, binding, source)
    if meg is None:
        meg = import_adapter(peft_ad, binding.instances, binding.spec, _shapes(source))
    result: dict[str, Any] = {}
    with parallel_context(par) as coords:
        model, binding, _ = load_hf(source, par, dtype="float32")
        result["merged_params"] = merge_into_model(model, binding, meg)
        vocab = int(binding.spec.vocab_size)
        ids = fixed_batch(vocab)
        # The model merged rank by rank, exported to HF (gathered over TP/EP/PP): what transformers computes
        # with it is the proof at every layout, PP included, on top of megatron-core's own forward (PP=1).
        tmp = Path(tempfile.mkdtemp(prefix="mapgen-adapter-verify-")) if coords.rank == 0 else Path()
        export_hf(model, binding, tmp / "megatron-merged", target={**source.to_meta(), "force_dtype": "float32"},
                  source_root=source.root)
        got = None
        if par.pp == 1:
            _to_fp32(model)
            got = megatron_logits(model, ids)
        if coords.rank == 0:
            try:
                result["round_trip"] = round_trip(peft_ad, binding, source, par)
                _write_plain(tmp / "peft", peft_tree(peft_ad, binding))
                _write_plain(tmp / "merged", merged_hf_tree(source, peft_ad, keep_fp32=True))
                want, reason = peft_logits(source.root, tmp / "peft", ids)
                merged_logits, reason2 = transformers_logits(tmp / "merged", ids)
                exported_logits, reason3 = transformers_logits(tmp / "megatron-merged", ids)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            result["reference"] = reason or None
            if want is not None:
                want = want[..., :vocab]
                base_logits, _ = transformers_logits(source.root, ids)
                if base_logits is not None:  # how much the adapter moves the logits: the proof is not vacuous
                    result["adapter_effect"] = float((base_logits[..., :vocab] - want).abs().max())
                if merged_logits is not None:
                    result["merged_hf"] = _diff(merged_logits[..., :vocab], want, atol)
                else:
                    result["merged_hf"] = {"skipped": reason2}
                result["megatron_export"] = (_diff(exported_logits[..., :vocab], want, atol)
                                             if exported_logits is not None else {"skipped": reason3})
                if got is not None:
                    result["megatron"] = _diff(got[..., :vocab].float(), want, atol)
                else:
                    result["megatron"] = {"skipped": "logits are checked at PP=1 (the round trip covers PP)"}
        _barrier()
    return result


def _diff(a: torch.Tensor, b: torch.Tensor, atol: float) -> dict[str, Any]:
    d = float((a - b).abs().max())
    return {"max_abs": d, "ok": d <= atol}


def _write_plain(root: Path, tree: Mapping[str, str | bytes]) -> None:
    """Scratch trees of the proof (a temporary directory the proof removes)."""
    for rel, data in tree.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)


__all__ = [
    "IN",
    "OUT",
    "megatron_tree",
    "merged_hf_tree",
    "open_base",
    "peft_tree",
    "read_any",
    "read_megatron",
    "read_peft",
    "round_trip",
    "verify_adapter",
]
