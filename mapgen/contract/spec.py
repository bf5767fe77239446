"""The Megatron model a bridge targets, as plain data (no torch, no megatron-core imports).

A bridge's ``megatron_config(hf, layout)`` (the table in :mod:`mapgen.contract.config`) returns a
:class:`ModelSpec`; the runtime turns it into a ``TransformerConfig`` plus layer specs
(``mapgen.runtime.megatron``). Everything a Megatron model's parameter names and shapes depend on is here, so
the bijection proof can build the model on the meta device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

LayerKind = Literal["attention", "gated_delta_net", "mla"]
MlpKind = Literal["dense", "moe"]
# The MLP activations megatron-core computes exactly as transformers does (``activation_func`` is any callable;
# mapgen.runtime.megatron gives each its function): silu (= swish), gelu (erf), gelu_tanh (the tanh
# approximation: gelu_pytorch_tanh / gelu_new / gelu_fast / gelu_accurate / gelu_python_tanh), relu, relu2
# (squared ReLU), quick_gelu (x * sigmoid(1.702 x)).
Activation = Literal["silu", "gelu", "gelu_tanh", "relu", "relu2", "quick_gelu"]
# learned_absolute: GPT-2's wpe table; yarn: YaRN-scaled RoPE on standard attention (the yarn_* fields below)
PositionEmbedding = Literal["rope", "mrope", "learned_absolute", "yarn"]
SoftmaxType = Literal["vanilla", "learnable"]  # learnable: one learned sink logit per head (gpt-oss)


@dataclass(frozen=True)
class ModelSpec:
    # -- dimensions -------------------------------------------------------------------------------------
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int = 4096
    # -- per-layer structure (len == num_layers) ---------------------------------------------------------
    layer_kinds: tuple[LayerKind, ...] = ()
    mlp_kinds: tuple[MlpKind, ...] = ()
    # -- attention ---------------------------------------------------------------------------------------
    add_qkv_bias: bool = False
    add_bias_linear: bool = False  # o_proj / MLP biases
    qk_layernorm: bool = False
    attention_output_gate: bool = False
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False  # rotary pairs are adjacent dims (GLM, Helium, ERNIE-4.5): megatron-core's flag
    rope_scaling: bool = False  # Llama-3 style frequency scaling (megatron-core GPTModel rope_scaling)
    rope_scaling_factor: float = 8.0
    # sliding-window attention: each query attends to the last ``window_size`` positions, itself included
    # (transformers' ``sliding_window``; megatron-core ``window_size=(window_size - 1, 0)``)
    window_size: int | None = None
    window_layers: tuple[bool, ...] = ()  # per layer, True = windowed; () = every layer (when window_size)
    no_rope_layers: tuple[bool, ...] = ()  # per layer, True = the layer applies no RoPE (NoPE); () = none
    position_embedding_type: PositionEmbedding = "rope"
    mrope_section: tuple[int, ...] = ()  # M-RoPE rotary-pair sections (temporal, height, width)
    softmax_scale: float | None = None  # attention scores scale; None = 1/sqrt(kv_channels)
    softmax_type: SoftmaxType = "vanilla"
    # -- norms / activations -----------------------------------------------------------------------------
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-6
    layernorm_zero_centered_gamma: bool = False
    gated_linear_unit: bool = True
    activation: Activation = "silu"
    # gpt-oss's clamped SwiGLU: act(min(g, c)) * (clamp(u, -c, c) + offset) (megatron-core glu_linear_offset,
    # activation_func_clamp_value)
    glu_linear_offset: float = 0.0
    activation_func_clamp_value: float | None = None
    untie_embeddings_and_output_weights: bool = True
    # -- MoE ---------------------------------------------------------------------------------------------
    num_moe_experts: int | None = None
    moe_router_topk: int = 1
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    moe_router_enable_expert_bias: bool = False
    moe_router_bias: bool = False
    # None: "sigmoid" with moe_router_enable_expert_bias (megatron-core requires it), else "softmax"
    moe_router_score_function: Literal["softmax", "sigmoid"] | None = None
    moe_router_pre_softmax: bool = False  # softmax over all experts before top-k (HF norm_topk_prob=False)
    moe_router_topk_scaling_factor: float | None = None  # routed_scaling_factor
    moe_router_num_groups: int | None = None  # group-limited routing: n_group (mapgen.contract.routing)
    moe_router_group_topk: int | None = None  # ... topk_group
    moe_router_dtype: Literal["fp32"] | None = None  # the gate computed in fp32 (DeepSeek-style routers)
    # -- gated delta net ---------------------------------------------------------------------------------
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_conv_kernel_dim: int | None = None
    # -- multi-latent attention (MLA layers; megatron-core MLATransformerConfig); the yarn_* fields also size
    # position_embedding_type="yarn" on standard attention ------------------------------------------------
    q_lora_rank: int | None = None  # None: a full-rank q projection (DeepSeek-V2-Lite)
    kv_lora_rank: int | None = None
    qk_head_dim: int | None = None  # per-head q/k dims without RoPE (HF qk_nope_head_dim)
    qk_pos_emb_head_dim: int | None = None  # per-head q/k RoPE dims (HF qk_rope_head_dim)
    v_head_dim: int | None = None
    mla_rope_type: Literal["rope", "yarn"] = "rope"
    yarn_scaling_factor: float = 1.0  # rotary_scaling_factor
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    yarn_truncate: bool = True  # the correction range rounded to integers (transformers' YaRN truncate)
    # -- MTP ---------------------------------------------------------------------------------------------
    mtp_num_layers: int | None = None
    mtp_layer_kind: LayerKind = "attention"
    mtp_mlp_kind: MlpKind = "dense"

    def __post_init__(self) -> None:
        if self.layer_kinds and len(self.layer_kinds) != self.num_layers:
            raise ValueError(f"layer_kinds has {len(self.layer_kinds)} entries for {self.num_layers} layers")
        if self.mlp_kinds and len(self.mlp_kinds) != self.num_layers:
            raise ValueError(f"mlp_kinds has {len(self.mlp_kinds)} entries for {self.num_layers} layers")
        for name in ("window_layers", "no_rope_layers"):
            per_layer = getattr(self, name)
            if per_layer and len(per_layer) != self.num_layers:
                raise ValueError(f"{name} has {len(per_layer)} entries for {self.num_layers} layers")

    @property
    def kinds(self) -> tuple[LayerKind, ...]:
        attention: LayerKind = "attention"
        return self.layer_kinds or tuple(attention for _ in range(self.num_layers))

    @property
    def mlps(self) -> tuple[MlpKind, ...]:
        default: MlpKind = "moe" if self.num_moe_experts else "dense"
        return self.mlp_kinds or (default,) * self.num_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)
