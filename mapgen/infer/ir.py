"""The typed intermediate representation of a checkpoint's layout.

Frozen dataclasses, a ``SCHEMA_VERSION``, and a lossless round trip through sorted JSON. Repeated structure
stays symbolic: a :class:`LayerGroup` names an :class:`IndexSet` of layers (``0-2,4-6,...``) and key
*patterns* with ``{layer}``/``{expert}``/``{depth}`` placeholders, never thousands of expanded keys.

Key conventions
---------------
* Every family node stores the key suffixes it consumes, relative to the root of the layer that owns it
  (``self_attn.q_proj.weight``). A suffix under a per-expert family contains ``{expert}``.
* A :class:`LayerGroup` has a ``root`` such as ``model.language_model.layers.{layer}.``; the full key of a
  family tensor is ``root.format(layer=i) + suffix``. MTP inner layers use roots such as
  ``mtp.layers.{layer}.`` where ``layer`` runs over MTP depths (plus ``index_offset`` for DeepSeek-style
  extra decoder layers, whose HF index is ``num_hidden_layers + depth``).
* Top-level keys (embedding, final norm, lm_head, MTP shared tensors) are stored as full key names.

This module imports nothing heavy: scanning must stay fast.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

SCHEMA_VERSION = 1

ExpertLayout = Literal["packed", "per_expert", "none"]
MtpScheme = Literal["none", "mtp_block", "extra_layers", "mtp_layers"]


# ---------------------------------------------------------------------------------------------------------
# Index sets
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexSet:
    """A sorted set of non-negative integers stored as inclusive ranges; JSON form ``"0-2,4-6,8"``."""

    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, values: Iterable[int]) -> IndexSet:
        ordered = sorted(set(values))
        ranges: list[tuple[int, int]] = []
        for v in ordered:
            if ranges and ranges[-1][1] == v - 1:
                ranges[-1] = (ranges[-1][0], v)
            else:
                ranges.append((v, v))
        return cls(tuple(ranges))

    @classmethod
    def parse(cls, text: str) -> IndexSet:
        if not text:
            return cls(())
        values: list[int] = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            values.extend(range(int(lo), int(hi or lo) + 1))
        return cls.of(values)

    def __iter__(self) -> Iterator[int]:
        for lo, hi in self.ranges:
            yield from range(lo, hi + 1)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges)

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and any(lo <= value <= hi for lo, hi in self.ranges)

    def __str__(self) -> str:
        return ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)

    def braces(self) -> str:
        """Human form used in listings: ``{0..2,4..6}``."""
        return "{" + ",".join(f"{lo}" if lo == hi else f"{lo}..{hi}" for lo, hi in self.ranges) + "}"


# ---------------------------------------------------------------------------------------------------------
# Family nodes. Each names the template (macro) that renders its rules, and its family for summaries.
# Optional key fields are ``None`` when the checkpoint has no such tensor.
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attention:
    """Standard softmax attention: separate q/k/v or fused qkv, optional biases, QK-norm, output gate
    (Qwen3.5/Qwen3-Next: ``q_proj`` holds ``[q_h; gate_h]`` per head, so it is twice as tall), sinks."""

    template: ClassVar[str] = "attention"
    family: ClassVar[str] = "attention"
    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    q_bias: str | None = None
    k_bias: str | None = None
    v_bias: str | None = None
    qkv_bias: str | None = None
    o_bias: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    sinks: str | None = None
    output_gate: bool = False
    sliding_window: bool = False


@dataclass(frozen=True)
class GatedDeltaNet:
    """Gated delta-net linear attention (Qwen3.5 ``linear_attn.*``; Qwen3-Next fuses qkvz and ba)."""

    template: ClassVar[str] = "gated_delta_net"
    family: ClassVar[str] = "gated_delta_net"
    conv1d: str
    a_log: str
    dt_bias: str
    norm: str
    out_proj: str
    in_proj_qkv: str | None = None
    in_proj_z: str | None = None
    in_proj_b: str | None = None
    in_proj_a: str | None = None
    in_proj_qkvz: str | None = None
    in_proj_ba: str | None = None
    conv1d_bias: str | None = None


@dataclass(frozen=True)
class MLA:
    """DeepSeek multi-latent attention (classified by scan; not converted by the runtime yet)."""

    template: ClassVar[str] = "mla"
    family: ClassVar[str] = "mla"
    kv_a_proj_with_mqa: str
    kv_a_layernorm: str
    kv_b_proj: str
    o: str
    q_a_proj: str | None = None
    q_a_layernorm: str | None = None
    q_b_proj: str | None = None
    q: str | None = None


@dataclass(frozen=True)
class DenseMLP:
    """Gated MLP: separate gate/up (``w1``/``w3`` in Mixtral naming) or a fused ``gate_up``; down."""

    template: ClassVar[str] = "dense_mlp"
    family: ClassVar[str] = "dense_mlp"
    down: str
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None
    gate_bias: str | None = None
    up_bias: str | None = None
    down_bias: str | None = None


@dataclass(frozen=True)
class Experts:
    """Routed experts.

    ``per_expert``: ``gate``/``up``/``down`` contain ``{expert}``. ``packed``: ``gate_up``/``down`` are 3-D
    tensors ``[E, ...]``; ``orientation`` says whether each expert's matrix is stored ``out_in`` (like
    ``nn.Linear.weight``) or ``in_out`` (transposed, as in Qwen3-VL and gpt-oss checkpoints);
    ``gate_up_interleave`` says whether gate and up columns alternate (gpt-oss) or are concatenated.
    ``quant`` is ``mxfp4`` when packed tensors are stored as ``*_blocks``/``*_scales``.
    """

    template: ClassVar[str] = "experts"
    family: ClassVar[str] = "experts"
    layout: Literal["per_expert", "packed"]
    num_experts: int
    down: str
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None
    gate_bias: str | None = None
    up_bias: str | None = None
    gate_up_bias: str | None = None
    down_bias: str | None = None
    gate_up_scales: str | None = None
    down_scales: str | None = None
    orientation: Literal["out_in", "in_out"] = "out_in"
    orientation_source: Literal["shapes", "model_type_default", "per_expert"] = "per_expert"
    gate_up_interleave: bool = False
    quant: Literal["none", "mxfp4"] = "none"


@dataclass(frozen=True)
class SharedExpert:
    """Always-on shared expert(s) of a MoE block and the optional sigmoid gate in front of them."""

    template: ClassVar[str] = "shared_expert"
    family: ClassVar[str] = "shared_expert"
    mlp: DenseMLP
    gate: str | None = None


@dataclass(frozen=True)
class MoE:
    """A mixture-of-experts block: router (+ bias, + DeepSeek ``e_score_correction_bias``), experts,
    optional shared expert."""

    template: ClassVar[str] = "moe"
    family: ClassVar[str] = "moe"
    router: str
    experts: Experts
    router_bias: str | None = None
    expert_bias: str | None = None
    shared: SharedExpert | None = None


Mixer = Attention | GatedDeltaNet | MLA
Mlp = DenseMLP | MoE


@dataclass(frozen=True)
class LayerGroup:
    """Decoder layers sharing one signature (families, key names, storage)."""

    template: ClassVar[str] = "layer"
    name: str
    root: str
    layers: IndexSet
    mixer: Mixer
    mlp: Mlp
    input_norm: str
    post_attention_norm: str


@dataclass(frozen=True)
class MTP:
    """Multi-token prediction.

    ``mtp_block`` (Qwen): shared ``mtp.fc``/``mtp.norm``/``mtp.pre_fc_norm_*`` (full keys, ``shared=True``)
    and inner layers ``mtp.layers.<d>.*``. ``extra_layers`` (DeepSeek/GLM): decoder layers
    ``model.layers.<N+d>`` with ``enorm``/``hnorm``/``eh_proj``/``shared_head.norm`` and duplicated
    ``embed_tokens``/``shared_head.head`` copies. ``mtp_layers`` (MiMo): ``model.mtp_layers.<d>.*`` with
    ``token_layernorm``/``hidden_layernorm``/``input_proj``/``final_layernorm``.

    The per-depth fields are suffixes relative to ``root`` unless ``shared`` is true, in which case they
    are full keys stored once for all depths. ``eh_proj_order`` records the concatenation order of the
    projection's input (Megatron: ``embedding`` first).
    """

    template: ClassVar[str] = "mtp"
    scheme: MtpScheme
    depth: int
    root: str
    enorm: str
    hnorm: str
    eh_proj: str
    final_norm: str
    inner: tuple[LayerGroup, ...]
    shared: bool = False
    index_offset: int = 0
    eh_proj_order: Literal["embedding_hidden", "hidden_embedding"] = "embedding_hidden"
    embed_copy: str | None = None
    head_copy: str | None = None


@dataclass(frozen=True)
class Tower:
    """A non-language component (vision, audio): reported, carried through exports unchanged."""

    name: str
    prefix: str
    num_keys: int
    patterns: tuple[str, ...]


@dataclass(frozen=True)
class LanguageModel:
    prefix: str
    embedding: str
    final_norm: str
    lm_head: str | None
    tied_embeddings: bool
    groups: tuple[LayerGroup, ...]
    num_layers: int
    mtp: MTP | None = None


@dataclass(frozen=True)
class Dims:
    """Dimensions read from the config (never part of the layout fingerprint)."""

    hidden_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    vocab_size: int = 0
    num_experts_per_tok: int = 0


@dataclass(frozen=True)
class UnclassifiedGroup:
    pattern: str
    count: int


@dataclass(frozen=True)
class Summary:
    """The stable contract that scripts rely on (``mapgen scan --json``)."""

    model_type: str
    num_layers: int
    attention: tuple[tuple[str, int], ...]
    moe_layers: int
    num_experts: int
    expert_layout: ExpertLayout
    shared_experts: bool
    mtp_depth: int
    mtp_scheme: MtpScheme
    mtp_expert_layout: ExpertLayout
    tied_embeddings: bool
    unclassified_keys: int
    towers: tuple[str, ...] = ()
    layer_pattern: str = ""
    mtp_declared: int = 0


@dataclass(frozen=True)
class DiagnosticRecord:
    severity: str
    code: str
    message: str
    key: str = ""


@dataclass(frozen=True)
class Layout:
    """The whole IR of one checkpoint."""

    model_type: str
    text_model_type: str
    architectures: tuple[str, ...]
    language_model: LanguageModel
    dims: Dims
    summary: Summary
    towers: tuple[Tower, ...] = ()
    unclassified: tuple[UnclassifiedGroup, ...] = ()
    diagnostics: tuple[DiagnosticRecord, ...] = ()
    quantization: str = "none"
    # The parsed config.json (canonical: compared and hashed as sorted JSON). Dimensions live here; it is
    # excluded from the layout fingerprint. It makes a stored layout self-contained for offline proofs.
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    schema_version: int = SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------------------
# JSON round trip
# ---------------------------------------------------------------------------------------------------------
_NODE_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        Attention,
        GatedDeltaNet,
        MLA,
        DenseMLP,
        Experts,
        SharedExpert,
        MoE,
        LayerGroup,
        MTP,
        Tower,
        LanguageModel,
        Dims,
        UnclassifiedGroup,
        Summary,
        DiagnosticRecord,
        Layout,
    )
}
_UNION_TAG = "node"


def to_jsonable(obj: Any) -> Any:
    """Convert an IR value into plain JSON data. Union-typed nodes carry a ``"node"`` tag."""
    if isinstance(obj, IndexSet):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, Attention | GatedDeltaNet | MLA | DenseMLP | MoE):
            out[_UNION_TAG] = type(obj).__name__
        return out
    if isinstance(obj, tuple | list):
        return [to_jsonable(v) for v in obj]
    return obj


def _from(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is IndexSet:
        return IndexSet.parse(data)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if data is None:
            return None
        if isinstance(data, dict) and _UNION_TAG in data:
            return _from(_NODE_TYPES[data[_UNION_TAG]], data)
        return _from(args[0], data)
    if origin is tuple:
        targs = typing.get_args(tp)
        if len(targs) == 2 and targs[1] is Ellipsis:
            return tuple(_from(targs[0], v) for v in data)
        return tuple(_from(a, v) for a, v in zip(targs, data, strict=True))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in data:
                kwargs[f.name] = _from(hints[f.name], data[f.name])
        return tp(**kwargs)
    return data


def layout_to_json(layout: Layout) -> str:
    """Sorted, indented JSON with a trailing newline: byte-for-byte deterministic."""
    return json.dumps(to_jsonable(layout), indent=2, sort_keys=True) + "\n"


def layout_from_json(text: str) -> Layout:
    data = json.loads(text)
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"layout JSON has schema_version {version!r}; this mapgen reads {SCHEMA_VERSION}. "
            "Re-run `mapgen scan` with this version."
        )
    layout = _from(Layout, data)
    assert isinstance(layout, Layout)
    return layout


def fields_dict(obj: Any) -> dict[str, Any]:
    """Field name -> value for a dataclass node (for templates and planners)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


