"""The single place that knows megatron-core: parallel state, configs, model building, names, I/O.

Everything below was verified against megatron-core 0.16.1 (torch 2.13 CPU, no Transformer Engine, no fla,
no apex) by building models on the meta and CPU devices; the tests in ``tests/test_megatron_build.py`` pin
most of it.

Facts the conversion ops (``mapgen.ops``) rely on
-------------------------------------------------
GatedDeltaNet (``megatron/core/ssm/gated_delta_net.py``), per TP rank (``tp`` = TP size):

- ``self_attention.in_proj.weight`` has shape ``[(2*Hk*Dk + 2*Hv*Dv + 2*Hv) / tp, hidden]``. Its rows on one
  rank are six contiguous blocks in the order ``q, k, v, z, b(eta), a(lpha)`` with sizes
  ``Hk*Dk/tp, Hk*Dk/tp, Hv*Dv/tp, Hv*Dv/tp, Hv/tp, Hv/tp``; each block is the rank's contiguous slice of the
  global block (head-major: q/k by key head, v/z/b/a by value head). So the TP=1 tensor is
  ``cat([q, k, v, z, b, a])`` and the TP=r shard is ``cat([q_r, k_r, v_r, z_r, b_r, a_r])`` -- NOT a
  contiguous row slice of the TP=1 tensor. (Dist checkpoints store it as six sub-tensors
  ``in_proj.weight.{query,key,value,z,beta,alpha}``.) Qwen3-Next's HF ``in_proj_qkvz`` interleaves q,k,v,z per
  key-head group and ``in_proj_ba`` interleaves b,a; both need regrouping.
- ``self_attention.in_proj.layer_norm_weight`` ``[hidden]`` is the layer's input norm (fused, replicated over
  TP); GDN layers have no ``input_layernorm``.
- ``self_attention.conv1d.weight`` ``[(2*Hk*Dk + Hv*Dv) / tp, 1, kernel]``, channels ``q, k, v`` in the same
  per-rank-contiguous way (``conv1d.weight.{query,key,value}`` in dist checkpoints); no conv bias.
- ``self_attention.A_log`` and ``self_attention.dt_bias`` ``[Hv / tp]`` ARE split across TP (contiguous by value
  head; dtype ``params_dtype``).
- ``self_attention.out_norm.weight`` ``[Dv]`` is built with the layer-norm class of the spec; in a TE build it is
  ``TENorm`` and therefore zero-centred exactly when ``config.layernorm_zero_centered_gamma`` is set (the same
  flag as every other norm). Qwen3-Next's HF gated RMSNorm weight is NOT zero-centred (``weight * x``, init
  ones) while its other norms are (``(1 + weight) * x``): a converter for a zero-centred-gamma Megatron config
  must add/subtract 1 on ``out_norm.weight`` too.
- ``self_attention.out_proj.weight`` ``[hidden, Hv*Dv / tp]`` is row-parallel.
- GDN forward on CPU without TE/fla: megatron-core's ``GatedDeltaNet.__init__`` raises ``ImportError`` when
  ``fla`` is missing, and its forward calls ``fla``'s ``l2norm`` and ``chunk_gated_delta_rule``. With the
  fallback in :mod:`mapgen.runtime._gdn` (``HAVE_FLA`` forced, torch ``l2norm``, and megatron-core's own
  ``torch_chunk_gated_delta_rule``) it builds and runs on CPU; ``causal_conv1d`` is optional (plain Conv1d).

Gated attention (``attention_output_gate``): ``linear_qkv.weight`` rows are grouped per query group as
``[q (heads_per_group*D), gate (heads_per_group*D), k (D), v (D)]``; without the gate ``[q, k, v]``.

MTP: ``mtp.layers.<d>.eh_proj.weight`` ``[hidden / tp, 2*hidden]`` is a ColumnParallelLinear (split on dim 0,
input is ``cat([enorm(embedding), hnorm(hidden)])`` in that order, output gathered over TP), no bias.
``enorm``, ``hnorm``, ``final_layernorm`` are
plain norms. The inner layer is ``mtp.layers.<d>.transformer_layer.*`` in 0.16.1 (see :func:`mtp_inner_name`).
MTP layers are built on the last PP stage only.

MoE: ``mlp.router.weight`` ``[E, hidden]`` is created in float32 and then cast to ``params_dtype``
(``reset_parameters``), replicated over TP/EP; ``mlp.router.expert_bias`` ``[E]`` is a persistent float32
buffer whatever ``params_dtype`` (present with
``moe_router_enable_expert_bias``, which megatron-core only allows with the sigmoid score function);
``mlp.router.local_tokens_per_expert`` is a non-persistent buffer (not in state dicts). A router bias
(``mlp.router.bias``) exists only with ``add_bias_linear``. Shared experts:
``mlp.shared_experts.linear_fc1.weight`` ``[2*S / tp, hidden]`` (gate/up stacked when gated),
``mlp.shared_experts.linear_fc2.weight`` ``[hidden, S / tp]``, and ``mlp.shared_experts.gate_weight`` ``[1, hidden]``
(``params_dtype``, replicated over TP) with ``moe_shared_expert_gate``. Shared experts are split by TP, routed
experts by ETP; expert ``linear_fc1`` stacks ``[gate; up]`` (each split by ETP: rank r holds
``cat(gate_r, up_r)``), as the dense MLP does under TP.

Other TP layouts (checked shard-by-shard against a resharded TP=1 copy in the two-process test):
``linear_qkv`` (grouped per query group, gate included), ``embedding``/``output_layer`` (vocab rows) and
``eh_proj`` are contiguous row chunks; ``linear_proj``/``out_proj``/``linear_fc2`` contiguous column chunks; a gated
``linear_fc1`` (dense MLP, shared experts; routed experts under ETP by the same MLP code) holds
``cat([gate_r, up_r])`` on rank r, not a row chunk of ``cat([gate, up])``. Norms (including the fused
``layer_norm_weight``), the router and the shared-expert gate are replicated. Under EP, rank r's
``local_experts.<j>`` is global expert ``local_expert_indices[j]`` (= ``r * E/ep + j``).

PP: decoder layer ``<i>`` on a stage is global ``layer_number - 1``; MTP layers are built on the last stage, and
that stage also builds a copy of ``embedding.word_embeddings.weight`` (MTP re-embeds tokens) and, with tied
embeddings, ``output_layer.weight`` -- both copies of the first stage's embedding (megatron all-reduces them
at build time).

Vocabulary: ``VocabParallelEmbedding``/the output layer need ``vocab % tp == 0``; :func:`build_model` pads the
vocabulary to ``padded_vocab_size(vocab, tp, pad_vocab_to)``; :func:`logits` trims the padding off again.

What the local (CPU) build changes against a TE build: attention-layer input norms and dense-layer pre-MLP
norms are separate modules (see :mod:`mapgen.runtime._names`); routed experts are ``SequentialMLP``
(``mlp.experts.local_experts.<e>.*``) instead of ``TEGroupedMLP`` (``mlp.experts.linear_fc1.weight<e>``). The
dist-checkpoint keys of the local build are mapped to TE spellings for attention/dense layers (megatron's own
``sharded_state_dict_keys_map``) so checkpoints interoperate.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import io
import itertools
import os
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from mapgen.contract.spec import LayerKind, MlpKind, ModelSpec
from mapgen.runtime._cpu import cpu_shims, import_megatron, install_cpu_shims
from mapgen.runtime._names import (
    MTP_INNER_NAMES,
    detect_mtp_inner_name,
    local_to_te_name,
    local_to_te_names,
    rename_mtp_inner,
    te_to_local_name,
    te_to_local_names,
)
from mapgen.runtime._net import free_port
from mapgen.runtime.hfio import copy_ranges, cut_ranges
from mapgen.runtime.layout import Parallel

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

__all__ = [
    "MTP_INNER_NAMES",
    "activation_func",
    "build_model",
    "check_divisibility",
    "cpu_shims",
    "destroy_parallel",
    "detect_mtp_inner_name",
    "enumerate_parameters",
    "init_parallel",
    "install_cpu_shims",
    "load_dist_checkpoint",
    "load_dist_entries",
    "local_to_global",
    "local_to_te_name",
    "local_to_te_names",
    "logits",
    "mtp_inner_name",
    "padded_vocab_size",
    "parallel",
    "planned_writes",
    "rename_mtp_inner",
    "save_dist_checkpoint",
    "save_dist_checkpoint_streaming",
    "set_param_dtypes",
    "te_to_local_name",
    "te_to_local_names",
    "transformer_config",
]

Device = Literal["meta", "cpu", "cuda"]


# -- divisibility ----------------------------------------------------------------------------------------


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = 1) -> int:
    """Smallest multiple of ``divisible_by * tp`` >= ``vocab_size`` (Megatron-LM's rule; the one formula lives
    in :func:`mapgen.ops.padded_vocab`, which the loader's vocab slicing uses too)."""
    from mapgen.ops import padded_vocab

    return padded_vocab(vocab_size, tp, divisible_by)


def check_divisibility(
    spec: ModelSpec, tp: int = 1, ep: int = 1, etp: int | None = None, pp: int = 1, world_size: int | None = None
) -> list[str]:
    """Every reason why ``spec`` cannot be built under (tp, ep, etp, pp) on ``world_size`` ranks.

    ``etp`` defaults to ``tp`` (megatron-core's default); ``world_size`` defaults to ``max(tp*pp, etp*ep*pp)``.
    The vocabulary is padded, never an error. An empty list means the layout is fine.
    """
    etp = tp if etp is None else etp
    errors: list[str] = []
    for name, value in (("tp", tp), ("ep", ep), ("etp", etp), ("pp", pp)):
        if value < 1:
            errors.append(f"{name}={value} must be >= 1")
    if errors:
        return errors
    world = max(tp * pp, etp * ep * pp) if world_size is None else world_size

    def need(what: str, value: int | None, by: int, by_name: str) -> None:
        if value is not None and value % by:
            errors.append(f"{what}={value} is not divisible by {by_name}={by}")

    kinds = set(spec.kinds) | ({spec.mtp_layer_kind} if spec.mtp_num_layers else set())
    mlps = set(spec.mlps) | ({spec.mtp_mlp_kind} if spec.mtp_num_layers else set())
    if "attention" in kinds:
        need("num_attention_heads", spec.num_attention_heads, tp, "tp")
        need("num_query_groups", spec.num_query_groups, tp, "tp")
    if "mla" in kinds:
        need("num_attention_heads", spec.num_attention_heads, tp, "tp")
        need("q_lora_rank", spec.q_lora_rank, tp, "tp")  # local spec: column-parallel down projections
        need("kv_lora_rank + qk_pos_emb_head_dim", (spec.kv_lora_rank or 0) + (spec.qk_pos_emb_head_dim or 0), tp,
             "tp")
    if "gated_delta_net" in kinds:
        need("linear_num_key_heads", spec.linear_num_key_heads, tp, "tp")
        need("linear_num_value_heads", spec.linear_num_value_heads, tp, "tp")
        if spec.linear_num_key_heads and spec.linear_num_value_heads:
            need("linear_num_value_heads", spec.linear_num_value_heads, spec.linear_num_key_heads,
                 "linear_num_key_heads")
    if "dense" in mlps:
        need("ffn_hidden_size", spec.ffn_hidden_size, tp, "tp")
    if "moe" in mlps:
        if not spec.num_moe_experts:
            errors.append("MoE layers need num_moe_experts")
        need("num_moe_experts", spec.num_moe_experts, ep, "ep")
        need("moe_ffn_hidden_size", spec.moe_ffn_hidden_size or spec.ffn_hidden_size, etp, "etp")
        need("moe_shared_expert_intermediate_size", spec.moe_shared_expert_intermediate_size, tp, "tp")
        if spec.add_bias_linear and etp > 1:  # transformer_config.py: "Bias in Moe is only supported when ETP==1"
            errors.append(f"etp={etp}: megatron-core builds biased experts (add_bias_linear) only at expert-TP 1 "
                          "(pass --etp 1; with --tp > 1 and --ep 1 the experts are then whole on every rank)")
    elif ep > 1:
        errors.append(f"ep={ep}: expert parallelism needs MoE layers; this model has none (use --ep 1)")
    need("num_layers", spec.num_layers, pp, "pp")
    need("world_size", world, tp * pp, "tp*pp")
    need("world_size", world, etp * ep * pp, "etp*ep*pp")
    return errors


# -- parallel state --------------------------------------------------------------------------------------


class _PG:
    """Whether this module created the default process group, and the env variables it set for it."""

    owned = False
    set_env: list[str] = []  # noqa: RUF012 -- process-wide
    subgroups: list[Any] = []  # noqa: RUF012 -- the groups megatron's last initialize_model_parallel created


def _dist_timeout() -> datetime.timedelta:
    """How long a collective may wait for a peer: ``MAPGEN_DIST_TIMEOUT`` seconds (default 1800, torch's).
    Tests set it low so that a desynchronised worker fails the run instead of hanging it."""
    return datetime.timedelta(seconds=float(os.environ.get("MAPGEN_DIST_TIMEOUT", "1800")))


def _ensure_process_group(backend: str | None) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun or a caller-provided env
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, timeout=_dist_timeout())
    elif backend == "gloo":
        # One process: an in-memory store, no TCP port (a free port picked here can be taken by another
        # process before the store binds it on a busy machine).
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,  # type: ignore[attr-defined]
                                timeout=_dist_timeout())
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
            _PG.set_env.append("MASTER_PORT")
        dist.init_process_group(backend, rank=0, world_size=1)
    _PG.owned = True


