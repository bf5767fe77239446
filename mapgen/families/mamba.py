"""Mamba selective state-space mixers (Jamba ``mamba.*`` with x_proj/dt_proj, Mamba-2 style ``in_proj``/``dt_bias``/
``D``/``norm`` in Bamba and GraniteMoE-Hybrid): classified so that scan names every key, refused by the planner.

Falcon-H1 runs attention and Mamba-2 side by side in every layer (``FalconH1DecoderLayer``: both read the same
normed input, their outputs are added): its ``self_attn.*`` is the Mamba component's ``attention`` child, refused
with it.

mapgen builds megatron-core's ``GPTModel``; hybrid Mamba stacks are megatron-core's ``MambaModel`` (``MambaMixer``),
whose forward needs the ``mamba_ssm`` and ``causal_conv1d`` CUDA kernels: no bridge is planned for them here.
"""

from __future__ import annotations

from mapgen.families._dsl import Dims, Family, Planner, ShapePairs, Slot, Variant
from mapgen.ir import Component

_CORE = ("in_proj", "conv1d", "a_log", "d", "out_proj")

MAMBA = Family(
    "mamba",
    role="mixer",
    description="Mamba selective state-space mixer (classified, refused: megatron-core's MambaModel, not GPTModel)",
    file=__name__,
    roots=("mamba.",),
    slots=(
        Slot("in_proj", ("in_proj.weight",)),
        Slot("conv1d", ("conv1d.weight",)),
        Slot("conv1d_bias", ("conv1d.bias",)),
        Slot("a_log", ("A_log",), init="a_log"),
        Slot("d", ("D",), init="norm"),
        Slot("out_proj", ("out_proj.weight",)),
        Slot("dt_bias", ("dt_bias",), init="dt_bias"),
        Slot("norm", ("norm.weight",), init="norm"),
        # Mamba-1 (Jamba): x_proj -> dt/B/C, dt_proj, and Jamba's dt/B/C layernorms
        Slot("x_proj", ("x_proj.weight",)),
        Slot("dt_proj", ("dt_proj.weight",)),
        Slot("dt_proj_bias", ("dt_proj.bias",)),
        Slot("dt_layernorm", ("dt_layernorm.weight",), init="norm"),
        Slot("b_layernorm", ("b_layernorm.weight",), init="norm"),
        Slot("c_layernorm", ("c_layernorm.weight",), init="norm"),
    ),
    variants=(
        Variant("mamba1", (*_CORE, "x_proj", "dt_proj"),
                ("conv1d_bias", "dt_proj_bias", "dt_layernorm", "b_layernorm", "c_layernorm")),
        Variant("mamba2", (*_CORE, "dt_bias"), ("conv1d_bias", "norm")),
    ),
    children=("attention",),
)

INPUT_NORM = "input_layernorm.weight"
"""Never planned (the layer is refused); the block's pre-mixer norm would be megatron-core's ``norm``."""


def facts(c: Component) -> dict[str, bool]:
    return {}


def kind(c: Component) -> str:
    return "mamba"


def describe(c: Component) -> str:
    return f"Mamba ({c.variant}{' + parallel attention' if c.child('attention') else ''}; refused)"


def shapes(c: Component, d: Dims) -> ShapePairs:
    """Sizes from config keys mapgen does not map (mamba_d_state, mamba_expand, ...): not checked."""
    return [(key, None) for key in c.all_keys()]


def plan(c: Component, p: Planner, mroot: str, hroot: str, domain: str, name: str) -> None:
    p.unsupported("Mamba state-space layers: mapgen builds megatron-core's GPTModel, and megatron-core's MambaModel "
                  "(MambaMixer) runs only with the mamba_ssm / causal_conv1d CUDA kernels",
                  hroot + str(c.key("in_proj")))
