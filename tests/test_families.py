"""The family declarations: well-formed, listable, and extensible by data alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from scan_support import tiny_config, tiny_dense, write_checkpoint

import mapgen.infer.recognise as recognise
from mapgen.families import FAMILIES, DeclarationError, Family, Slot, Variant, spelling_table, suggest
from mapgen.families.attention import ATTENTION
from mapgen.infer import render_summary, scan


def test_registry_names_are_unique_and_every_variant_names_declared_slots() -> None:
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)
    for family in FAMILIES:
        for variant in family.variants:
            assert set(variant.required) | set(variant.optional) <= family.slot_names, (family.name, variant.name)


def test_a_bad_declaration_names_its_file_and_slot() -> None:
    with pytest.raises(DeclarationError, match=r"tests\.example: family 'demo'.*unknown slot 'nope'"):
        Family("demo", role="mixer", description="", file="tests.example", slots=(Slot("a", ("a.weight",)),),
               variants=(Variant("v", ("a", "nope")),))
    with pytest.raises(DeclarationError, match="spelling"):
        Slot("a", ("a..weight.",))


def test_every_spelling_is_listed_once() -> None:
    rows = list(spelling_table())
    assert ("attention", "self_attn.", "q_norm", "q_norm.weight") in rows
    assert ("dense_mlp", "block_sparse_moe.", "gate", "w1.weight") in rows
    assert len(rows) == len(set(rows))


def _layernorm_checkpoint(tmp_path: Path) -> Path:
    tensors = tiny_dense()
    for i in range(2):  # a QK-norm spelling mapgen does not know (q_normalization / k_normalization)
        tensors[f"model.layers.{i}.self_attn.q_normalization.weight"] = (4,)
        tensors[f"model.layers.{i}.self_attn.k_normalization.weight"] = (4,)
    return write_checkpoint(tmp_path / "ck", tiny_config(head_dim=4), {"model.safetensors": tensors})


def test_unknown_spelling_is_unclassified_with_a_suggestion(tmp_path: Path) -> None:
    layout = scan(str(_layernorm_checkpoint(tmp_path)))
    assert layout.summary.unclassified_keys == 4
    text = render_summary(layout)
    line = next(x for x in text.splitlines() if "self_attn.q_normalization.weight  (2 keys)  did you mean" in x)
    assert "self_attn.q_norm.weight" in line
    assert suggest("mlp.gate_prj.weight")[0] == "mlp.gate_proj.weight"


def test_a_new_spelling_is_one_data_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slots = tuple(
        # THE data line: one more spelling of the known q_norm / k_norm slots.
        dataclasses.replace(s, spellings=(*s.spellings, s.spellings[0].replace("_norm", "_normalization")))
        if s.name in ("q_norm", "k_norm") else s
        for s in ATTENTION.slots
    )
    monkeypatch.setattr(recognise, "ATTENTION_FAMILY", dataclasses.replace(ATTENTION, slots=slots))
    layout = scan(str(_layernorm_checkpoint(tmp_path)))
    assert layout.summary.unclassified_keys == 0
    (group,) = layout.language_model.groups
    assert group.mixer.key("q_norm") == "self_attn.q_normalization.weight"
    assert group.mixer.key("k_norm") == "self_attn.k_normalization.weight"
