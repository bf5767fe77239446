"""Megatron-Bridge's own adapter checkpoints (torch_dist, adapter tensors only), issue 13 item 1.

* ``test_bridge_round_trip``: ``mapgen adapter import --format bridge --tp 2`` writes ``release/`` (a
  torch_dist checkpoint: ``metadata.json``, ``.metadata``, ``common.pt``, ``__*.distcp``), the tracker and
  ``run_config.yaml``; ``mapgen adapter export`` reads it at TP=1 (megatron-core reshards) and gives the PEFT
  adapter made by peft back bitwise (tensors, dtypes, ``adapter_config.json``).
* The same checkpoint loads with megatron-core's ``dist_checkpointing.load`` into a sharded state dict this test
  builds from the documented keys and shapes alone (``_independent_load``, in a fresh 1-rank gloo process): the
  per-layer adapters are stacked under one key with a leading layer axis (megatron-core's homogeneous layers),
  ``linear_in`` is A ``[L, dim, in]`` and ``linear_out`` is B ``[L, out, dim]``; ``linear_proj`` / ``linear_fc2``
  hold peft's ``o_proj`` / ``down_proj`` A and B as they are, ``linear_fc1`` holds ``[B_gate; B_up]`` over the
  shared A (layer 0) or the block form (layer 1), zero-padded to the largest rank of the stacked key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mapgen.cli import main as mapgen_main
from tests.lora_support import write_adapter, write_base

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LOAD = textwrap.dedent('''
    import json, os, sys
    import torch, torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    spec = json.loads(open(sys.argv[2]).read())
    state = {}
    for key, (layers, shape) in spec.items():
        for layer in range(layers):
            state[f"{key}/{layer}"] = ShardedTensor.from_rank_offsets(
                key, torch.full(shape, float("nan")), (0, layer, layers), prepend_axis_num=1)
    got = dist_checkpointing.load({"model": state}, sys.argv[1])["model"]
    torch.save({k: v.clone() for k, v in got.items()}, sys.argv[4])
''')


def _independent_load(ckpt: Path, spec: dict[str, tuple[int, list[int]]], tmp: Path) -> dict[str, torch.Tensor]:
    import socket

    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "load.py").write_text(LOAD)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, str(tmp / "load.py"), str(ckpt), str(tmp / "spec.json"), str(port),
                    str(tmp / "got.pt")], check=True, capture_output=True, timeout=300)
    got: dict[str, torch.Tensor] = torch.load(str(tmp / "got.pt"), weights_only=True)
    return got


def test_bridge_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base = write_base("qwen3", tmp_path / "base")
    adapter = write_adapter(base, tmp_path / "peft", r=4, alpha=8)  # layer 0: shared A on q/k/v and gate/up
    meg, back = tmp_path / "meg", tmp_path / "back"
    assert mapgen_main(["adapter", "import", str(adapter), str(meg), "--base", str(base), "--tp", "2",
                        "--format", "bridge"]) == 0
    assert (meg / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    release = meg / "release"
    assert json.loads((release / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert (release / "common.pt").is_file()
    assert len(list(release.glob("__*.distcp"))) == 4  # 2 ranks, 2 files each

    import yaml

    run_cfg = yaml.safe_load((release / "run_config.yaml").read_text())["peft"]
    assert run_cfg["_target_"] == "megatron.bridge.peft.lora.LoRA"
    assert sorted(run_cfg["target_modules"]) == ["linear_fc1", "linear_fc2", "linear_proj", "linear_qkv"]

    assert mapgen_main(["adapter", "export", str(meg), str(back), "--base", str(base)]) == 0
    want = load_file(str(adapter / "adapter_model.safetensors"))
    got = load_file(str(back / "adapter_model.safetensors"))
    assert sorted(want) == sorted(got)
    for k in want:
        assert want[k].dtype == got[k].dtype, k
        assert torch.equal(want[k], got[k]), k
    assert json.loads((back / "adapter_config.json").read_text()) == json.loads(
        (adapter / "adapter_config.json").read_text())

    # megatron-core reads the checkpoint into a state dict built from the documented keys and shapes alone
    cfg = json.loads((base / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    pre = "decoder.layers."
    spec = {f"{pre}self_attention.linear_proj.adapter.linear_in.weight": (2, [4, hidden]),
            f"{pre}self_attention.linear_proj.adapter.linear_out.weight": (2, [hidden, 4]),
            f"{pre}mlp.linear_fc2.adapter.linear_in.weight": (2, [4, inter]),
            f"{pre}mlp.linear_fc2.adapter.linear_out.weight": (2, [hidden, 4]),
            f"{pre}mlp.linear_fc1.adapter.linear_in.weight": (2, [8, hidden]),  # layer 1's block form: 2 x 4
            f"{pre}mlp.linear_fc1.adapter.linear_out.weight": (2, [2 * inter, 8])}
    loaded = _independent_load(release, spec, tmp_path)

    def ab(layer: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        p = f"base_model.model.model.layers.{layer}.{name}"
        return want[f"{p}.lora_A.weight"], want[f"{p}.lora_B.weight"]

    for layer in range(2):
        a, b = ab(layer, "self_attn.o_proj")
        assert torch.equal(loaded[f"{pre}self_attention.linear_proj.adapter.linear_in.weight/{layer}"], a)
        assert torch.equal(loaded[f"{pre}self_attention.linear_proj.adapter.linear_out.weight/{layer}"], b)
        a, b = ab(layer, "mlp.down_proj")
        assert torch.equal(loaded[f"{pre}mlp.linear_fc2.adapter.linear_in.weight/{layer}"], a)
        assert torch.equal(loaded[f"{pre}mlp.linear_fc2.adapter.linear_out.weight/{layer}"], b)
    (ag, bg), (au, bu) = ab(0, "mlp.gate_proj"), ab(0, "mlp.up_proj")
    assert torch.equal(ag, au)  # shared A: one adapter, linear_out = [B_gate; B_up]
    fc1_in, fc1_out = (loaded[f"{pre}mlp.linear_fc1.adapter.{n}.weight/0"] for n in ("linear_in", "linear_out"))
    assert torch.equal(fc1_in[:4], ag)
    assert not fc1_in[4:].any()  # padded to the stacked key's rank 8 with zeros
    assert torch.equal(fc1_out[:, :4], torch.cat([bg, bu]))
    assert not fc1_out[:, 4:].any()
    (ag, bg), (au, bu) = ab(1, "mlp.gate_proj"), ab(1, "mlp.up_proj")
    fc1_in, fc1_out = (loaded[f"{pre}mlp.linear_fc1.adapter.{n}.weight/1"] for n in ("linear_in", "linear_out"))
    assert torch.equal(fc1_in, torch.cat([ag, au]))  # block form: [A_gate; A_up], B block-diagonal
    zero = torch.zeros(inter, 4)
    assert torch.equal(fc1_out, torch.cat([torch.cat([bg, zero], 1), torch.cat([zero, bu], 1)]))


def test_bridge_checkpoint_without_side_file(tmp_path: Path) -> None:
    """A checkpoint as Megatron-Bridge trains it (one dim and alpha everywhere, no mapgen side file): rank and
    alpha come from run_config.yaml's peft section, the tensors export bitwise."""
    import transformers
    from safetensors.torch import load_file

    base = write_base("qwen3", tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    pm.save_pretrained(str(tmp_path / "peft"))
    meg, back = tmp_path / "meg", tmp_path / "back"
    assert mapgen_main(["adapter", "import", str(tmp_path / "peft"), str(meg), "--base", str(base),
                        "--format", "bridge"]) == 0
    import yaml

    run_cfg = yaml.safe_load((meg / "release" / "run_config.yaml").read_text())["peft"]
    assert (run_cfg["dim"], run_cfg["alpha"]) == (4, 8.0)
    (meg / "release" / "mapgen_adapter.json").unlink()
    assert mapgen_main(["adapter", "export", str(meg), str(back), "--base", str(base)]) == 0
    want = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    got = load_file(str(back / "adapter_model.safetensors"))
    assert sorted(want) == sorted(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    cfg = json.loads((back / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    assert {m.rsplit(".", 1)[-1] for m in cfg["target_modules"]} == {"down_proj", "o_proj"}


@pytest.mark.skipif(os.environ.get("MAPGEN_MATRIX") != "full", reason="MAPGEN_MATRIX=full: MoE and hybrid layouts")
@pytest.mark.parametrize(("family", "layout"), [("qwen3-moe", ["--tp", "2", "--ep", "2"]),
                                                ("qwen3.6", ["--tp", "2", "--ep", "2", "--pp", "2"])])
def test_bridge_matrix(tmp_path: Path, family: str, layout: list[str]) -> None:
    """Experts (an expert axis per layer), routers, the GDN in_proj (split like its base), MTP at the last stage:
    imported at the layout, exported at TP=EP=PP=1, bitwise."""
    from safetensors.torch import load_file

    from tests.runtime_support import HUB, synth
    from tests.test_lora import MOE_PARAMS

    if family == "qwen3-moe":
        base = write_base("qwen3-moe", tmp_path / "base")
        adapter = write_adapter(base, tmp_path / "peft")
    else:
        base = synth(HUB / "Qwen--Qwen3.6-35B-A3B", tmp_path / "base", "--mtp-depth", "1", "--dtype", "fp32")
        adapter = write_adapter(base, tmp_path / "peft", target_parameters=MOE_PARAMS)
    meg, back = tmp_path / "meg", tmp_path / "back"
    assert mapgen_main(["adapter", "import", str(adapter), str(meg), "--base", str(base), *layout,
                        "--format", "bridge"]) == 0
    assert mapgen_main(["adapter", "export", str(meg), str(back), "--base", str(base)]) == 0
    want = load_file(str(adapter / "adapter_model.safetensors"))
    got = load_file(str(back / "adapter_model.safetensors"))
    assert sorted(want) == sorted(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert json.loads((back / "adapter_config.json").read_text()) == json.loads(
        (adapter / "adapter_config.json").read_text())
