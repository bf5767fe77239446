"""Megatron-LM command-line arguments for a converted checkpoint, and their honest inverse.

``convert`` writes ``megatron_args.txt`` next to the checkpoint: the Megatron-LM (``pretrain_gpt.py``)
arguments that build the model the checkpoint holds -- architecture, MoE, MTP, GDN, RoPE, norms, vocabulary
padding, the parallel sizes it was written at, the dtype -- and the loading flags (``--load``,
``--ckpt-format torch_dist``). megatron-core has no argument parser, so :func:`spec_from_args` is a small
parser for exactly these flags, mapping them the way Megatron-LM's ``core_transformer_config_from_args``
does (same-named fields; ``--swiglu`` = gated SiLU; ``--apply-layernorm-1p`` = zero-centred gamma;
``--norm-epsilon`` = ``layernorm_epsilon``; ``--num-experts`` = ``num_moe_experts``; ``--disable-bias-linear``;
list-valued ``--linear-attention-freq``/``--moe-layer-freq`` as Python list expressions). The tests build a
model from the parsed arguments alone and load the checkpoint into it with ``dist_checkpointing.load``.

What Megatron-LM has no flag for, and how it decides it instead (so the parser does the same):
the MTP inner layer is an attention layer (MLA in an MLA model) whose MLP is the last decoder layer's kind; the layer
implementation (TE or local) is the trainer's choice, and the checkpoint keys are TE-spelled either way.
"""

from __future__ import annotations

import ast
import shlex
from collections.abc import Sequence
from typing import Any

from mapgen.contract.spec import Activation, LayerKind, MlpKind, ModelSpec

ARGS_FILE = "megatron_args.txt"
DIVISIBLE_BY = 128  # mapgen pads the vocabulary like Megatron-LM's default --make-vocab-size-divisible-by


class ArgsError(ValueError):
    """A spec that no Megatron-LM flag can express, or arguments this parser does not know."""


def _freq(values: Sequence[int]) -> str:
    return "[" + ",".join(str(int(v)) for v in values) + "]"


# (gated MLP, activation) -> the Megatron-LM flags that build it (core_transformer_config_from_args). Megatron-LM
# turns bias+activation fusion on with --bias-gelu-fusion's default; megatron-core fuses only GELU and SwiGLU (a
# fused quick-GeGLU or squared ReLU is a ValueError), so those two switch it off.
_ACTIVATION_FLAGS: dict[tuple[bool, str], list[str]] = {
    (True, "silu"): ["--swiglu"], (True, "quick_gelu"): ["--quick-geglu", "--no-bias-gelu-fusion"],
    (False, "relu2"): ["--squared-relu", "--no-bias-gelu-fusion"], (False, "gelu"): [],
}


def canonical(spec: ModelSpec) -> ModelSpec:
    """``spec`` with its defaults spelled out (per-layer kinds, the router's score function), so that two
    specs that build the same model compare equal."""
    score = spec.moe_router_score_function or ("sigmoid" if spec.moe_router_enable_expert_bias else "softmax")
    windows = spec.window_layers if spec.window_size is not None and not all(spec.window_layers) else ()
    return spec.replace(layer_kinds=spec.kinds, mlp_kinds=spec.mlps,
                        moe_router_score_function=score if spec.num_moe_experts else None, window_layers=windows,
                        no_rope_layers=spec.no_rope_layers if any(spec.no_rope_layers) else ())


