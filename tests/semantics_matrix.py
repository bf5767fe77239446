"""The semantics matrix (issue 10, "Done means"): every causal-LM architecture of the installed transformers,
as a tiny fp32 model written by transformers itself, through scan -> catalog -> emit -> ``verify --tp 2``.

One case = one ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: its own config class with small
dimensions (2 layers), random perturbed weights, saved in several shards. Outcomes:

* ``build-failed``: transformers cannot build/save it at these sizes (not mapgen's verdict);
* ``out-of-scope`` / ``unclassified`` / ``scan-error``: scan refuses it (keys or scope);
* ``refused``: the config catalog refuses it before anything is written (codes listed);
* ``emit-failed``: planning or the proof refuses it (code listed);
* ``verified``: ``mapgen verify --tp 2`` (``--ep 2`` for MoE) passes, max |logits diff| <= 1e-4;
* ``verify-failed``: the round trip fails for another reason, or transformers has no reference;
* ``LOGITS-DIFFER``: converted, logits differ. The invariant: never.

Memory stays small: the model is first built on the meta device and refused (``build-failed``) when the tiny
config still has more than ``MAX_PARAMS`` parameters (some configs keep sub-module sizes the small dimensions
do not reach); ``run_isolated`` runs a case in its own process with capped address space when a crash must
not take the caller down. Emitted bridges go to a temporary bridge directory that verify is
pointed at (``--bridges``), so the repository's ``generated/`` is never touched.

Full table: ``.venv/bin/python benchmarks/semantics_matrix.py`` (minutes; writes markdown to stdout).
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ATOL = 1e-4
MEMORY_CAP = 6 * 1024**3  # address space per case process (torch reserves far more than it touches)
CASE_TIMEOUT = 600
MAX_PARAMS = 5_000_000
# converts / refused by a default / refused by model-type facts / fused qkv_proj converts / LayerNorm + partial RoPE
SLICE = ("llama", "dots1", "gemma", "phi3", "stablelm")

_TINY = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 64,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_topk": 2, "first_k_dense_replace": 1,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "full_attention_interval": 2, "sliding_window": 4, "n_shared_experts": 1,  # window 4 < the 11-token verify batch
    # other spellings of the same sizes
    "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 96, "n_positions": 64, "d_model": 64, "n_layers": 2,
    "n_heads": 4, "num_layers": 2, "ffn_dim": 96, "rotary_dim": 8, "kv_lora_rank": 16, "q_lora_rank": 32,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "index_n_heads": 2, "index_head_dim": 16,
    "ffn_hidden_size": 96, "expert_ffn_hidden_size": 32, "intermediate_size_mlp": 96, "kv_n_heads": 2,
    "num_dense_layers": 1, "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16,
    # vision towers of composite configs (they take no part in a text-only forward; only made small)
    "depth": 2, "num_heads": 4, "out_hidden_size": 64, "vision_output_dim": 64, "projector_input_dim": 64,
    "projector_output_dim": 64, "zero_expert_num": 2,
    # a sparse-attention indexer that the default leaves unset and the model code requires (Qwen4-Exp's QSA)
    "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
    "indexer_compress_ratio": 4,
}
# Values transformers' default config leaves out but its modeling code reads and the released configs state (no rule
# derives them): DBRX's attn_config.rope_theta, LFM2-MoE's layer kinds, Cohere Compass's per-kind RoPE tables;
# and Gemma-4's full-attention head size, a constructor argument its defaults do not list.
_STATED: dict[str, dict[str, Any]] = {
    "dbrx": {"attn_config": {"rope_theta": 500000.0}},
    "gemma4_text": {"global_head_dim": 32},  # a constructor argument (full-attention head size), 512 by default
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 50000.0}}},
}
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")


def _tiny_kwargs(defaults: dict[str, Any]) -> dict[str, Any]:
    """The tiny sizes for a config whose defaults are ``defaults``, nested sub-configs included (a composite's
    ``text_config``/``vision_config``, DBRX's ``attn_config``/``ffn_config``: any dict value that states a
    ``model_type``), each shrunk by the same rules."""
    kwargs = {k: v for k, v in _TINY.items() if k in defaults}
    if not (isinstance(defaults.get("sliding_window"), int) and defaults["sliding_window"] > 0):
        kwargs.pop("sliding_window", None)  # a window only where the architecture has one by default
    if "head_dim" in kwargs and defaults.get("head_dim") is None:
        kwargs.pop("head_dim")
    if any(k.startswith("enable_moe") and v is False for k, v in defaults.items()):
        for key in _EXPERT_COUNTS:  # no experts where a MoE switch is off by default (Gemma-4's enable_moe_block)
            kwargs.pop(key, None)
    for i, key in enumerate(_TOKEN_IDS):  # ids inside the tiny vocabulary
        if isinstance(defaults.get(key), int):
            kwargs[key] = i
        elif isinstance(defaults.get(key), list):
            kwargs[key] = [i]
    if "kv_lora_rank" in defaults and "num_key_value_heads" in defaults:
        # multi-latent attention expands k and v per query head; every released MLA config states as many KV
        # heads as heads (transformers' MLA classes repeat the heads by their ratio otherwise)
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", defaults.get("num_attention_heads"))
        kwargs.pop("head_dim", None)  # MLA configs derive it from qk_rope_head_dim (the RoPE tables' width)
        if "qk_head_dim" in defaults:  # a stated sum of the two parts (LongCat-Flash)
            kwargs["qk_head_dim"] = _TINY["qk_nope_head_dim"] + _TINY["qk_rope_head_dim"]
    if isinstance(defaults.get("n_group"), int) and defaults["n_group"] > 1:
        # group-limited routing with the tiny expert count: two groups, the best one kept (DeepSeek-V3's 8/4
        # would need at least 8 experts)
        kwargs["n_group"], kwargs["topk_group"] = 2, 1
    if isinstance(defaults.get("attention_types"), list):  # GPT-Neo: [[["global", "local"], 12]] = 24 layers
        kwargs["attention_types"] = [[["global", "local"], _TINY["num_layers"] // 2]]
    layer_types = defaults.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) > _TINY["num_hidden_layers"]:
        # one layer of each kind the default stack has, in their first order, the last kind last (Gemma's
        # [sliding x5, full]); more kinds than tiny layers: the default's first layers
        kinds = list(dict.fromkeys(layer_types))
        kept = kinds if len(kinds) == _TINY["num_hidden_layers"] else layer_types[: _TINY["num_hidden_layers"]]
        kwargs["layer_types"] = kept if len(kinds) != 1 else [kinds[0]] * _TINY["num_hidden_layers"]
    for key, value in defaults.items():
        if isinstance(value, list) and value and key.endswith("_indexes") and all(isinstance(v, int) for v in value):
            kwargs[key] = [0]  # layer indexes of a shrunk stack (Qwen-VL's deepstack_visual_indexes)
        elif isinstance(value, dict) and "model_type" in value:  # a nested sub-config
            kwargs[key] = value | _tiny_kwargs(value)
    return kwargs


@dataclass
class Case:
    model_type: str
    outcome: str = ""
    detail: str = ""
    unclassified: int | None = None
    catalog: str = ""
    max_diff: float | None = None
    moe: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        diff = "" if self.max_diff is None else f"{self.max_diff:.2g}"
        uncl = "" if self.unclassified is None else str(self.unclassified)
        detail = self.detail.replace("|", "/").replace("\n", " ")[:110]
        return f"| {self.model_type} | {self.outcome} | {uncl} | {self.catalog} | {diff} | {detail} |"


HEADER = ("| model_type | outcome | unclassified keys | catalog | max abs logits diff (TP=2, EP=2 for MoE) | detail |\n"
          "|---|---|---|---|---|---|")


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def build(model_type: str, out: Path, seed: int = 0, overrides: dict[str, Any] | None = None) -> None:
    """A tiny fp32 model of ``model_type`` written by transformers, in several shards; ``overrides`` are config
    values set on top of the tiny sizes (a variant of the architecture: e.g. GPT-NeoX without parallel residual)."""
    import torch
    import transformers
    from transformers import CONFIG_MAPPING

    transformers.logging.set_verbosity_error()
    cls = CONFIG_MAPPING[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = _tiny_kwargs(cls().to_dict())
        for key, value in _STATED.get(model_type, {}).items():
            kwargs[key] = kwargs[key] | value if isinstance(kwargs.get(key), dict) else value
        config = cls(**(kwargs | (overrides or {})))
        auto = _auto_class(model_type, kwargs)
        try:
            with torch.device("meta"):
                probe = auto.from_config(config, dtype=torch.float32)
        except TypeError:  # Ministral, Hunyuan: the model code reads config.head_dim, which hub configs state
            if getattr(config, "head_dim", 0) is not None or not kwargs.get("num_attention_heads"):
                raise
            config.head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
            with torch.device("meta"):
                probe = auto.from_config(config, dtype=torch.float32)
        count = sum(p.numel() for p in probe.parameters())
        del probe
        if count > MAX_PARAMS:
            raise ValueError(f"the tiny config still has {count:,} parameters (> {MAX_PARAMS:,})")
        model = auto.from_config(config, dtype=torch.float32)
    from mapgen.runtime.numerics import perturb

    perturb(model, seed)
    model.save_pretrained(str(out), max_shard_size="100KB")


def _auto_class(model_type: str, kwargs: dict[str, Any]) -> Any:
    """The class a released checkpoint of ``model_type`` is saved from: for a composite (a ``text_config`` beside
    towers) the image-text model when transformers has one (Qwen3.5's causal-LM class is the text model alone, which
    saves a ``qwen3_5_text`` checkpoint without the vision tower: not what Qwen3.5 releases store), else the causal
    LM."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if isinstance(kwargs.get("text_config"), dict) and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", MAPGEN_PROGRESS="0")
    for name in ("WORLD_SIZE", "MAPGEN_BRIDGES"):
        env.pop(name, None)
    return env


