"""Peer agreement: ``moerge build-moe`` vs ``mergekit-moe`` (mergekit 0.1.5, in the side venv ``.venv-mergekit``
that `./dev compat` makes; skipped without it) on the same tiny Llama base, three perturbed fine-tunes and the
same YAML. Both outputs are loaded with transformers and every tensor compared: with ``cheap_embed`` all of them
agree exactly; with ``hidden`` every tensor but the routers agrees exactly and the routers to bfloat16 round-off
(mergekit runs the base in bfloat16 for the prompts' hidden states, moerge in the base's float32)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
import yaml

from .test_mergekit_compat import PY

pytestmark = pytest.mark.skipif(
    PY is None, reason="mergekit is not installed in .venv-mergekit; `./dev compat` installs it (~10 s)"
)

MODES = ("cheap_embed", "hidden")
# mergekit-moe's click command run once per config in one process (its import costs seconds)
DRIVER = """
import sys
from mergekit.scripts.moe import main
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main([cfg, out], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from moerge.backbones.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("moe-compat")
    base = save_tiny_model(
        root / "base", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, seed=0
    )
    sd = load_file(str(base / "model.safetensors"))
    for i in range(3):
        shutil.copytree(base, root / f"ft{i}")
        g = torch.Generator().manual_seed(i + 1)
        noisy = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
        save_file(noisy, str(root / f"ft{i}" / "model.safetensors"), metadata={"format": "pt"})
    prompts = [(["abc def", "hello"], ["zzz"]), (["12 + 7 ="], None), (["the cat sat on", "a"], ["b c"])]
    args = []
    for mode in MODES:
        experts = [
            {"source_model": str(root / f"ft{i}"), "positive_prompts": pos, **({"negative_prompts": neg} if neg else {})}
            for i, (pos, neg) in enumerate(prompts)
        ]  # fmt: skip
        cfg = {"base_model": str(base), "gate_mode": mode, "dtype": "float32", "experts": experts}
        (root / f"{mode}.yaml").write_text(yaml.safe_dump(cfg))
        args += [str(root / f"{mode}.yaml"), str(root / f"mergekit-{mode}")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(PY), "-c", DRIVER, *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from moerge.merging.moe import build_moe

    for mode in MODES:
        build_moe(root / f"{mode}.yaml", root / f"moerge-{mode}")
    return root


@pytest.mark.parametrize("mode", MODES)
def test_build_moe_matches_mergekit_moe(outputs, mode):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(outputs / f"mergekit-{mode}").state_dict()
    ours = AutoModelForCausalLM.from_pretrained(outputs / f"moerge-{mode}").state_dict()
    assert theirs.keys() == ours.keys()
    for key, value in theirs.items():
        if mode == "hidden" and key.endswith("mlp.gate.weight"):
            torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-2)  # bfloat16 hidden states there
            cos = torch.nn.functional.cosine_similarity(ours[key], value, dim=-1)
            assert cos.min() > 0.9999, (key, cos)
        else:
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