def _moe_args(spec: ModelSpec) -> list[str]:
    """The MoE flags (routing included: :mod:`mapgen.contract.routing`)."""
    a = ["--num-experts", str(spec.num_moe_experts),
         "--moe-layer-freq", _freq([m == "moe" for m in spec.mlps]),
         "--moe-router-topk", str(spec.moe_router_topk),
         "--moe-ffn-hidden-size", str(spec.moe_ffn_hidden_size or spec.ffn_hidden_size),
         "--moe-router-score-function", spec.moe_router_score_function
         or ("sigmoid" if spec.moe_router_enable_expert_bias else "softmax"),
         "--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0.0"]
    if spec.moe_shared_expert_intermediate_size:
        a += ["--moe-shared-expert-intermediate-size", str(spec.moe_shared_expert_intermediate_size)]
    if spec.moe_shared_expert_gate:
        a.append("--moe-shared-expert-gate")
    if spec.moe_router_enable_expert_bias:
        a.append("--moe-router-enable-expert-bias")
    if spec.moe_router_pre_softmax:
        a.append("--moe-router-pre-softmax")
    if spec.moe_router_topk_scaling_factor is not None:
        a += ["--moe-router-topk-scaling-factor", repr(float(spec.moe_router_topk_scaling_factor))]
    if spec.moe_router_num_groups is not None:
        a += ["--moe-router-num-groups", str(spec.moe_router_num_groups)]
    if spec.moe_router_group_topk is not None:
        a += ["--moe-router-group-topk", str(spec.moe_router_group_topk)]
    if spec.moe_router_dtype is not None:
        a += ["--moe-router-dtype", spec.moe_router_dtype]
    return a


def megatron_args(spec: ModelSpec, *, tp: int = 1, pp: int = 1, ep: int = 1, etp: int = 1,
                  dtype: str = "float32", load: str | None = None) -> list[str]:
    """The Megatron-LM arguments that build ``spec`` at this parallel layout and dtype. Per-tensor dtype
    exceptions (fp32 ``A_log``) have no flag: Megatron-LM builds every parameter in the run's dtype and
    ``dist_checkpointing.load`` converts on load."""
    if spec.moe_router_bias:
        raise ArgsError("a router bias has no Megatron-LM flag of its own (it comes with --add-bias-linear)")
    activation = _ACTIVATION_FLAGS.get((spec.gated_linear_unit, spec.activation))
    if activation is None:
        raise ArgsError(f"a{' gated' if spec.gated_linear_unit else ''} MLP with {spec.activation} has no Megatron-LM "
                        "flag (it has --swiglu, --quick-geglu, --squared-relu and the plain GELU default)")
    if spec.softmax_scale is not None:
        raise ArgsError(f"an attention softmax scale of {spec.softmax_scale} has no Megatron-LM flag "
                        "(TransformerConfig.softmax_scale is not an argument)")
    if spec.position_embedding_type == "yarn":
        raise ArgsError("YaRN RoPE on standard attention: GPTModel reads the yarn_* config fields, which no "
                        "Megatron-LM flag this parser knows sets (--rotary-scaling-factor and friends size MLA's)")
    a: list[str] = [
        "--num-layers", str(spec.num_layers),
        "--hidden-size", str(spec.hidden_size),
        "--ffn-hidden-size", str(spec.ffn_hidden_size),
        "--num-attention-heads", str(spec.num_attention_heads),
        "--kv-channels", str(spec.kv_channels),
        "--group-query-attention", "--num-query-groups", str(spec.num_query_groups),
        "--max-position-embeddings", str(spec.max_position_embeddings),
        "--seq-length", str(min(4096, spec.max_position_embeddings)),
        "--position-embedding-type", spec.position_embedding_type,
        "--rotary-base", str(int(spec.rotary_base)) if float(spec.rotary_base).is_integer() else repr(spec.rotary_base),
        "--rotary-percent", repr(float(spec.rotary_percent)),
        "--normalization", spec.normalization,
        "--norm-epsilon", repr(float(spec.norm_epsilon)),
        "--vocab-size", str(spec.vocab_size),
        "--make-vocab-size-divisible-by", str(DIVISIBLE_BY),
    ]
    if spec.rope_scaling:
        a += ["--use-rope-scaling", "--rope-scaling-factor", repr(float(spec.rope_scaling_factor))]
    if spec.layernorm_zero_centered_gamma:
        a.append("--apply-layernorm-1p")
    if spec.rotary_interleaved:
        a.append("--rotary-interleaved")
    a += activation
    a += _position_args(spec)
    if not spec.add_bias_linear:
        a.append("--disable-bias-linear")
    if spec.add_qkv_bias:
        a.append("--add-qkv-bias")
    if spec.qk_layernorm:
        a.append("--qk-layernorm")
    if spec.attention_output_gate:
        a.append("--attention-output-gate")
    if spec.softmax_type != "vanilla":
        a += ["--softmax-type", spec.softmax_type]
    if spec.glu_linear_offset:
        a += ["--glu-linear-offset", repr(float(spec.glu_linear_offset))]
    if spec.activation_func_clamp_value is not None:
        a += ["--activation-func-clamp-value", repr(float(spec.activation_func_clamp_value))]
    if spec.untie_embeddings_and_output_weights:
        a.append("--untie-embeddings-and-output-weights")
    if "gated_delta_net" in spec.kinds:
        a += ["--experimental-attention-variant", "gated_delta_net",
              "--linear-attention-freq", _freq([k == "gated_delta_net" for k in spec.kinds]),
              "--linear-conv-kernel-dim", str(spec.linear_conv_kernel_dim),
              "--linear-key-head-dim", str(spec.linear_key_head_dim),
              "--linear-value-head-dim", str(spec.linear_value_head_dim),
              "--linear-num-key-heads", str(spec.linear_num_key_heads),
              "--linear-num-value-heads", str(spec.linear_num_value_heads)]
    if "mla" in spec.kinds:
        a += _mla_args(spec)
    if spec.num_moe_experts:
        a += _moe_args(spec)
    if spec.mtp_num_layers:
        a += ["--mtp-num-layers", str(spec.mtp_num_layers)]
    a += ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
          "--expert-model-parallel-size", str(ep), "--expert-tensor-parallel-size", str(etp)]
    if dtype == "bfloat16":
        a.append("--bf16")
    elif dtype == "float16":
        a.append("--fp16")
    if load is not None:
        a += ["--load", load, "--ckpt-format", "torch_dist", "--no-load-optim", "--no-load-rng", "--finetune"]
    return a