def _live_groups() -> list[Any]:
    """Every process group torch.distributed holds in this process (the default group included)."""
    from torch.distributed import distributed_c10d as c10d

    return list(c10d._world.pg_map)


def _destroy_model_parallel() -> None:
    """Tear down megatron's model-parallel state and destroy the groups it created: megatron-core's
    ``destroy_model_parallel`` only forgets them, and each gloo group keeps its threads (two per peer), so a
    process that changes layouts many times (the runtime's tests, verify's round trips) otherwise piles up
    thousands of threads."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    live = set(_live_groups())
    while _PG.subgroups:
        group = _PG.subgroups.pop()
        if group in live and group is not dist.GroupMember.WORLD:
            dist.destroy_process_group(group)


def _drop_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    while _PG.set_env:  # a later group gets a fresh port
        os.environ.pop(_PG.set_env.pop(), None)
    _PG.owned = False


def init_parallel(
    tp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    pp: int = 1,
    backend: str | None = None,
    *,
    spec: ModelSpec | None = None,
    seed: int = 1234,
) -> Parallel:
    """Initialise torch.distributed (if needed) and megatron's model-parallel state; returns it
    (:meth:`Parallel.current`).

    Single process without torchrun env: a 1-rank group on 127.0.0.1 with a free port (MASTER_ADDR/PORT are
    respected when set). Under torchrun the env (RANK, WORLD_SIZE, MASTER_*) is used. Backend: gloo on CPU,
    nccl with CUDA. With ``spec``, :func:`check_divisibility` runs first and all violations are raised
    together as one ``ValueError`` before anything is initialised. An existing model-parallel state is
    replaced. RNG: megatron's tracker is seeded; on CPU the inference tracker (fork = nullcontext) is used,
    and ``torch.manual_seed(seed)`` seeds CPU initialisation identically on every rank.
    """
    etp = tp if etp is None else etp
    import torch.distributed as dist

    import_megatron()
    if spec is not None:
        world = None
        if dist.is_initialized():
            world = dist.get_world_size()
        elif "WORLD_SIZE" in os.environ:
            world = int(os.environ["WORLD_SIZE"])
        errors = check_divisibility(spec, tp, ep, etp, pp, world)
        if errors:
            raise ValueError("cannot build this model with this layout:\n  " + "\n  ".join(errors))
    _ensure_process_group(backend)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    world = dist.get_world_size()
    bad = [f"world_size={world} is not divisible by {n}={v}" for n, v in
           (("tp*pp", tp * pp), ("etp*ep*pp", etp * ep * pp)) if world % v]
    if bad:
        raise ValueError("; ".join(bad))
    _destroy_model_parallel()
    before = _live_groups()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    _PG.subgroups = [g for g in _live_groups() if g not in before]
    torch.manual_seed(seed)
    with cpu_shims():
        model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not torch.cuda.is_available(),
                                        force_reset_rng=True)
    return Parallel.current()


def destroy_parallel(*, keep_process_group: bool = False) -> None:
    """Tear down megatron's parallel state, and the process group if :func:`init_parallel` created it (unless
    ``keep_process_group``).

    To change layouts within one process group, call :func:`init_parallel` again instead: re-creating the
    default group on the same MASTER_PORT in several processes is racy.
    """
    _destroy_model_parallel()
    if _PG.owned and not keep_process_group:
        _drop_process_group()


@contextlib.contextmanager
def parallel(
    tp: int = 1, ep: int = 1, etp: int | None = None, pp: int = 1, backend: str | None = None,
    *, spec: ModelSpec | None = None, seed: int = 1234, keep_process_group: bool = False,
) -> Iterator[Parallel]:
    """:func:`init_parallel` for the block, yielding the resolved layout; :func:`destroy_parallel` after.

    The process group :func:`init_parallel` created (if any) ends with the block, unless
    ``keep_process_group``: then only megatron's model-parallel state is torn down and the group stays for the
    next layout (what :class:`mapgen.runtime.api.parallel_context`, the runtime's SPMD entry, asks for)."""
    sizes = init_parallel(tp, ep, etp, pp, backend, spec=spec, seed=seed)
    try:
        yield sizes
    finally:
        destroy_parallel(keep_process_group=keep_process_group)


@contextlib.contextmanager
def _single_rank_state() -> Iterator[None]:
    """TP=EP=PP=1 megatron state for the block, restoring whatever existed before."""
    import_megatron()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        s = Parallel.current()
        if (s.tp, s.ep, s.etp_size, s.pp) != (1, 1, 1, 1):
            raise RuntimeError(
                f"needs TP=EP=ETP=PP=1 (or no model-parallel state), found {s.describe()}; call it outside "
                "parallel()"
            )
        yield
        return
    created_pg = not dist.is_initialized()
    if created_pg:
        # A private, in-process 1-rank group: never the launcher's world (RANK/WORLD_SIZE may be set by
        # torchrun for the real job) and no TCP port that could collide with its store.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    try:
        ps.initialize_model_parallel()
        yield
    finally:
        ps.destroy_model_parallel()
        if created_pg:
            dist.destroy_process_group()


# -- config and layer specs ------------------------------------------------------------------------------


def _moe_score_function(spec: ModelSpec) -> str:
    return spec.moe_router_score_function or ("sigmoid" if spec.moe_router_enable_expert_bias else "softmax")


def activation_func(name: str) -> Any:
    """The callable megatron-core applies for a ModelSpec activation (bias+activation fusion is off in
    :func:`transformer_config`, so the MLP calls exactly this function, gated or not). Megatron-LM's own choices
    where it has a flag: ``--openai-gelu`` (tanh GELU), ``--squared-relu``, ``--quick-geglu``."""
    import torch.nn.functional as F
    from megatron.core.activations import squared_relu
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from megatron.core.transformer.utils import openai_gelu

    funcs: dict[str, Any] = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": openai_gelu, "relu": F.relu,
                             "relu2": squared_relu, "quick_gelu": quick_gelu}
    return funcs[name]


