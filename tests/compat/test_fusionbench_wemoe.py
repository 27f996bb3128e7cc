"""moerge's WEMoE module against FusionBench's ``WeightEnsemblingMoE`` (fusion_bench/models/we_moe.py) on the same
weights: a Llama MLP, three fine-tuned copies, the same router parameters, the same hidden states.

Runs when fusion-bench is installed in the side venv (``./dev compat`` installs it beside mergekit, ``--no-deps``;
``MOERGE_FUSIONBENCH_VENV`` may name another venv) and is skipped otherwise. FusionBench averages the router over
every token (its inputs have no padding); moerge averages over ``routing_mask``, so the comparison runs without a
mask (and once with an all-ones mask)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("fusionbench_driver.py")


def fusionbench_python() -> Path | None:
    venv = REPO / os.environ.get("MOERGE_FUSIONBENCH_VENV", ".venv-mergekit")
    py = venv / "bin" / "python"
    if py.exists() and any(venv.glob("lib/python3*/site-packages/fusion_bench/models/we_moe.py")):
        return py
    return None


PY = fusionbench_python()
pytestmark = pytest.mark.skipif(
    PY is None, reason="fusion-bench is not installed in the side venv; `./dev compat` installs it"
)


def test_wemoe_module_matches_fusionbench(tmp_path):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from moerge.model.weight_ensembling import WeightEnsemblingGate, WeightEnsemblingMoE, routing_mask

    torch.manual_seed(0)
    d, inter, T = 16, 24, 3
    cfg = LlamaConfig(
        hidden_size=d,
        intermediate_size=inter,
        hidden_act="silu",
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    base = LlamaMLP(cfg)
    experts = [LlamaMLP(cfg) for _ in range(T)]
    with torch.no_grad():
        for e in experts:
            e.load_state_dict({k: v + 0.1 * torch.randn_like(v) for k, v in base.state_dict().items()})
    gate = WeightEnsemblingGate(d, d, T, 0.3)
    with torch.no_grad():
        for p in gate.parameters():  # away from the init, so that the weights differ per example
            p.add_(0.5 * torch.randn_like(p))
    tvs = {k: torch.stack([e.state_dict()[k] - v for e in experts]) for k, v in base.state_dict().items()}
    ours = WeightEnsemblingMoE(base, tvs, gate)
    x = torch.randn(4, 5, d)

    tensors = {"x": x, "num_experts": torch.tensor(T), "init_lambda": torch.tensor(0.3)}
    tensors |= {f"base.{k}": v for k, v in base.state_dict().items()}
    tensors |= {f"expert{i}.{k}": v for i, e in enumerate(experts) for k, v in e.state_dict().items()}
    tensors |= {f"gate.{k}": v for k, v in gate.state_dict().items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "in.safetensors")
    subprocess.run([str(PY), str(DRIVER), str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    want = load_file(tmp_path / "out.safetensors")["y"]
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-6)
        with routing_mask(torch.ones(4, 5)):
            torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-6)
