"""Runs in the FusionBench side venv: FusionBench's ``WeightEnsemblingMoE`` over a Llama MLP and its experts, with
the router parameters given, on the hidden states given; writes the output.

    python fusionbench_driver.py IN.safetensors OUT.safetensors

FusionBench's package ``__init__`` imports its whole training stack (omegaconf, lightning, …); the module and the
two small ones it imports need only torch, so they are loaded from their files under their own names."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP


def load_fusion_bench_module(name: str):
    spec = importlib.util.find_spec("fusion_bench")  # finds the folder without running its __init__
    root = Path(spec.submodule_search_locations[0])
    for pkg in ("fusion_bench", "fusion_bench.utils", "fusion_bench.models"):
        sys.modules.setdefault(pkg, types.ModuleType(pkg))
    for dep in ("fusion_bench.utils.dict", "fusion_bench.utils.type", "fusion_bench.models.utils", name):
        if dep in sys.modules:
            continue
        path = root.joinpath(*dep.split(".")[1:]).with_suffix(".py")
        s = importlib.util.spec_from_file_location(dep, path)
        mod = importlib.util.module_from_spec(s)
        sys.modules[dep] = mod
        s.loader.exec_module(mod)
    return sys.modules[name]


def main() -> None:
    t = load_file(sys.argv[1])
    T = int(t["num_experts"])
    d, inter = t["base.up_proj.weight"].shape[1], t["base.up_proj.weight"].shape[0]
    cfg = LlamaConfig(
        hidden_size=d,
        intermediate_size=inter,
        hidden_act="silu",
        num_attention_heads=4,
        num_key_value_heads=4,
    )

    def mlp(prefix: str) -> LlamaMLP:
        m = LlamaMLP(cfg)
        m.load_state_dict({k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)})
        return m

    we_moe = load_fusion_bench_module("fusion_bench.models.we_moe")
    moe = we_moe.WeightEnsemblingMoE(
        hidden_size=d, base_model=mlp("base."), expert_models=[mlp(f"expert{i}.") for i in range(T)],
        init_lambda=float(t["init_lambda"]), batch_first=True, router_hidden_layers=2, batch_reduce=False,
    )  # fmt: skip
    moe.gate.load_state_dict({k[len("gate.") :]: v for k, v in t.items() if k.startswith("gate.")})
    with torch.no_grad():
        y = moe(t["x"])
    save_file({"y": y.contiguous()}, sys.argv[2])


if __name__ == "__main__":
    main()
