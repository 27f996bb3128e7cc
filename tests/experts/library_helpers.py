"""Helpers for the library tests (a uniquely named module: test folders share one import path)."""

from __future__ import annotations

import torch

from moerge.experts.expert import Expert, ExpertMetadata, LoraModule

LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]

# name -> (architecture, LoraConfig kwargs)
ADAPTER_CASES = {
    "llama-patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=LLAMA_TARGETS,
            rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
            alpha_pattern={"v_proj": 3.0},
        ),
    ),
    "llama-rslora": ("llama", dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True)),
    "gpt2-conv1d": (
        "gpt2",
        dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
}


def load_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def save_peft_adapter(base_dir, out_dir, seed=0, **lora_kwargs):
    """Train-free PEFT adapter with random non-zero B, saved by PEFT itself. Returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir), LoraConfig(init_lora_weights=False, **lora_kwargs))
    model.save_pretrained(out_dir)
    return model.eval()


def make_expert(
    name="e", task="t", d_in=8, d_out=6, rank=4, fingerprint="sha256:base", module="layer.q", seed=0, **meta
) -> Expert:
    g = torch.Generator().manual_seed(seed)
    return Expert(
        ExpertMetadata(name=name, task=task, base_fingerprint=fingerprint, **meta),
        lora={
            module: LoraModule(
                torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g), 8.0
            )
        },
    )