def _attention_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """Sliding windows, NoPE layers, M-RoPE sections and the softmax scale, as TransformerConfig fields.

    Windows: transformers lets query i see keys i-w+1..i (``kv_idx > q_idx - sliding_window``); megatron-core's
    ``window_size=(left, right)`` keeps keys i-left..i+right (flash-attention convention), so ``(w - 1, 0)``.
    ``window_attn_skip_freq`` as a list: 1 = windowed layer. ``no_rope_freq`` as a list: 1 = skip RoPE."""
    kw: dict[str, Any] = {}
    if spec.window_size is not None:
        kw["window_size"] = (spec.window_size - 1, 0)
        if spec.window_layers and not all(spec.window_layers):
            kw["window_attn_skip_freq"] = [int(w) for w in spec.window_layers]
    if spec.no_rope_layers and any(spec.no_rope_layers):
        kw["no_rope_freq"] = [int(n) for n in spec.no_rope_layers]
    if spec.position_embedding_type == "mrope":
        kw["mrope_section"] = list(spec.mrope_section)
    if spec.softmax_scale is not None:
        kw["softmax_scale"] = spec.softmax_scale
    if spec.softmax_type != "vanilla":  # gpt-oss sinks: DotProductAttention.softmax_offset, one logit per head
        kw["softmax_type"] = spec.softmax_type
    if spec.position_embedding_type == "yarn":  # read by GPTModel and SelfAttention from the config (_yarn.py)
        kw.update(
            yarn_rotary_scaling_factor=spec.yarn_scaling_factor,
            yarn_original_max_position_embeddings=spec.yarn_original_max_position_embeddings,
            yarn_beta_fast=spec.yarn_beta_fast,
            yarn_beta_slow=spec.yarn_beta_slow,
            yarn_mscale=spec.yarn_mscale,
            yarn_mscale_all_dim=spec.yarn_mscale_all_dim,
            yarn_correction_range_round_to_int=spec.yarn_truncate,
        )
    return kw


def transformer_config(
    spec: ModelSpec, *, params_dtype: torch.dtype = torch.float32, device: Device = "cpu", initialize: bool = True
) -> TransformerConfig:
    """The ``TransformerConfig`` for ``spec`` under the current parallel state (sizes 1 when none)."""
    from megatron.core.transformer import TransformerConfig

    s = Parallel.current()
    kinds = spec.kinds
    has_gdn = "gated_delta_net" in kinds or (bool(spec.mtp_num_layers) and spec.mtp_layer_kind == "gated_delta_net")
    moe = bool(spec.num_moe_experts)
    kw: dict[str, Any] = {}
    if has_gdn:
        kw.update(
            experimental_attention_variant="gated_delta_net",
            linear_attention_freq=[1 if k == "gated_delta_net" else 0 for k in kinds],
            linear_conv_kernel_dim=spec.linear_conv_kernel_dim,
            linear_key_head_dim=spec.linear_key_head_dim,
            linear_value_head_dim=spec.linear_value_head_dim,
            linear_num_key_heads=spec.linear_num_key_heads,
            linear_num_value_heads=spec.linear_num_value_heads,
        )
    if "mla" in kinds or (bool(spec.mtp_num_layers) and spec.mtp_layer_kind == "mla"):
        kw.update(_mla_config(spec))
    if moe:
        kw.update(
            num_moe_experts=spec.num_moe_experts,
            moe_router_topk=spec.moe_router_topk,
            moe_ffn_hidden_size=spec.moe_ffn_hidden_size or spec.ffn_hidden_size,
            moe_shared_expert_intermediate_size=spec.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=spec.moe_shared_expert_gate,
            moe_router_enable_expert_bias=spec.moe_router_enable_expert_bias,
            moe_router_score_function=_moe_score_function(spec),
            moe_router_pre_softmax=spec.moe_router_pre_softmax,
            moe_router_topk_scaling_factor=spec.moe_router_topk_scaling_factor,
            moe_router_num_groups=spec.moe_router_num_groups,
            moe_router_group_topk=spec.moe_router_group_topk,
            moe_router_dtype=spec.moe_router_dtype,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_grouped_gemm=False,
            # the all-to-all dispatcher allocates a CUDA stream in __init__; all-gather works on gloo
            moe_token_dispatcher_type="alltoall" if s.ep > 1 and torch.cuda.is_available() else "allgather",
            moe_layer_freq=[1 if m == "moe" else 0 for m in spec.mlps],
        )
        if spec.moe_router_bias:
            kw["add_bias_linear"] = True
    kw.update(_attention_kwargs(spec))
    config_class: type[TransformerConfig] = TransformerConfig
    if kw.get("multi_latent_attention"):
        from megatron.core.transformer import MLATransformerConfig

        config_class = MLATransformerConfig
    elif "yarn_rotary_scaling_factor" in kw:
        from mapgen.runtime._yarn import YarnTransformerConfig

        config_class = YarnTransformerConfig
    return config_class(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        ffn_hidden_size=spec.ffn_hidden_size,
        add_bias_linear=kw.pop("add_bias_linear", spec.add_bias_linear),
        add_qkv_bias=spec.add_qkv_bias,
        qk_layernorm=spec.qk_layernorm,
        attention_output_gate=spec.attention_output_gate,
        normalization=spec.normalization,
        layernorm_epsilon=spec.norm_epsilon,
        layernorm_zero_centered_gamma=spec.layernorm_zero_centered_gamma,
        rotary_interleaved=spec.rotary_interleaved,
        gated_linear_unit=spec.gated_linear_unit,
        activation_func=activation_func(spec.activation),
        glu_linear_offset=spec.glu_linear_offset,
        activation_func_clamp_value=spec.activation_func_clamp_value,
        mtp_num_layers=spec.mtp_num_layers or None,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=s.tp,
        pipeline_model_parallel_size=s.pp,
        expert_model_parallel_size=s.ep,
        expert_tensor_parallel_size=s.etp,
        sequence_parallel=False,
        use_cpu_initialization=device != "cuda",
        perform_initialization=initialize and device != "meta",
        **kw,
    )