def _mla_args(spec: ModelSpec) -> list[str]:
    """Multi-latent attention (Megatron-LM's MLA flags; the YaRN ones only for ``--rope-type yarn``)."""
    if set(spec.kinds) != {"mla"}:
        raise ArgsError("MLA beside other attention kinds has no Megatron-LM flag")
    a = ["--multi-latent-attention"]
    if spec.q_lora_rank is not None:
        a += ["--q-lora-rank", str(spec.q_lora_rank)]
    a += ["--kv-lora-rank", str(spec.kv_lora_rank), "--qk-head-dim", str(spec.qk_head_dim),
          "--qk-pos-emb-head-dim", str(spec.qk_pos_emb_head_dim), "--v-head-dim", str(spec.v_head_dim),
          "--rope-type", spec.mla_rope_type]
    if spec.mla_rope_type == "yarn":
        a += ["--rotary-scaling-factor", repr(float(spec.yarn_scaling_factor)),
              "--original-max-position-embeddings", str(spec.yarn_original_max_position_embeddings),
              "--beta-fast", repr(float(spec.yarn_beta_fast)), "--beta-slow", repr(float(spec.yarn_beta_slow)),
              "--mscale", repr(float(spec.yarn_mscale)), "--mscale-all-dim", repr(float(spec.yarn_mscale_all_dim))]
    return a


def _mla_fields(a: dict[str, Any]) -> dict[str, Any]:
    if not a.get("multi_latent_attention"):
        return {}
    yarn = a.get("rope_type", "yarn") == "yarn"  # Megatron-LM: MLA takes YaRN by default
    return {
        "q_lora_rank": int(a["q_lora_rank"]) if "q_lora_rank" in a else None,
        "kv_lora_rank": int(a["kv_lora_rank"]), "qk_head_dim": int(a["qk_head_dim"]),
        "qk_pos_emb_head_dim": int(a["qk_pos_emb_head_dim"]), "v_head_dim": int(a["v_head_dim"]),
        "mla_rope_type": "yarn" if yarn else "rope",
        **({"yarn_scaling_factor": float(a.get("rotary_scaling_factor", 1.0)),
            "yarn_original_max_position_embeddings": int(a.get("original_max_position_embeddings", 4096)),
            "yarn_beta_fast": float(a.get("beta_fast", 32)), "yarn_beta_slow": float(a.get("beta_slow", 1)),
            "yarn_mscale": float(a.get("mscale", 1.0)), "yarn_mscale_all_dim": float(a.get("mscale_all_dim", 0.0))}
           if yarn else {}),
    }