def _code(stderr: str) -> str:
    codes = sorted(set(re.findall(r"error: ([a-z0-9_-]+\.[a-z0-9_.-]+):", stderr)))
    return ", ".join(codes) or (stderr.strip().splitlines() or ["?"])[-1][:100]


def run_case(model_type: str, work: Path, *, timeout: int = 600, overrides: dict[str, Any] | None = None,
             post_build: Callable[[Path], None] | None = None, parallel: tuple[str, ...] | None = None) -> Case:
    """One architecture through scan, catalog, emit and verify. ``post_build`` edits the written checkpoint
    before mapgen sees it (e.g. adds the RoPE buffers older exports store); ``parallel`` replaces verify's
    layout flags (default ``--tp 2``, with ``--ep 2`` for MoE)."""
    from mapgen.catalog import check_config
    from mapgen.errors import MapgenError
    from mapgen.infer import scan

    case = Case(model_type)
    ckpt = work / model_type / "hf"
    try:
        build(model_type, ckpt, overrides=overrides)
        if post_build is not None:
            post_build(ckpt)
    except Exception as exc:
        case.outcome, case.detail = "build-failed", f"{type(exc).__name__}: {str(exc)[:100]}"
        return case
    config = json.loads((ckpt / "config.json").read_text())
    report = check_config(config, file=str(ckpt / "config.json"))
    case.catalog = "ok" if report.ok else ", ".join(sorted({d.code for d in report.errors}))
    if report.scope_error:
        case.outcome, case.detail = "out-of-scope", report.errors[0].message
        return case
    try:
        layout = scan(str(ckpt))
    except MapgenError as exc:
        case.outcome, case.detail = "scan-error", ", ".join(sorted({d.code for d in exc.diagnostics}))
        return case
    case.unclassified = sum(u.count for u in layout.unclassified)
    case.moe = layout.summary.moe_layers > 0
    if case.unclassified:
        case.outcome = "unclassified"
        case.detail = "; ".join(u.pattern for u in layout.unclassified[:3])
        return case
    if not report.ok:
        case.outcome = "refused"
        case.detail = "; ".join(sorted({d.key for d in report.errors}))
        return case
    gen = work / model_type / "pkg" / "generated"
    emit = subprocess.run([sys.executable, "-m", "mapgen", "emit", str(ckpt), "--out", str(gen)], cwd=work,
                          capture_output=True, text=True, timeout=timeout, env=_env(), check=False)
    if emit.returncode != 0:
        case.outcome, case.detail = "emit-failed", _code(emit.stderr)
        return case
    par = list(parallel) if parallel is not None else ["--tp", "2"] + (["--ep", "2"] if case.moe else [])
    ver = subprocess.run([sys.executable, "-m", "mapgen", "verify", str(ckpt), *par, "--bridges", str(gen)], cwd=work,
                         capture_output=True, text=True, timeout=timeout, env=_env(), check=False)
    m = re.search(r"max \|Δ\| = ([0-9.eE+-]+|nan|inf)", ver.stdout)
    if m:
        case.max_diff = float(m.group(1))
    if ver.returncode == 0 and case.max_diff is not None and case.max_diff <= ATOL:
        case.outcome = "verified"
    elif case.max_diff is not None and not case.max_diff <= ATOL and "bitwise identical" in ver.stdout:
        case.outcome = "LOGITS-DIFFER"
    else:
        case.outcome = "verify-failed"
        skipped = re.search(r"logits parity vs transformers: skipped: (.*)", ver.stdout)
        case.detail = skipped.group(1) if skipped else _code(ver.stderr + ver.stdout)
    return case


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_isolated(model_type: str, work: Path) -> Case:
    """:func:`run_case` in a child process with capped memory and a timeout."""
    result = work / f"{model_type}.json"
    try:
        proc = subprocess.run([sys.executable, __file__, model_type, str(work), str(result)], cwd=work,
                              capture_output=True, text=True, timeout=CASE_TIMEOUT, env=_env(),
                              preexec_fn=_limit_memory, check=False)
    except subprocess.TimeoutExpired:
        return Case(model_type, "build-failed", f"timed out after {CASE_TIMEOUT} s")
    if not result.is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Case(model_type, "build-failed", f"case process exited {proc.returncode}: {tail[:100]}")
    data = json.loads(result.read_text())
    return Case(**data)


def run_matrix(model_types: list[str] | tuple[str, ...], work: Path | None = None) -> list[Case]:
    cases = []
    with tempfile.TemporaryDirectory(prefix="mapgen-matrix-") as tmp:
        root = work or Path(tmp)
        for mt in model_types:
            cases.append(run_case(mt, root))
            gc.collect()
            print(cases[-1].row(), file=sys.stderr, flush=True)
            _rmtree(root / mt)
    return cases


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def render(cases: list[Case]) -> str:
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.outcome] = counts.get(c.outcome, 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return f"{len(cases)} causal-LM architectures: {summary}\n\n{HEADER}\n" + "\n".join(c.row() for c in cases) + "\n"


if __name__ == "__main__":  # one case: MODEL_TYPE WORK_DIR RESULT_JSON
    sys.path.insert(0, str(REPO))
    import dataclasses

    done = run_case(sys.argv[1], Path(sys.argv[2]))
    Path(sys.argv[3]).write_text(json.dumps(dataclasses.asdict(done)))