def _mla_config(spec: ModelSpec) -> dict[str, Any]:
    """``MLATransformerConfig`` fields of an MLA model (the RoPE of MLA layers is their own: plain or YaRN)."""
    return {
        "multi_latent_attention": True,
        "q_lora_rank": spec.q_lora_rank,
        "kv_lora_rank": spec.kv_lora_rank,
        "qk_head_dim": spec.qk_head_dim,
        "qk_pos_emb_head_dim": spec.qk_pos_emb_head_dim,
        "v_head_dim": spec.v_head_dim,
        "rope_type": spec.mla_rope_type,
        "rotary_base": spec.rotary_base,
        "rotary_percent": spec.rotary_percent,
        "rotary_scaling_factor": spec.yarn_scaling_factor,
        "original_max_position_embeddings": spec.yarn_original_max_position_embeddings,
        "beta_fast": spec.yarn_beta_fast,
        "beta_slow": spec.yarn_beta_slow,
        "mscale": spec.yarn_mscale,
        "mscale_all_dim": spec.yarn_mscale_all_dim,
    }


def _mla_attention(spec: ModelSpec, norm: type) -> Any:
    """``MLASelfAttention`` with megatron-core's local linears (column-parallel down/up projections, row-parallel
    output), the latent norms, and a CPU core attention that takes MLA's separate q/k and v head dims
    (:mod:`mapgen.runtime._mla`; no parameters)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from mapgen.runtime._mla import MLACoreAttention

    return ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ColumnParallelLinear,
            linear_q_up_proj=ColumnParallelLinear,
            linear_kv_down_proj=ColumnParallelLinear,
            linear_kv_up_proj=ColumnParallelLinear,
            core_attention=MLACoreAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=norm,
            kv_layernorm=norm,
        ),
    )


def _norm_class(config: TransformerConfig) -> type:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from mapgen.runtime._gdn import LocalNorm

    return LocalNorm if config.layernorm_zero_centered_gamma else WrappedTorchNorm


def _swap_norms(obj: Any, norm: type, seen: set[int] | None = None) -> Any:
    """Replace megatron's torch-norm wrapper everywhere in a (deep-copied) spec tree by ``norm``."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, ModuleSpec):
        if obj.module is WrappedTorchNorm:
            obj.module = norm
        obj.submodules = _swap_norms(obj.submodules, norm, seen)
        return obj
    if is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            v = getattr(obj, f.name)
            if v is WrappedTorchNorm:
                setattr(obj, f.name, norm)
            elif isinstance(v, list):
                setattr(obj, f.name, [norm if x is WrappedTorchNorm else _swap_norms(x, norm, seen) for x in v])
            else:
                setattr(obj, f.name, _swap_norms(v, norm, seen))
    return obj


def _layer_spec(spec: ModelSpec, config: TransformerConfig, kind: LayerKind, mlp: MlpKind) -> Any:
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel.layers import RowParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from mapgen.runtime._gdn import LayerNormColumnParallelLinear

    norm = _norm_class(config)
    base = get_gpt_layer_local_spec(
        num_experts=spec.num_moe_experts if mlp == "moe" else None,
        moe_grouped_gemm=False,
        qk_layernorm=spec.qk_layernorm,
        normalization=spec.normalization,
    )
    sub = base.submodules
    # Dist-checkpoint keys in TE spelling: the fused norms TE has (MoE layers keep pre_mlp_layernorm).
    keys_map = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"} if mlp == "dense" else {}
    if kind == "attention":
        keys_map["input_layernorm."] = "self_attention.linear_qkv.layer_norm_"
        attention, input_ln = sub.self_attention, sub.input_layernorm
    elif kind == "mla":
        # TE fuses the latent norms into the up projections (its input norm stays a separate module)
        keys_map["self_attention.q_layernorm."] = "self_attention.linear_q_up_proj.layer_norm_"
        keys_map["self_attention.kv_layernorm."] = "self_attention.linear_kv_up_proj.layer_norm_"
        attention, input_ln = _mla_attention(spec, sub.input_layernorm), sub.input_layernorm
    else:
        attention = ModuleSpec(
            module=GatedDeltaNet,
            submodules=GatedDeltaNetSubmodules(
                in_proj=LayerNormColumnParallelLinear, out_norm=norm, out_proj=RowParallelLinear
            ),
            metainfo={"fuse_input_layernorm": True},
        )
        input_ln = IdentityOp
    layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_ln,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=sub.pre_mlp_layernorm,
            mlp=sub.mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )
    return _swap_norms(copy.deepcopy(layer), norm)


def _block_spec(spec: ModelSpec, config: TransformerConfig, vp_stage: int | None) -> Any:
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    specs = [_layer_spec(spec, config, spec.kinds[i], spec.mlps[i]) for i in range(offset, offset + n)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=_norm_class(config))


def _mtp_spec(spec: ModelSpec, config: TransformerConfig, vp_stage: int | None) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    if not spec.mtp_num_layers:
        return None
    inner = _layer_spec(spec, config, spec.mtp_layer_kind, spec.mtp_mlp_kind)
    block = get_gpt_mtp_block_spec(config, inner, use_transformer_engine=False, vp_stage=vp_stage)
    return None if block is None else _swap_norms(block, _norm_class(config))


@contextlib.contextmanager
def _no_embedding_sync(active: bool) -> Iterator[None]:
    """Skip the first->last stage all-reduce of the embedding copy (meta tensors hold no values)."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    if not active:
        yield
        return
    orig = LanguageModule._is_in_embd_group
    LanguageModule._is_in_embd_group = lambda self: False
    try:
        yield
    finally:
        LanguageModule._is_in_embd_group = orig


def build_model(
    spec: ModelSpec,
    *,
    device: Device = "cpu",
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    pad_vocab_to: int = 1,
    vp_stage: int | None = None,
    initialize: bool = True,
) -> GPTModel:
    """Build the Megatron ``GPTModel`` of ``spec`` for this rank under the current parallel state.

    Uses megatron-core's local (non-TE) modules: ``get_gpt_layer_local_spec`` per layer (dense or MoE by
    ``spec.mlps``; attention or GDN by ``spec.kinds``, GDN composed by hand), the MTP block of
    ``get_gpt_mtp_block_spec`` around an inner layer of ``spec.mtp_layer_kind``/``mtp_mlp_kind``.
    ``device="meta"`` allocates nothing and skips initialisation; ``"cpu"`` initialises randomly (seeded by
    :func:`init_parallel`). ``pre_process``/``post_process`` default to first/last PP stage. The vocabulary
    is padded to a multiple of ``pad_vocab_to * tp`` (use the same ``pad_vocab_to`` when resharding).
    Without any parallel state a 1-rank state is NOT created: call :func:`init_parallel` first (or use
    :func:`enumerate_parameters` for the TP=1 name set). ``initialize=False`` leaves the parameters
    uninitialised (``torch.empty``): for callers that overwrite every one of them, as loading does.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from mapgen.runtime._gdn import fla_fallback

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_model needs megatron parallel state: call init_parallel() first")
    s = Parallel.current()
    errors = check_divisibility(spec, s.tp, s.ep, s.etp_size, s.pp, torch.distributed.get_world_size())
    if errors:
        raise ValueError("cannot build this model with this layout:\n  " + "\n  ".join(errors))
    config = transformer_config(spec, params_dtype=params_dtype, device=device, initialize=initialize)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    dev_ctx = torch.device("meta") if device == "meta" else contextlib.nullcontext()
    with cpu_shims(), fla_fallback(), dev_ctx, _no_embedding_sync(device == "meta"):
        model = GPTModel(
            config=config,
            transformer_layer_spec=_block_spec(spec, config, vp_stage),
            vocab_size=padded_vocab_size(spec.vocab_size, s.tp, pad_vocab_to),
            max_sequence_length=spec.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=not spec.untie_embeddings_and_output_weights,
            position_embedding_type=spec.position_embedding_type,
            rotary_percent=spec.rotary_percent,
            rotary_base=int(spec.rotary_base),
            rope_scaling=spec.rope_scaling,
            rope_scaling_factor=spec.rope_scaling_factor,
            mtp_block_spec=_mtp_spec(spec, config, vp_stage),
            vp_stage=vp_stage,
        )
    model.mapgen_vocab_size = spec.vocab_size
    return model