def _position_args(spec: ModelSpec) -> list[str]:
    """M-RoPE sections, the sliding window (megatron-core ``(left, right)``) and its layers, NoPE layers."""
    a: list[str] = []
    if spec.position_embedding_type == "mrope":
        a += ["--mrope-section", *(str(int(x)) for x in spec.mrope_section)]
    if spec.window_size is not None:
        a += ["--window-size", f"{spec.window_size - 1},0"]
        if spec.window_layers and not all(spec.window_layers):
            a += ["--window-attn-skip-freq", _freq(spec.window_layers)]
    if spec.no_rope_layers and any(spec.no_rope_layers):
        a += ["--no-rope-freq", _freq(spec.no_rope_layers)]
    return a


_FLAGS = {"--group-query-attention", "--use-rope-scaling", "--apply-layernorm-1p", "--rotary-interleaved", "--swiglu",
          "--quick-geglu",
          "--squared-relu", "--no-bias-gelu-fusion",
          "--disable-bias-linear", "--add-qkv-bias", "--qk-layernorm", "--attention-output-gate",
          "--untie-embeddings-and-output-weights", "--moe-shared-expert-gate", "--moe-router-enable-expert-bias",
          "--moe-router-pre-softmax", "--bf16", "--fp16", "--no-load-optim", "--no-load-rng", "--finetune",
          "--multi-latent-attention"}


_MULTI = {"--mrope-section"}  # nargs='+'


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``--name value`` / ``--flag`` -> ``{"name": value or True}`` (underscored names, as argparse makes them)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ArgsError(f"unexpected argument {arg!r}")
        name = arg[2:].replace("-", "_")
        if arg in _FLAGS:
            out[name] = True
            i += 1
        elif arg in _MULTI:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            out[name] = list(argv[i + 1:j])
            i = j
        else:
            if i + 1 >= len(argv):
                raise ArgsError(f"{arg} needs a value")
            out[name] = argv[i + 1]
            i += 2
    return out


def _list(expr: str, n: int, what: str) -> list[int]:
    value = ast.literal_eval(expr)
    if isinstance(value, int):  # Megatron-LM: an int N means every N-th layer (1-based)
        value = [1 if (i + 1) % value == 0 else 0 for i in range(n)]
    if not isinstance(value, list) or len(value) != n:
        raise ArgsError(f"{what} must list {n} layers, got {expr!r}")
    return [int(v) for v in value]


