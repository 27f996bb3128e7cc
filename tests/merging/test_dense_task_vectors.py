"""Merging dense experts (full fine-tunes' task vectors) with ``lora_mode="dense"``: each parameter merged around
0, against the methods' formulas written out (task arithmetic, TIES' sign election left to its own tests,
Fisher, RegMean)."""

from __future__ import annotations

import pytest
import torch

import moerge
from moerge.experts.expert import Expert, ExpertMetadata
from moerge.experts.library import ExpertLibrary

SHAPES = {"layer.q.weight": (5, 4), "layer.norm.weight": (4,)}


def _experts(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        dense = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
        if i == 2:
            del dense["layer.norm.weight"]  # an expert that does not update the norm counts as zero there
        out.append(Expert(ExpertMetadata(name=f"full{i}", kind="dense"), dense=dense))
    return out


def test_task_arithmetic_sums_task_vectors():
    experts = _experts()
    merged = moerge.merge(experts=experts, lora_mode="dense", merge_method="task_arithmetic",
                          parameters={"scale": 0.4})  # fmt: skip
    assert merged.kind == "dense"
    for key, shape in SHAPES.items():
        expected = 0.4 * sum(e.dense.get(key, torch.zeros(shape)) for e in experts)
        torch.testing.assert_close(merged.dense[key], expected)


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_data_aware_merges_read_library_stats(tmp_path, method):
    """Fisher: Σ F_i τ_i / Σ F_i (floor 1e-6); RegMean: per linear weight (Σ G̃_i)⁻¹ Σ G̃_i τ_iᵀ with
    G̃ = αG + (1 − α)diag(G), other tensors averaged — the statistics read from library artifacts."""
    experts = _experts()
    lib = ExpertLibrary.create(tmp_path / "lib")
    g = torch.Generator().manual_seed(1)
    config = {"kind": "test"}
    stats = []
    for e in experts:
        lib.add(e)
        if method == "fisher":
            s = {k: torch.rand(sh, generator=g) for k, sh in SHAPES.items()}
            lib.put_artifact("fisher", config, e.name, s, {})
        else:
            x = torch.randn(20, 4, generator=g)
            s = {"layer.q.weight": x.T @ x}
            lib.put_artifact("gram", config, e.name, s, {})
        stats.append(s)
    merged = moerge.merge(experts=experts, lora_mode="dense", merge_method=method, library=str(lib.url),
                          stats_config=config)  # fmt: skip
    taus = [{k: e.dense.get(k, torch.zeros(sh)) for k, sh in SHAPES.items()} for e in experts]
    if method == "fisher":
        for key in SHAPES:
            f = [s[key] + 1e-6 for s in stats]
            expected = sum(fi * t[key] for fi, t in zip(f, taus)) / sum(f)
            torch.testing.assert_close(merged.dense[key], expected, rtol=1e-5, atol=1e-6)
    else:
        a = 0.9
        gt = [a * s["layer.q.weight"] + (1 - a) * torch.diag(torch.diag(s["layer.q.weight"])) for s in stats]
        rhs = sum(gi.double() @ t["layer.q.weight"].T.double() for gi, t in zip(gt, taus))
        expected = torch.linalg.solve(sum(gi.double() for gi in gt), rhs).T.float()
        torch.testing.assert_close(merged.dense["layer.q.weight"], expected, rtol=1e-4, atol=1e-5)
        norm = sum(t["layer.norm.weight"] for t in taus) / 3
        torch.testing.assert_close(merged.dense["layer.norm.weight"], norm)


def test_other_lora_modes_refuse_dense_experts():
    from moerge.errors import MalformedConfigError

    with pytest.raises(MalformedConfigError, match="only lora_mode 'dense'"):
        moerge.merge(experts=_experts(), lora_mode="svd", merge_method="ties", rank=2)