# -- parameter sets and names ----------------------------------------------------------------------------


def _checkpoint_entries(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def enumerate_parameters(spec: ModelSpec, *, pad_vocab_to: int = 1) -> dict[str, tuple[int, ...]]:
    """Global Megatron state-dict entries (name -> shape) of ``spec`` at TP=EP=PP=1, built on meta.

    Included: every tensor in ``model.state_dict()``: parameters and persistent buffers (e.g.
    ``mlp.router.expert_bias``). Excluded: ``*._extra_state`` entries (TE/FP8 metadata, ``None`` or bytes for the
    local modules, not weights) and, by construction of ``state_dict``, non-persistent buffers (RoPE
    ``inv_freq``, ``router.local_tokens_per_expert``) which are recomputed, not checkpointed. Names are the local
    (non-TE) spelling; see :func:`local_to_te_names`. If no process group exists a 1-rank gloo group is
    created and destroyed again; an existing TP=EP=PP=1 state is reused; any other state is an error.
    """
    with _single_rank_state(), cpu_shims():
        model = build_model(spec, device="meta", pad_vocab_to=pad_vocab_to)
        return {k: tuple(v.shape) for k, v in _checkpoint_entries(model).items()}


_MTP_PROBE = ModelSpec(
    num_layers=1, hidden_size=8, num_attention_heads=2, num_query_groups=1, kv_channels=4,
    ffn_hidden_size=16, vocab_size=32, mtp_num_layers=1,
)


@functools.lru_cache(maxsize=1)
def mtp_inner_name() -> str:
    """Attribute name of the MTP inner layer in the installed megatron-core (``transformer_layer`` in 0.16.1,
    ``mtp_model_layer`` in later releases), found by building a tiny meta model with MTP and reading its
    parameter names (:func:`detect_mtp_inner_name`). Under a parallel state other than TP=EP=PP=1 it reads the
    fields of ``MultiTokenPredictionLayerSubmodules`` instead. Cached.
    """
    s = Parallel.current()
    if (s.tp, s.ep, s.etp_size, s.pp) == (1, 1, 1, 1):
        found = detect_mtp_inner_name(enumerate_parameters(_MTP_PROBE))
    else:
        from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayerSubmodules

        names = {f.name for f in fields(MultiTokenPredictionLayerSubmodules)}
        found = next((n for n in MTP_INNER_NAMES if n in names), None)
    if found is None:
        raise RuntimeError("could not find the MTP inner layer attribute of this megatron-core")
    return found


def _module_global_paths(model: torch.nn.Module) -> dict[str, str]:
    """Local module path -> global module path (PP layer offsets, EP expert ids, from megatron itself)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    out: dict[str, str] = {}

    def visit(mod: torch.nn.Module, local: str, glob: str, experts: list[int] | None) -> None:
        out[local] = glob
        if isinstance(mod, MoELayer):
            experts = [int(e) for e in mod.local_expert_indices]
        for name, child in mod.named_children():
            gname = name
            if local.endswith(("decoder.layers", "mtp.layers")) and isinstance(
                child, (TransformerLayer, MultiTokenPredictionLayer)
            ):
                gname = str(child.layer_number - 1)  # 1-based global number, PP offset included
            elif local.endswith("experts.local_experts") and experts is not None:
                gname = str(experts[int(name)])
            visit(child, f"{local}.{name}" if local else name, f"{glob}.{gname}" if glob else gname, experts)

    visit(model, "", "", None)
    return out


def local_to_global(model: torch.nn.Module) -> dict[str, str]:
    """Rank-local state-dict name -> global (TP=EP=PP=1) name, for every entry :func:`enumerate_parameters`
    would list. Decoder layers use megatron's ``layer_number`` (1-based, offset by
    ``get_transformer_layer_offset``), MTP layers their ``layer_number``, routed experts the MoE layer's
    ``local_expert_indices``. With tied embeddings under PP, the last stage's ``output_layer.weight`` maps to
    ``embedding.word_embeddings.weight``. Tensor shapes stay rank-local (TP/ETP shards).
    """
    paths = _module_global_paths(model)
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    out = {}
    for key in _checkpoint_entries(model):
        mod, _, attr = key.rpartition(".")
        g = f"{paths[mod]}.{attr}" if mod else attr
        if tied and g == "output_layer.weight":
            g = "embedding.word_embeddings.weight"
        out[key] = g
    return out


# -- forward ---------------------------------------------------------------------------------------------


def logits(model: GPTModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary fp32 logits ``[b, s, vocab]`` (every rank must call it; every rank gets them).

    Passes position ids and an explicit boolean causal mask (megatron's default mask is built on CUDA),
    switches MTP off for the call (MTP needs labels), gathers the vocab-parallel shards across TP and trims
    vocabulary padding. Under PP each stage runs its layers on the hidden states the previous stage sends
    (``set_input_tensor``, as megatron-core's schedules do), and the last stage broadcasts the logits over the
    pipeline group. Runs under :func:`cpu_shims`.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mapgen.runtime._gdn import fla_fallback

    b, s = input_ids.shape
    dev = next(model.parameters()).device
    input_ids = input_ids.to(dev)
    position_ids = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    if model.position_embedding_type == "mrope":  # text only: temporal = height = width = the token index
        position_ids = position_ids.unsqueeze(0).expand(3, b, s)
    mask = torch.triu(torch.ones(b, 1, s, s, dtype=torch.bool, device=dev), diagonal=1)
    saved = (getattr(model, "mtp_process", False), model.config.mtp_num_layers)
    was_training = model.training
    pp = ps.get_pipeline_model_parallel_world_size()
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model.eval()
    try:
        model.mtp_process = False
        model.config.mtp_num_layers = None
        with cpu_shims(), fla_fallback(), torch.no_grad():
            if not first:  # the previous stage's hidden states [s, b, hidden]
                hidden = torch.empty(s, b, model.config.hidden_size, dtype=model.config.params_dtype, device=dev)
                dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
            out = model(input_ids, position_ids, attention_mask=mask)
            if not last:
                dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    finally:
        model.mtp_process, model.config.mtp_num_layers = saved
        model.train(was_training)
        if not first:
            model.set_input_tensor(None)
    if last:
        out = out.float()
        tp = ps.get_tensor_model_parallel_world_size()
        if tp > 1:
            parts = [torch.empty_like(out) for _ in range(tp)]
            dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
            out = torch.cat(parts, dim=-1)
    if pp > 1:  # the last stage's logits to every stage of this pipeline
        src = ps.get_pipeline_model_parallel_last_rank()
        group = ps.get_pipeline_model_parallel_group()
        size = torch.tensor(out.shape[-1] if last else 0, dtype=torch.int64)
        dist.broadcast(size, src=src, group=group)
        if not last:
            out = torch.empty(b, s, int(size), dtype=torch.float32, device=dev)
        dist.broadcast(out, src=src, group=group)
    vocab = int(getattr(model, "mapgen_vocab_size", out.shape[-1]))
    result: torch.Tensor = out[..., :vocab]
    return result


# -- distributed checkpoints -----------------------------------------------------------------------------


def save_dist_checkpoint(model: GPTModel, path: str | os.PathLike[str]) -> None:
    """Save ``model`` as a megatron-core dist checkpoint (torch_dist) in ``path``; all ranks must call it.

    Works on CPU/gloo under :func:`cpu_shims`. Caveat: the torch_dist writer starts a ``spawn``-context
    ``multiprocessing.Manager``, which re-imports the ``__main__`` module: a script that calls this must keep
    its process-group set-up under ``if __name__ == "__main__":`` or it hangs.
    """
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    with cpu_shims():
        dist_checkpointing.save(model.sharded_state_dict(), str(path))


class StreamingSource(Protocol):
    """What :func:`save_dist_checkpoint_streaming` asks of its caller: the real value of one rank-local
    state-dict entry (``produce``), and where it should come in the write order (``order``, e.g. the HF shard
    its data lives in). Optionally ``spans(local)``: the source file ranges (``path``, ``offset``, ``nbytes``
attributes) whose concatenation is the entry when producing it would only copy them, else ``None``; and
``copied(local, nbytes)``, told when such an entry was copied file to file instead of produced."""

    def produce(self, local: str) -> torch.Tensor: ...

    def order(self, local: str) -> tuple[Any, ...]: ...


def _exact_storage(piece: torch.Tensor) -> torch.Tensor:
    """``piece`` (a contiguous view of a larger tensor) as a tensor whose storage is exactly its bytes,
    sharing them: torch.distributed.checkpoint's writer clones any tensor with a larger storage (torch.save
    writes whole storages), which for the halves of a fused entry would be one more pass over the bytes."""
    if not piece.numel() or not piece.is_contiguous() or piece.untyped_storage().nbytes() == piece.nbytes:
        return piece
    flat = piece.reshape(-1).view(torch.uint8)
    return torch.frombuffer(flat.numpy(), dtype=torch.uint8).view(piece.dtype).view(piece.shape)


def _spans(meta: torch.Tensor, source: Any, local: str) -> Any:
    """``source.spans(local)`` for an entry laid out plainly (contiguous from its storage's start), else
    ``None`` (also for a source without ``spans``)."""
    locate = getattr(source, "spans", None)
    return locate(local) if locate is not None and meta.is_contiguous() and not meta.storage_offset() else None


def _cut(spans: Iterable[Any], start: int, nbytes: int) -> tuple[tuple[str, int, int], ...] | None:
    """Bytes ``[start, start + nbytes)`` of the concatenation of ``spans`` (``path``, ``offset``, ``nbytes``)
    as file ranges; ``None`` if they reach past its end."""
    return cut_ranges(((s.path, s.offset, s.nbytes) for s in spans), start, nbytes)


def _copied_piece(meta: torch.Tensor, spans: Any, local: str) -> _CopiedPiece | None:
    """The item ``meta`` (a view of entry ``local``) as ranges of its entry's ``spans``, if it has any."""
    if spans is None or not meta.is_contiguous():
        return None
    ranges = _cut(spans, int(meta.storage_offset()) * meta.element_size(), meta.numel() * meta.element_size())
    if ranges is None:
        raise RuntimeError(f"{local}: a checkpoint item reaches past the entry's bytes")
    return _CopiedPiece(meta, ranges)


@dataclass(frozen=True)
class _CopiedPiece:
    """A checkpoint item whose bytes are ``ranges`` (file, offset, bytes) of the source files, in order:
    ``meta`` gives its dtype and shape."""

    meta: torch.Tensor
    ranges: tuple[tuple[str, int, int], ...]


class _CopySink(io.RawIOBase):
    """The stream ``torch.save`` writes one item into: everything passes through to ``stream`` except the
    bytes of ``placeholder``'s storage (never filled), which are copied file to file from ``piece.ranges``
    into their place (``torch.save`` writes the storage record in one call, uncompressed)."""

    def __init__(self, stream: Any, placeholder: torch.Tensor, piece: _CopiedPiece, fds: dict[str, int]) -> None:
        super().__init__()
        self.stream, self.piece, self.fds = stream, piece, fds
        self.lo = placeholder.data_ptr()
        self.hi = self.lo + placeholder.nbytes
        self.copied = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        import numpy as np

        view = memoryview(b)
        at = int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0
        if not (view.nbytes and self.lo <= at < self.hi):
            return int(self.stream.write(view))
        if at + view.nbytes > self.hi:
            raise RuntimeError("torch.save wrote past a tensor's storage")
        ranges = cut_ranges(self.piece.ranges, at - self.lo, view.nbytes)
        if ranges is None:
            raise RuntimeError("torch.save wrote more of a tensor's storage than its source ranges hold")
        self.stream.flush()
        dst_at = self.stream.tell()
        self.stream.seek(copy_ranges(ranges, self.stream.fileno(), dst_at, self.fds))
        self.copied += view.nbytes
        return view.nbytes


def _write_copied(stream: Any, piece: _CopiedPiece, item: Any, storage_key: str, fds: dict[str, int]) -> Any:
    """torch.distributed.checkpoint's ``_write_item`` for a tensor item (torch.save format, no stream
    transforms) whose payload is copied file to file: the same bytes in the file, the same result."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.storage import WriteResult

    offset = stream.tell()
    placeholder = torch.empty(piece.meta.shape, dtype=piece.meta.dtype)  # never touched: no pages behind it
    sink = _CopySink(stream, placeholder, piece, fds)
    torch.save(placeholder, typing.cast(typing.IO[bytes], sink))
    if sink.copied != placeholder.nbytes:
        raise RuntimeError(f"{item.index.fqn}: torch.save wrote {sink.copied} of {placeholder.nbytes} payload bytes "
                           "in the way this copy expects")
    length = stream.tell() - offset
    return WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(storage_key, offset, length))


def _streaming_writer(path: str, copied: Any = None, fsync: bool = True) -> Any:
    """The streaming convert's torch.distributed.checkpoint writer: one file per rank, one thread.
    ``copied(planner, item)``: a :class:`_CopiedPiece` for a tensor item whose bytes lie in the source files
    (written by :func:`_write_copied`), else ``None`` (the planner's ``resolve_data``)."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, _write_item
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future as TorchFuture

    class Writer(FileSystemWriter):
        def storage_meta(self) -> Any:  # a str checkpoint id, as megatron's writer stores (no pathlib pickled)
            meta = super().storage_meta()
            if meta is not None and meta.checkpoint_id is not None:
                meta.checkpoint_id = str(meta.checkpoint_id)
            return meta

        def _write_data(self, planner: Any, file_queue: Any) -> TorchFuture[list[WriteResult]]:
            """torch's writer loop on one thread, minus its dict of every tensor written (kept for its
            safetensors format, unused here), which held the whole checkpoint in memory by the end: memory
            stays at the entries in flight. Byte items first, then tensors in plan order, as torch does."""
            results: list[WriteResult] = []
            plain = (copied is not None and not self.transforms.extensions
                     and getattr(self.serialization_format, "name", "") == "TORCH_SAVE")
            fds: dict[str, int] = {}
            try:
                while not file_queue.empty():
                    file, storage_key, items = file_queue.get_nowait()
                    with self.fs.create_stream(file, "wb") as stream:
                        for item in sorted(items, key=lambda i: i.type != WriteItemType.BYTE_IO):
                            piece = copied(planner, item) if plain and item.type != WriteItemType.BYTE_IO else None
                            if piece is not None:
                                results.append(_write_copied(stream, piece, item, storage_key, fds))
                                continue
                            results.append(_write_item(self.transforms, stream, planner.resolve_data(item), item,
                                                       storage_key, self.serialization_format))
                        if self.sync_files:
                            stream.flush()
                            os.fsync(stream.fileno())
            finally:
                for fd in fds.values():
                    os.close(fd)
            done: TorchFuture[list[WriteResult]] = TorchFuture()
            done.set_result(results)
            return done

    return Writer(path, single_file_per_rank=True, thread_count=1, sync_files=fsync)


def save_dist_checkpoint_streaming(model: GPTModel, path: str | os.PathLike[str], source: StreamingSource, *,
                                   fsync: bool = True) -> int:
    """Write the dist checkpoint of ``model`` -- built on the **meta** device -- without ever holding it:
    megatron-core's own ``dist_checkpointing.save`` plans the checkpoint from ``model.sharded_state_dict()``
    (keys, global shapes and offsets, replica ids, the factories that split fused tensors), and a
    torch.distributed.checkpoint save planner produces each write item's data only when the writer asks for
    it: ``source.produce(local_name)`` gives the rank-local entry (cached while its pieces are written) and
    the piece is the same view of it that the factory took of the meta tensor. Only main replicas are
    written, so a rank produces only what it writes. The next entry in the write order is produced on a
    second thread while this one is written (file reads and writes release the GIL), so at most two entries
    (and the one being read) are in memory. torch.save's CRC32 records are skipped for these items (one
    more pass over the bytes; ``torch.load`` does not check them). Entries the source can locate as byte
    ranges of its files (``source.spans``: whole tensors, row blocks, gate and up halves, one packed expert,
    in the entry's dtype) are not produced at all: their data records are copied file to file in the kernel
    (``copy_file_range``) into the place torch.save lays out for them. Each rank's file is fsynced before
    megatron-core writes the metadata, as megatron-core's own writer does; ``fsync=False`` leaves that to
    the kernel's writeback (the caller records it). All ranks must call it. Returns the bytes written."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    entries = _checkpoint_entries(model)
    by_storage = {t.untyped_storage()._cdata: local for local, t in entries.items()}
    written = [0]
    cache: dict[str, torch.Tensor] = {}
    pending: dict[str, Future[torch.Tensor]] = {}
    following: dict[str, str] = {}  # entry -> the next entry in the plan's write order
    direct: dict[str, Any] = {}  # entries that are byte ranges of the source files: copied in the kernel
    noted: set[str] = set()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapgen-produce")

    def owner(meta: torch.Tensor) -> str:
        local = by_storage.get(meta.untyped_storage()._cdata)
        if local is None:
            raise RuntimeError(f"a sharded tensor of shape {tuple(meta.shape)} is no view of a model entry")
        return local

    def fetch(local: str) -> torch.Tensor:
        full = source.produce(local).contiguous()
        if full.storage_offset() or full.untyped_storage().nbytes() != full.nbytes:
            full = full.clone()  # a slice of a larger tensor: own storage, so the views below hold
        want = entries[local]
        if tuple(full.shape) != tuple(want.shape) or full.dtype != want.dtype:
            raise RuntimeError(f"{local}: produced {tuple(full.shape)} {full.dtype}, the model has "
                               f"{tuple(want.shape)} {want.dtype}")
        return full

    def entry(local: str) -> torch.Tensor:
        if local not in cache:
            cache.clear()  # one entry at a time: its pieces are consecutive in the plan
            job = pending.pop(local, None) or pool.submit(fetch, local)
            for other in pending.values():  # a guess the writer did not follow
                other.cancel()
            pending.clear()
            nxt = following.get(local)
            if nxt is not None:
                pending[nxt] = pool.submit(fetch, nxt)
            cache[local] = job.result()
        return cache[local]

    class Planner(MCoreSavePlanner):  # type: ignore[misc]
        def create_local_plan(self) -> SavePlan:
            plan: SavePlan = super().create_local_plan()
            owners: dict[int, str] = {}

            def key(item: WriteItem) -> tuple[Any, ...]:
                if item.type == WriteItemType.BYTE_IO:
                    return ((), item.index.fqn)
                local = owner(self.lookup_object(item.index))
                owners[id(item)] = local
                return (source.order(local), local, item.index.fqn, tuple(item.index.offset or ()))

            plan.items.sort(key=key)  # the writer writes in plan order: HF shard by shard
            order = list(dict.fromkeys(owners[id(i)] for i in plan.items if id(i) in owners))
            direct.update((local, found) for local in order if (found := _spans(entries[local], source, local)))
            following.update(itertools.pairwise([local for local in order if local not in direct]))
            self.plan = plan
            return plan

        def copied(self, write_item: WriteItem) -> _CopiedPiece | None:
            """The source byte ranges of a tensor item of an entry that is a plain copy (``source.spans``)."""
            meta = self.lookup_object(write_item.index)
            local = owner(meta)
            piece = _copied_piece(meta, direct.get(local), local)
            if piece is not None:
                written[0] += meta.numel() * meta.element_size()
                if local not in noted:
                    noted.add(local)
                    source.copied(local, sum(span.nbytes for span in direct[local]))  # type: ignore[attr-defined]
            return piece

        def resolve_data(self, write_item: WriteItem) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            meta = self.lookup_object(write_item.index)
            piece = entry(owner(meta)).as_strided(meta.size(), meta.stride(), meta.storage_offset())
            written[0] += piece.numel() * piece.element_size()
            return _exact_storage(piece)

    class Strategy(TorchDistSaveShardedStrategy):  # type: ignore[misc]
        def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
            dcp_save(pyt_state_dict,
                     storage_writer=_streaming_writer(str(checkpoint_dir), lambda plan, item: plan.copied(item), fsync),
                     planner=Planner(dedup_replicated_tensors=False, flatten_state_dict=False,
                                     can_run_decentralized_global_plan=False))

    os.makedirs(path, exist_ok=True)
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        with cpu_shims():
            dist_checkpointing.save(model.sharded_state_dict(), str(path), sharded_strategy=Strategy("torch_dist", 1))
    finally:
        torch.serialization.set_crc32_options(crc)
        for job in pending.values():
            job.cancel()
        pool.shutdown(wait=True)
        cache.clear()
    return written[0]


def planned_writes(model: GPTModel) -> dict[str, int]:
    """Bytes this rank writes into a dist checkpoint of ``model`` (meta is fine), per local state-dict entry:
    the main replicas of its sharded state dict after megatron's factories, as
    :func:`save_dist_checkpoint_streaming` writes them. Entries other ranks write are absent."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    entries = _checkpoint_entries(model)
    by_storage = {t.untyped_storage()._cdata: local for local, t in entries.items()}
    with cpu_shims():
        sharded = model.sharded_state_dict()
        apply_factories(sharded)
    out: dict[str, int] = {}
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor) and sh.data is not None and is_main_replica(sh.replica_id):
            local = by_storage.get(sh.data.untyped_storage()._cdata)
            if local is not None:
                out[local] = out.get(local, 0) + sh.data.numel() * sh.data.element_size()
    return out


def _key_groups(model: GPTModel) -> dict[str, set[str]]:
    """Local entry -> the entries whose sharded tensors share a checkpoint key with it (cached on the model)."""
    cached: dict[str, set[str]] | None = getattr(model, "_mapgen_key_groups", None)
    if cached is not None:
        return cached
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    entries = _checkpoint_entries(model)
    by_storage = {t.untyped_storage()._cdata: local for local, t in entries.items()}
    with cpu_shims():
        sharded = model.sharded_state_dict()
        apply_factories(sharded)
    by_key: dict[str, set[str]] = {}
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor) and sh.data is not None:
            local = by_storage.get(sh.data.untyped_storage()._cdata)
            if local is not None:
                by_key.setdefault(sh.key, set()).add(local)
    parent = {local: local for local in entries}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for members in by_key.values():
        first, *rest = sorted(members)
        for other in rest:
            parent[root(other)] = root(first)
    classes: dict[str, set[str]] = {}
    for local in entries:
        classes.setdefault(root(local), set()).add(local)
    groups = {local: classes[root(local)] for local in entries}
    model._mapgen_key_groups = groups
    return groups


