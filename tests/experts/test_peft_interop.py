"""PEFT interop, shown against PEFT itself: import a PEFT-saved adapter, export it, reload with PeftModel."""

from __future__ import annotations

import json

import pytest
import torch
from library_helpers import ADAPTER_CASES, load_base

from moerge.experts.library import ExpertLibrary
from moerge.experts.peft_io import read_peft_folder


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_exported_expert_gives_peft_outputs(case, peft_adapters, tmp_path):
    from peft import PeftModel

    base_dir, adapter_dir, original = peft_adapters[case]
    keys = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert keys["peft_type"] == "LORA"

    lib = ExpertLibrary.create(tmp_path / "lib")
    lib.add_peft(adapter_dir, name="imported", task=case)
    exported = lib.export_peft("imported", tmp_path / "exported")
    reloaded = PeftModel.from_pretrained(load_base(base_dir), exported).eval()

    x = torch.randint(4, 90, (2, 12))
    with torch.no_grad():
        expected = original(input_ids=x).logits
        got = reloaded(input_ids=x).logits
        base_logits = load_base(base_dir)(input_ids=x).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3), "the adapter must change the outputs"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_expert_deltas_match_peft_merged_weights(case, peft_adapters):
    """Dense reference: base weight + Expert.delta_for_weight() equals PEFT's merge_and_unload weight."""
    import copy

    base_dir, adapter_dir, original = peft_adapters[case]
    expert = read_peft_folder(adapter_dir)
    merged = copy.deepcopy(original).merge_and_unload()
    base = load_base(base_dir)
    base_params = dict(base.named_parameters())
    merged_params = dict(merged.named_parameters())
    assert expert.lora, "no modules imported"
    for module, lm in expert.lora.items():
        w = base_params[f"{module}.weight"]
        torch.testing.assert_close(
            w + lm.delta_for_weight(), merged_params[f"{module}.weight"], atol=1e-6, rtol=0
        )


def test_patterns_and_flags_are_read(peft_adapters):
    expert = read_peft_folder(peft_adapters["llama-patterns"][1])
    q1, q0 = expert.lora["model.layers.1.self_attn.q_proj"], expert.lora["model.layers.0.self_attn.q_proj"]
    assert (q1.rank, q0.rank) == (2, 4)
    assert expert.lora["model.layers.0.mlp.down_proj"].rank == 6
    assert expert.lora["model.layers.0.self_attn.v_proj"].alpha == 3.0
    assert q0.scaling == 8 / 4
    rs = read_peft_folder(peft_adapters["llama-rslora"][1])
    assert all(m.use_rslora and m.scaling == pytest.approx(4 / 8**0.5) for m in rs.lora.values())
    g = read_peft_folder(peft_adapters["gpt2-conv1d"][1])
    assert all(m.fan_in_fan_out for m in g.lora.values())
    assert "transformer.h.0.attn.c_attn" in g.lora


def test_saved_keys_carry_peft_prefix(peft_adapters, tmp_path):
    from safetensors.torch import load_file

    lib = ExpertLibrary.create(tmp_path / "lib")
    lib.add_peft(peft_adapters["llama-rslora"][1], name="x")
    out = lib.export_peft("x", tmp_path / "out")
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert all(
        k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys
    )
