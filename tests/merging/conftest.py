"""Shared fixtures for the merging tests: tiny model folders and LoRA experts, built once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)


def perturbed_copy(src: Path, dst: Path, seed: int, scale: float = 0.02) -> Path:
    """A 'fine-tune': the base folder with every float tensor perturbed by seeded noise."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, dirs_exist_ok=True)
    sd = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    save_file(
        {k: v + scale * torch.randn(v.shape, generator=g) for k, v in sd.items()},
        str(dst / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return dst


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and three perturbed fine-tunes, as transformers folders."""
    from moerge.backbones.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("models")
    base = save_tiny_model(root / "base", **TINY, seed=0)
    out = {"base": base}
    for i in range(3):
        out[f"ft{i}"] = perturbed_copy(base, root / f"ft{i}", seed=i + 1)
    return out


def make_lora_expert(name: str, modules: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int):
    from moerge.experts.expert import Expert, ExpertMetadata, LoraModule

    g = torch.Generator().manual_seed(seed)
    lora = {
        m: LoraModule(
            A=torch.randn(rank, d_in, generator=g) * 0.3,
            B=torch.randn(d_out, rank, generator=g) * 0.3,
            alpha=alpha,
        )
        for m, (d_out, d_in) in modules.items()
    }
    return Expert(metadata=ExpertMetadata(name=name, base_model="tiny"), lora=lora)


LLAMA_MODULES = {
    f"model.layers.{i}.self_attn.{p}": (32, 32) for i in range(2) for p in ("q_proj", "v_proj")
} | {f"model.layers.{i}.mlp.up_proj": (64, 32) for i in range(2)}


@pytest.fixture(scope="session")
def lora_experts():
    """Three rank-4 LoRA experts on the tiny Llama's q/v/up projections (different alphas)."""
    return [
        make_lora_expert(f"e{i}", LLAMA_MODULES, rank=4, alpha=[4.0, 8.0, 2.0][i], seed=10 + i)
        for i in range(3)
    ]