def _direct_reader(path: str, located: list[tuple[int, int, str, int]] | None = None) -> Any:
    """A torch.distributed.checkpoint ``FileSystemReader`` that reads a tensor item's bytes straight into its
    destination with ``os.preadv`` when the item is the whole destination (same dtype and shape, both
    contiguous, little-endian, one storage record): torch's reader ``torch.load``s every item into a fresh
    tensor and copies it over, two passes and a fresh allocation per item. Other items take torch's path.
    With ``located``, nothing is read: each such item appends ``(destination address, bytes, file, offset)``
    of its data record, and every other item is left unread."""
    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.futures import Future as TorchFuture

    class DirectReader(FileSystemReader):
        def _direct(self, stream: Any, fd: int, req: Any, planner: Any) -> bool:
            info = self.storage_data[req.storage_index]
            if info.transform_descriptors or req.type == LoadItemType.BYTE_IO:
                return False
            view = self._slice_file(stream, info)
            archive = torch._C.PyTorchFileReader(view)
            records = archive.get_all_records()
            data = [r for r in records if r.startswith("data/")]
            if len(data) != 1 or ("byteorder" in records and bytes(archive.get_record("byteorder")) != b"little"):
                return False
            view.seek(0)
            meta = torch.load(view, map_location="meta", weights_only=True)
            target = planner.resolve_tensor(req).detach()
            if not (isinstance(meta, torch.Tensor) and meta.is_contiguous() and target.is_contiguous()
                    and meta.storage_offset() == 0 and meta.untyped_storage().nbytes() == meta.nbytes
                    and meta.dtype == target.dtype and tuple(meta.shape) == tuple(target.shape)
                    and tuple(req.lengths) == tuple(meta.shape) and target.device.type == "cpu"):
                if located is not None:
                    return True
                # torch's path for this item, here: the planner wants commit_tensor right after resolve_tensor
                view.seek(0)
                loaded = narrow_tensor_by_index(torch.load(view, map_location="cpu", weights_only=True),
                                                req.storage_offsets, req.lengths)
                target.copy_(loaded)
                planner.commit_tensor(req, target)
                return True
            buf = target.reshape(-1).view(torch.uint8).numpy().data if target.numel() else None
            at, done = info.offset + archive.get_record_offset(data[0]), 0  # type: ignore[attr-defined]
            if located is not None:
                file = str(self.fs.concat_path(self.path, info.relative_path))
                located.append((target.data_ptr(), target.nbytes, file, at))
                return True
            while buf is not None and done < buf.nbytes:
                n = os.preadv(fd, [buf[done:]], at + done)
                if n <= 0:
                    raise OSError(f"{info.relative_path}: item {req.storage_index.fqn} is cut short")
                done += n
            planner.commit_tensor(req, target)
            return True

        def read_data(self, plan: Any, planner: Any) -> TorchFuture[None]:
            per_file: dict[str, list[Any]] = {}
            for req in plan.items:
                per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
            rest = []
            for relative, reqs in per_file.items():
                with open(self.fs.concat_path(self.path, relative), "rb") as stream:
                    rest += [r for r in reqs if not self._direct(stream, stream.fileno(), r, planner)]
            if rest:
                return super().read_data(type(plan)(rest), planner)
            done: TorchFuture[None] = TorchFuture()
            done.set_result(None)
            return done

    return DirectReader(path)


