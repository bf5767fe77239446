"""How PEFT names an adapter's modules for a model type, versus the checkpoint keys mapgen's rules use.

PEFT names modules as transformers builds them in memory, which transformers 5 derives from the checkpoint
keys by its conversion mapping (``transformers/conversion_mapping.py``): prefixes and renames
(``block_sparse_moe.`` -> ``mlp.``, Qwen3.5's ``model.language_model.`` -> ``model.``) and per-expert linears
packed into one parameter per layer (``mlp.experts.{e}.gate_proj``/``up_proj`` -> ``mlp.experts.gate_up_proj``
``[E, 2I, H]`` rows ``[gate; up]``; ``down_proj`` -> ``mlp.experts.down_proj`` ``[E, H, I]``). PEFT adapts a
packed parameter through ``target_parameters`` (peft ``ParamWrapper``): ``lora_A [E*r, in]`` expert-major,
``lora_B [out, r*E]`` expert-minor (``get_delta_weight``: ``A.reshape(E, r, in)``, ``B.reshape(out, r, E)``);
several targeted parameters of one module nest, the first in ``target_parameters`` innermost
(``<module>.base_layer.lora_A`` for the first of two). This module is that knowledge as data, per model type.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelView:
    """``renames``: (checkpoint substring, in-memory substring) pairs, applied in order; ``packed``: packed
    expert parameter -> the per-expert checkpoint leaves whose rows it stacks; ``container``: the experts
    module's leaf name."""

    renames: tuple[tuple[str, str], ...] = ()
    packed: tuple[tuple[str, tuple[str, ...]], ...] = ()
    container: str = "experts"
    #: module leaves whose weight is a bare parameter (the MoE router): peft adapts them via target_parameters
    parameters: tuple[str, ...] = ()

    def to_model(self, name: str) -> str:
        for ckpt, model in self.renames:
            name = name.replace(ckpt, model)
        return name

    def to_checkpoint(self, name: str) -> str:
        for ckpt, model in reversed(self.renames):
            name = name.replace(model, ckpt)
        return name

    def leaves(self, param: str) -> tuple[str, ...]:
        for p, leaves in self.packed:
            if p == param:
                return leaves
        raise KeyError(param)


_QWEN_EXPERTS = (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",)))

VIEWS: dict[str, ModelView] = {
    "qwen3": ModelView(),
    "qwen3_moe": ModelView(packed=_QWEN_EXPERTS, parameters=("mlp.gate",)),
    "mixtral": ModelView(renames=((".block_sparse_moe.", ".mlp."),),
                         packed=(("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",))), parameters=("mlp.gate",)),
    "qwen3_5_moe": ModelView(renames=(("model.language_model.", "model."),), packed=_QWEN_EXPERTS,
                             parameters=("mlp.gate",)),
    "qwen3_5_moe_text": ModelView(packed=_QWEN_EXPERTS, parameters=("mlp.gate",)),
}


def view_for(model_type: str) -> ModelView:
    """The view of ``model_type``; a model type not listed has checkpoint names == module names, unpacked."""
    return VIEWS.get(model_type, ModelView())