def spec_from_args(argv: Sequence[str]) -> tuple[ModelSpec, dict[str, Any]]:
    """The :class:`ModelSpec` these Megatron-LM arguments build (in :func:`canonical` form), and the run
    settings (parallel sizes, dtype, ``load``). Unknown arguments are refused, not ignored."""
    a = parse_args(argv)
    known = {"num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
             "group_query_attention", "num_query_groups", "max_position_embeddings", "seq_length",
             "position_embedding_type", "rotary_base", "rotary_percent", "normalization", "norm_epsilon",
             "vocab_size", "make_vocab_size_divisible_by", "use_rope_scaling", "rope_scaling_factor",
             "apply_layernorm_1p", "rotary_interleaved", "swiglu", "disable_bias_linear", "add_qkv_bias",
             "qk_layernorm",
             "attention_output_gate", "untie_embeddings_and_output_weights", "experimental_attention_variant",
             "linear_attention_freq", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
             "linear_num_key_heads", "linear_num_value_heads", "num_experts", "moe_layer_freq", "moe_router_topk",
             "moe_ffn_hidden_size", "moe_router_score_function", "moe_router_load_balancing_type",
             "moe_aux_loss_coeff", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
             "moe_router_enable_expert_bias", "moe_router_pre_softmax", "moe_router_topk_scaling_factor",
             "moe_router_num_groups", "moe_router_group_topk", "moe_router_dtype",
             "mtp_num_layers", "tensor_model_parallel_size", "pipeline_model_parallel_size",
             "expert_model_parallel_size", "expert_tensor_parallel_size", "bf16", "fp16", "load", "ckpt_format",
             "no_load_optim", "no_load_rng", "finetune", "quick_geglu", "squared_relu", "no_bias_gelu_fusion",
             "mrope_section", "window_size", "window_attn_skip_freq", "no_rope_freq", "multi_latent_attention",
             "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
             "rotary_scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "softmax_type", "glu_linear_offset", "activation_func_clamp_value"}
    unknown = sorted(set(a) - known)
    if unknown:
        raise ArgsError(f"arguments this parser does not map: {', '.join('--' + u.replace('_', '-') for u in unknown)}")
    if a.get("softmax_type", "vanilla") not in ("vanilla", "learnable"):
        raise ArgsError(f"--softmax-type {a['softmax_type']} is not mapped (vanilla and learnable are)")
    position = a.get("position_embedding_type", "learned_absolute")
    if position not in ("rope", "mrope", "learned_absolute"):
        raise ArgsError("only --position-embedding-type rope, mrope and learned_absolute are mapped")
    n = int(a["num_layers"])
    heads = int(a["num_attention_heads"])
    gdn: LayerKind = "gated_delta_net"
    attention: LayerKind = "attention"
    if a.get("multi_latent_attention"):
        attention = "mla"
    kinds: tuple[LayerKind, ...] = (attention,) * n
    if a.get("experimental_attention_variant") == "gated_delta_net":
        kinds = tuple(gdn if f else attention for f in _list(a["linear_attention_freq"], n, "--linear-attention-freq"))
    experts = int(a["num_experts"]) if "num_experts" in a else None
    dense: MlpKind = "dense"
    moe: MlpKind = "moe"
    mlps: tuple[MlpKind, ...] = (dense,) * n
    if experts:
        mlps = tuple(moe if f else dense for f in _list(a.get("moe_layer_freq", "1"), n, "--moe-layer-freq"))

    def opt_int(name: str) -> int | None:
        return int(a[name]) if name in a else None

    mtp = opt_int("mtp_num_layers")
    last_mlp: MlpKind = mlps[-1]
    spec = ModelSpec(
        num_layers=n,
        hidden_size=int(a["hidden_size"]),
        num_attention_heads=heads,
        num_query_groups=int(a["num_query_groups"]) if a.get("group_query_attention") else heads,
        kv_channels=int(a["kv_channels"]),
        ffn_hidden_size=int(a["ffn_hidden_size"]),
        vocab_size=int(a["vocab_size"]),
        max_position_embeddings=int(a["max_position_embeddings"]),
        layer_kinds=kinds,
        mlp_kinds=mlps,
        add_qkv_bias=bool(a.get("add_qkv_bias")),
        add_bias_linear=not a.get("disable_bias_linear"),
        qk_layernorm=bool(a.get("qk_layernorm")),
        attention_output_gate=bool(a.get("attention_output_gate")),
        softmax_type="learnable" if a.get("softmax_type") == "learnable" else "vanilla",
        glu_linear_offset=float(a.get("glu_linear_offset", 0.0)),
        activation_func_clamp_value=(float(a["activation_func_clamp_value"])
                                     if "activation_func_clamp_value" in a else None),
        rotary_base=float(a.get("rotary_base", 10000)),
        rotary_percent=float(a.get("rotary_percent", 1.0)),
        rope_scaling=bool(a.get("use_rope_scaling")),
        rope_scaling_factor=float(a.get("rope_scaling_factor", 8.0)),
        normalization=a.get("normalization", "LayerNorm"),
        norm_epsilon=float(a.get("norm_epsilon", 1e-5)),
        layernorm_zero_centered_gamma=bool(a.get("apply_layernorm_1p")),
        rotary_interleaved=bool(a.get("rotary_interleaved")),
        gated_linear_unit=bool(a.get("swiglu") or a.get("quick_geglu")),
        activation=_activation(a),
        window_size=int(a["window_size"].split(",")[0]) + 1 if "window_size" in a else None,
        window_layers=(tuple(bool(f) for f in _list(a["window_attn_skip_freq"], n, "--window-attn-skip-freq"))
                       if "window_attn_skip_freq" in a else ()),
        no_rope_layers=(tuple(bool(f) for f in _list(a["no_rope_freq"], n, "--no-rope-freq"))
                        if "no_rope_freq" in a else ()),
        position_embedding_type=position,
        mrope_section=tuple(int(x) for x in a.get("mrope_section", ())),
        untie_embeddings_and_output_weights=bool(a.get("untie_embeddings_and_output_weights")),
        num_moe_experts=experts,
        moe_router_topk=int(a.get("moe_router_topk", 2 if experts else 1)),
        moe_ffn_hidden_size=opt_int("moe_ffn_hidden_size"),
        moe_shared_expert_intermediate_size=opt_int("moe_shared_expert_intermediate_size"),
        moe_shared_expert_gate=bool(a.get("moe_shared_expert_gate")),
        moe_router_enable_expert_bias=bool(a.get("moe_router_enable_expert_bias")),
        moe_router_score_function=a.get("moe_router_score_function") if experts else None,
        moe_router_pre_softmax=bool(a.get("moe_router_pre_softmax")),
        moe_router_topk_scaling_factor=(float(a["moe_router_topk_scaling_factor"])
                                        if "moe_router_topk_scaling_factor" in a else None),
        moe_router_num_groups=opt_int("moe_router_num_groups"),
        moe_router_group_topk=opt_int("moe_router_group_topk"),
        moe_router_dtype="fp32" if a.get("moe_router_dtype") == "fp32" else None,
        linear_num_key_heads=opt_int("linear_num_key_heads"),
        linear_num_value_heads=opt_int("linear_num_value_heads"),
        linear_key_head_dim=opt_int("linear_key_head_dim"),
        linear_value_head_dim=opt_int("linear_value_head_dim"),
        linear_conv_kernel_dim=opt_int("linear_conv_kernel_dim"),
        mtp_num_layers=mtp,
        mtp_layer_kind=attention if mtp else "attention",
        mtp_mlp_kind=last_mlp if mtp else "dense",
        **_mla_fields(a),
    )
    dtype = "bfloat16" if a.get("bf16") else "float16" if a.get("fp16") else "float32"
    run = {"tp": int(a.get("tensor_model_parallel_size", 1)), "pp": int(a.get("pipeline_model_parallel_size", 1)),
           "ep": int(a.get("expert_model_parallel_size", 1)),
           "etp": opt_int("expert_tensor_parallel_size"), "dtype": dtype, "load": a.get("load"),
           "divisible_by": int(a.get("make_vocab_size_divisible_by", 128))}
    return spec, run


def _activation(a: dict[str, Any]) -> Activation:
    if a.get("swiglu"):
        return "silu"
    if a.get("quick_geglu"):
        return "quick_gelu"
    return "relu2" if a.get("squared_relu") else "gelu"


def to_text(argv: Sequence[str]) -> str:
    """One flag (with its value) per line, shell-quoted, continued with backslashes."""
    lines, i = [], 0
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            lines.append(shlex.join(argv[i:i + 2]))
            i += 2
        else:
            lines.append(shlex.quote(argv[i]))
            i += 1
    return " \\\n  ".join(lines) + "\n"


def from_text(text: str) -> list[str]:
    return shlex.split(text.replace("\\\n", " "))