def _merge_in_place(data: torch.Tensor, merge: Any) -> Any:
    """A factory's merge that returns ``data`` itself when the loaded pieces are ``data``'s own memory laid
    out as their dim-0 concatenation (megatron's gated ``linear_fc1`` factory loads ``chunk(data, 2)`` in
    place and merges with ``torch.cat``: a copy of what ``data`` already holds). Anything else merges as
    megatron does."""

    def merged(pieces: Any) -> Any:
        if isinstance(pieces, list) and pieces and data.is_contiguous() and all(
                isinstance(p, torch.Tensor) and p.is_contiguous() and p.dtype == data.dtype
                and p.shape[1:] == data.shape[1:] for p in pieces):
            at = data.data_ptr()
            for p in pieces:
                if p.data_ptr() != at:
                    break
                at += p.nbytes
            else:
                if at == data.data_ptr() + data.nbytes and sum(p.shape[0] for p in pieces) == data.shape[0]:
                    return data
        return merge(pieces)

    return merged


def locate_dist_entries(model: GPTModel, path: str | os.PathLike[str],
                        names: Iterable[str]) -> dict[str, tuple[tuple[str, int, int], ...] | None]:
    """Where the bytes of each entry ``names`` (local state-dict names of ``model``, on the **meta** device) lie
    in the dist checkpoint, without reading them: the file ranges ``(path, offset, bytes)`` whose concatenation
    is the entry as :func:`load_dist_entries` returns it, or ``None`` where that is not a plain copy of whole
    checkpoint items' data records (another dtype, a column chunk of a row-parallel matrix, a merge that is
    not in place). megatron-core and torch.distributed.checkpoint plan the load as for reading (the same
    resharding, factories and merges); the reader records each item's data record instead of reading it
    into the untouched destination, and a range counts only if the entry's own memory is tiled by them."""
    located: list[tuple[int, int, str, int]] = []
    loaded = load_dist_entries(model, path, names, located=located)
    located.sort()
    out: dict[str, tuple[tuple[str, int, int], ...] | None] = {}
    for name, tensor in loaded.items():
        lo, hi = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
        ranges: list[tuple[str, int, int]] = []
        at = lo
        for ptr, nbytes, file, offset in located:
            if lo <= ptr < hi and ptr == at and ptr + nbytes <= hi:
                ranges.append((file, offset, nbytes))
                at += nbytes
        out[name] = tuple(ranges) if tensor.is_contiguous() and tensor.nbytes and at == hi else None
    return out


