"""YaRN RoPE on standard attention: the config fields megatron-core 0.16.1 reads but does not declare.

``GPTModel(position_embedding_type="yarn")`` builds ``YarnRotaryEmbedding`` from ``config.yarn_rotary_scaling_factor``,
``yarn_original_max_position_embeddings``, ``yarn_beta_fast``/``_slow``, ``yarn_mscale``/``_all_dim`` and
``yarn_correction_range_round_to_int`` (``getattr``, models/gpt/gpt_model.py), and ``SelfAttention`` scales the
rotated q and k by ``_yarn_get_concentration_factor_from_config(config)`` (transformer/attention.py) when the
config has ``yarn_rotary_scaling_factor``. ``TransformerConfig`` declares none of them (Megatron-Bridge's GPT-OSS
provider adds them as dataclass fields the same way), so this subclass does.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer import TransformerConfig


@dataclass
class YarnTransformerConfig(TransformerConfig):  # type: ignore[misc]
    """``TransformerConfig`` with the YaRN fields GPTModel reads (values: mapgen.contract.hf_config.yarn_fields)."""

    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    yarn_correction_range_round_to_int: bool = True
