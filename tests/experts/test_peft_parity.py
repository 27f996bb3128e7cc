"""PEFT parity for what PEFT adapters carry beyond plain linear LoRAs, shown against PEFT itself.

- LoRA on ``embed_tokens`` (``lora_embedding_A/B``) and ``lm_head`` (PEFT also saves their base weights,
  ``save_embedding_layers``): imported, routed (one expert: PeftModel's logits; two: the dense mix) and merged
  (``merge_and_unload``'s weights), exported back to a folder PEFT loads.
- DoRA and ``modules_to_save``: refused with one line that names the setting, why, and what to do.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from library_helpers import load_base, save_peft_adapter

from moerge.errors import MalformedConfigError, RoutingError
from moerge.experts.library import ExpertLibrary
from moerge.experts.peft_io import read_peft_folder

TARGETS = ["embed_tokens", "lm_head", "q_proj"]


@pytest.fixture(scope="module")
def embedding_adapters(tiny_llama_dir, tmp_path_factory):
    """Two PEFT adapters with LoRA on embed_tokens + lm_head + q_proj: [(folder, PeftModel)]."""
    out = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"emb-lora-{seed}")
        peft_model = save_peft_adapter(
            tiny_llama_dir, folder, seed=seed, r=4, lora_alpha=8, target_modules=TARGETS
        )
        out.append((folder, peft_model))
    return out


IDS = torch.tensor([[1, 5, 17, 42, 99, 3, 7], [2, 64, 101, 0, 11, 8, 30]])


def test_embedding_and_lm_head_lora_are_imported(embedding_adapters):
    folder, _ = embedding_adapters[0]
    keys = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    assert set(keys) == set(TARGETS)
    expert = read_peft_folder(folder)
    emb = expert.lora["model.embed_tokens"]
    assert emb.embedding and (emb.d_in, emb.d_out) == (102, 64) and emb.weight_shape == (102, 64)
    head = expert.lora["lm_head"]
    assert not head.embedding and head.weight_shape == (102, 64)


def test_single_expert_attach_equals_peft_model(embedding_adapters, tiny_llama_dir):
    from moerge.recipes import attach

    folder, peft_model = embedding_adapters[0]
    expert = read_peft_folder(folder, name="emb")
    routed = attach(load_base(tiny_llama_dir), [expert], "single_expert", expert="emb")
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
        got = routed(input_ids=IDS).logits
        base = load_base(tiny_llama_dir)(input_ids=IDS).logits
    assert not torch.allclose(expected, base, atol=1e-3), "the adapter must change the logits"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_merge_into_equals_merge_and_unload(embedding_adapters, tiny_llama_dir):
    from moerge.model.routed import merge_into

    folder, peft_model = embedding_adapters[0]
    merged_peft = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
    mine = dict(merge_into(load_base(tiny_llama_dir), read_peft_folder(folder)).named_parameters())
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(mine[key], merged_peft[key], atol=1e-6, rtol=0)
    assert set(mine) == set(merged_peft)
    for key in mine:
        torch.testing.assert_close(mine[key], merged_peft[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("aggregation", ["output", "parameter"])
def test_two_experts_uniform_mix_equals_dense_weights(embedding_adapters, tiny_llama_dir, aggregation):
    """Dense reference: a fixed uniform mix of two experts at every module (embedding included) is the model
    whose weights are W + ½ΔW₁ + ½ΔW₂ (each module is linear in its update)."""
    from moerge.model.routed import merge_into
    from moerge.recipes import attach

    experts = [read_peft_folder(f, name=f"e{i}") for i, (f, _) in enumerate(embedding_adapters)]
    routed = attach(load_base(tiny_llama_dir), experts, "uniform", aggregation=aggregation)
    reference = load_base(tiny_llama_dir)
    for e in experts:
        merge_into(reference, e, weight=0.5)
    with torch.no_grad():
        torch.testing.assert_close(
            routed(input_ids=IDS).logits, reference(input_ids=IDS).logits, atol=1e-5, rtol=0
        )


def test_exact_merge_of_embedding_experts_round_trips_through_peft(
    embedding_adapters, tiny_llama_dir, tmp_path
):
    """merge (exact, linear ½/½) → library → export → PeftModel gives the dense reference's logits."""
    from peft import PeftModel

    from moerge.merging.api import merge
    from moerge.model.routed import merge_into

    experts = [read_peft_folder(f, name=f"e{i}") for i, (f, _) in enumerate(embedding_adapters)]
    merged = merge(
        {"merge_method": "linear", "models": [{"model": "e0", "parameters": {"weight": 0.5}},
                                              {"model": "e1", "parameters": {"weight": 0.5}}],
         "parameters": {"normalize": False}, "lora_mode": "exact"},
        experts=experts,
    )  # fmt: skip
    assert merged.lora["model.embed_tokens"].embedding
    lib = ExpertLibrary.create(tmp_path / "lib")
    lib.add(merged)
    out = lib.export_peft(merged.name, tmp_path / "out")
    reloaded = PeftModel.from_pretrained(load_base(tiny_llama_dir), out).eval()
    reference = load_base(tiny_llama_dir)
    for e in experts:
        merge_into(reference, e, weight=0.5)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=IDS).logits, reference(input_ids=IDS).logits, atol=1e-5, rtol=0
        )


def test_token_router_on_an_embedding_is_refused_with_the_fix(embedding_adapters, tiny_llama_dir):
    from moerge.recipes import attach

    experts = [read_peft_folder(f, name=f"e{i}") for i, (f, _) in enumerate(embedding_adapters)]
    routed = attach(load_base(tiny_llama_dir), experts, "arrow", k=1)
    with pytest.raises(RoutingError, match=r"model\.embed_tokens is an embedding .*target_modules"):
        routed(input_ids=IDS)
    # without the embedding, the same recipe runs
    routed = attach(load_base(tiny_llama_dir), experts, "arrow", k=1, target_modules=["q_proj", "lm_head"])
    with torch.no_grad():
        assert torch.isfinite(routed(input_ids=IDS).logits).all()


def test_resized_vocabulary_copy_is_refused(embedding_adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = embedding_adapters[0]
    sd = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in sd if k.endswith("embed_tokens.base_layer.weight"))
    sd[key] = torch.zeros(110, 64)
    (tmp_path / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(MalformedConfigError, match="resized vocabulary"):
        read_peft_folder(tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(use_dora=True), r"use_dora is set\. DoRA .* not linear in ΔW"),
        (dict(modules_to_save=["lm_head"]), r"modules_to_save is set \(lm_head\); full trained copies"),
    ],
)
def test_dora_and_modules_to_save_are_refused_in_one_line(tiny_llama_dir, tmp_path, kwargs, match):
    save_peft_adapter(tiny_llama_dir, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"], **kwargs)
    with pytest.raises(MalformedConfigError, match=match) as err:
        read_peft_folder(tmp_path)
    assert "\n" not in str(err.value)
    # the tensors alone (config flag removed) are refused as well, naming what they are
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(use_dora=False, modules_to_save=None)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MalformedConfigError, match="DoRA magnitude|full module weight"):
        read_peft_folder(tmp_path)