def load_dist_entries(model: GPTModel, path: str | os.PathLike[str], names: Iterable[str], *,
                      located: list[tuple[int, int, str, int]] | None = None) -> dict[str, torch.Tensor]:
    """Read only the entries ``names`` (local state-dict names) of ``model`` -- built on the **meta** device --
    from a dist checkpoint, on this rank alone (no collectives: each rank may read a different subset).
    megatron-core does the mapping (``sharded_state_dict``, factories and their merges, resharding from any
    saved layout); torch.distributed.checkpoint reads the chunks. Returns fresh CPU tensors. ``located``: see
    :func:`locate_dist_entries` (nothing is read; the tensors returned are left unfilled)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreLoadPlanner,
        TorchDistLoadShardedStrategy,
        _replace_sharded_keys_with_state_dict_keys,
        _replace_state_dict_keys_with_sharded_keys,
        _restore_dict_types,
        _unwrap_pyt_sharded_tensor,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    entries = _checkpoint_entries(model)
    groups = _key_groups(model)
    # torch's ShardedTensor wants every local shard of a key: experts of one layer share a key (an expert
    # axis), so asking for one expert loads its layer's others too; the caller gets what it asked for.
    asked = set(names)
    wanted = set().union(*(groups.get(n, {n}) for n in asked)) if asked else set()
    saved: dict[str, tuple[dict[str, Any], str, Any]] = {}
    for name in wanted:  # real storage for the entries asked for; the rest of the model stays on meta
        t = entries[name]
        mod_path, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_path) if mod_path else model
        table = module._parameters if attr in module._parameters else module._buffers
        saved[name] = (table, attr, table[attr])
        real = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        table[attr] = torch.nn.Parameter(real, requires_grad=False) if table is module._parameters else real

    class Local(TorchDistLoadShardedStrategy):  # type: ignore[misc]
        def load(self, sharded_state_dict: Any, checkpoint_dir: Any) -> Any:
            orig = sharded_state_dict
            flat, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
            pyt = mcore_to_pyt_state_dict(flat, True)
            checks = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
            dcp_load(pyt, storage_reader=_direct_reader(str(checkpoint_dir), located),
                     planner=MCoreLoadPlanner(shapes_validation_sharded_tensors=checks), no_dist=True)
            out = {k: _unwrap_pyt_sharded_tensor(v) for k, v in pyt.items()}
            out = _replace_sharded_keys_with_state_dict_keys(out, flat_mapping, rename_mapping)
            _restore_dict_types(out, orig)
            return out

    try:
        with cpu_shims():
            sharded = {k: v for k, v in model.sharded_state_dict().items() if k in wanted}
            missing = wanted - set(sharded)
            if missing or not all(isinstance(v, (ShardedTensor, ShardedTensorFactory)) for v in sharded.values()):
                raise RuntimeError(f"entries without a plain sharded tensor: {sorted(missing)[:3]}")
            for value in sharded.values():
                if isinstance(value, ShardedTensorFactory):
                    value.merge_fn = _merge_in_place(value.data, value.merge_fn)
            state = dist_checkpointing.load(sharded, str(path), sharded_strategy=Local(),
                                            validate_access_integrity=False)
        return {name: state[name] for name in asked}
    finally:
        for table, attr, original in saved.values():
            table[attr] = original


def load_dist_checkpoint(model: GPTModel, path: str | os.PathLike[str], *, strict: bool = True) -> None:
    """Load a dist checkpoint into ``model`` in place, resharding to the model's TP/EP/PP layout.

    The checkpoint may have been saved under any layout (e.g. TP=2/EP=2 on two ranks, loaded at TP=1 in
    one process), as long as the global shapes (including the padded vocabulary) agree.
    """
    from megatron.core import dist_checkpointing

    with cpu_shims():
        state = dist_checkpointing.load(model.sharded_state_dict(), str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if strict and (missing or unexpected):
        raise RuntimeError(f"dist checkpoint mismatch: missing={missing} unexpected={unexpected}")


def set_param_dtypes(model: torch.nn.Module, want: dict[str, torch.dtype], base: torch.dtype) -> None:
    """Put every floating parameter in ``want[global name]``, else ``base`` -- including those megatron's
    local modules create in fp32 whatever ``params_dtype`` (torch norms; Megatron-LM's ``Float16Module``
    casts them for training the same way). Buffers change only when named in ``want``: megatron keeps some
    in a fixed dtype of its own (the router's fp32 expert bias). Values are converted (uninitialised or
    meta tensors stay so)."""
    names = local_to_global(model)
    for local, tensor in _checkpoint_entries(model).items():
        is_param = isinstance(tensor, torch.nn.Parameter)
        dtype = want.get(names[local], base if is_param else None)
        if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
            continue
        mod_path, _, attr = local.rpartition(".")
        module = model.get_submodule(mod_path) if mod_path else model
        if is_param:
            tensor.data = tensor.data.to(dtype)
        else:
            module._buffers[attr] = tensor.to(dtype)
