"""LoRA merges: exact / factor / svd / dense against dense references, and against PEFT's add_weighted_adapter."""

from __future__ import annotations

import pytest
import torch

from moerge.errors import MalformedConfigError
from moerge.merging.lora import merge_lora_experts
from moerge.merging.registry import get_method, validate_params

from .conftest import LLAMA_MODULES, TINY, make_lora_expert


def lmerge(experts, method, weights, mode, **params):
    spec = get_method(method)
    rank = params.pop("rank", None)
    fw = params.pop("factor_weights", "sqrt")
    g, pm = validate_params(spec, params, [{"weight": w} for w in weights])
    return merge_lora_experts(spec, experts, g, pm, mode=mode, rank=rank, factor_weights=fw)


def test_exact_is_the_weighted_sum_of_deltas_and_lossless(lora_experts):
    w = [0.5, -1.0, 2.0]
    out = lmerge(lora_experts, "task_arithmetic", w, "exact", scale=0.7)
    for m in LLAMA_MODULES:
        expected = 0.7 * sum(
            wi * (e.lora[m].scaling * e.lora[m].B @ e.lora[m].A) for wi, e in zip(w, lora_experts)
        )
        torch.testing.assert_close(out.lora[m].delta(), expected, rtol=1e-5, atol=1e-5)
        assert out.lora[m].rank == 12
    assert out.metadata.extra["merge_exact"] is True and out.metadata.training["merge"]
    lin = lmerge(lora_experts, "linear", [1.0, 1.0, 2.0], "exact")
    m = next(iter(LLAMA_MODULES))
    torch.testing.assert_close(
        lin.lora[m].delta(), sum(c * e.lora[m].delta() for c, e in zip([0.25, 0.25, 0.5], lora_experts))
    )


def test_exact_handles_mixed_ranks_and_missing_modules():
    e1 = make_lora_expert("a", LLAMA_MODULES, rank=2, alpha=4, seed=1)
    mods = dict(list(LLAMA_MODULES.items())[:2])
    e2 = make_lora_expert("b", mods, rank=5, alpha=5, seed=2)
    out = lmerge([e1, e2], "task_arithmetic", [1.0, 1.0], "exact")
    for m in LLAMA_MODULES:
        expected = e1.lora[m].delta() + (e2.lora[m].delta() if m in e2.lora else 0)
        torch.testing.assert_close(out.lora[m].delta(), expected, rtol=1e-5, atol=1e-5)


def test_exact_refuses_nonlinear_methods(lora_experts):
    with pytest.raises(MalformedConfigError, match="not linear.*svd"):
        lmerge(lora_experts, "ties", [1, 1, 1], "exact", density=0.5)


def test_factor_mode_is_the_product_of_merged_factors(lora_experts):
    w = [0.5, 1.0, 2.0]
    out = lmerge(lora_experts, "task_arithmetic", w, "factor")
    for m in LLAMA_MODULES:
        ws = [wi * e.lora[m].scaling for wi, e in zip(w, lora_experts)]
        A = sum(wi**0.5 * e.lora[m].A for wi, e in zip(ws, lora_experts))
        B = sum(wi**0.5 * e.lora[m].B for wi, e in zip(ws, lora_experts))
        torch.testing.assert_close(out.lora[m].delta(), B @ A, rtol=1e-5, atol=1e-5)
        exact = sum(wi * e.lora[m].delta() for wi, e in zip(w, lora_experts))
        assert (out.lora[m].delta() - exact).norm() > 1e-2 * exact.norm()  # cross terms: an approximation
    assert out.metadata.extra["merge_exact"] is False and "approximation" in out.metadata.extra["merge_note"]


def test_svd_mode_is_the_best_low_rank_approximation(lora_experts):
    full = lmerge(lora_experts, "task_arithmetic", [1, 1, 1], "svd", rank=12)
    trunc = lmerge(lora_experts, "task_arithmetic", [1, 1, 1], "svd", rank=3)
    for m in LLAMA_MODULES:
        exact = sum(e.lora[m].delta() for e in lora_experts)
        torch.testing.assert_close(full.lora[m].delta(), exact, rtol=1e-4, atol=1e-4)
        s = torch.linalg.svdvals(exact.double())
        err = (trunc.lora[m].delta().double() - exact.double()).norm()
        torch.testing.assert_close(err, s[3:].norm(), rtol=1e-4, atol=1e-5)  # Eckart–Young


def test_task_vector_methods_act_on_delta_w(lora_experts):
    out = lmerge(lora_experts, "ties", [1, 1, 1], "dense", density=0.3)
    spec = get_method("ties")
    g, pm = validate_params(spec, {"density": 0.3}, [{}, {}, {}])
    for m in LLAMA_MODULES:
        deltas = torch.stack([e.lora[m].delta() for e in lora_experts])
        expected = spec.fn(
            deltas,
            torch.ones(3),
            density=torch.full((3,), 0.3),
            sign="mass",
            normalize=True,
            scale=1.0,
            rescale="none",
        )
        torch.testing.assert_close(out.dense[m + ".weight"], expected)
    assert out.kind == "dense"


def test_modes_are_explicit_in_the_api(lora_experts):
    import moerge

    with pytest.raises(MalformedConfigError, match="lora_mode"):
        moerge.merge(merge_method="linear", experts=lora_experts)
    e = moerge.merge(merge_method="linear", experts=lora_experts, lora_mode="exact", name="soup")
    assert e.name == "soup" and e.metadata.extra["merge_lora_mode"] == "exact"


# ------------------------------------------------------------------------------------------------- PEFT peer


@pytest.fixture(scope="module")
def peft_model(lora_experts, tmp_path_factory):
    """A PEFT model over the tiny Llama holding our experts as adapters e0, e1, e2 (and same-scaling twins)."""
    from peft import PeftModel

    from moerge.backbones.tiny import build_tiny_model
    from moerge.experts.peft_io import write_peft_folder

    root = tmp_path_factory.mktemp("peft")
    model, _ = build_tiny_model(**TINY, seed=0)
    unit = [make_lora_expert(f"u{i}", LLAMA_MODULES, rank=4, alpha=4.0, seed=40 + i) for i in range(2)]
    experts = list(lora_experts) + unit
    for e in experts:
        write_peft_folder(e, root / e.name)
    pm = PeftModel.from_pretrained(model, str(root / experts[0].name), adapter_name=experts[0].name)
    for e in experts[1:]:
        pm.load_adapter(str(root / e.name), adapter_name=e.name)
    return pm, {e.name: e for e in experts}


def peft_delta(pm, adapter: str, module: str) -> torch.Tensor:
    layer = pm.base_model.model.get_submodule(module)
    return layer.get_delta_weight(adapter).detach()


def test_peft_cat_equals_exact(peft_model):
    pm, experts = peft_model
    w = [0.7, -0.4, 1.5]
    pm.base_model.add_weighted_adapter(["e0", "e1", "e2"], w, "cat_mix", combination_type="cat")
    ours = lmerge([experts[n] for n in ("e0", "e1", "e2")], "task_arithmetic", w, "exact")
    for m in LLAMA_MODULES:
        layer = pm.base_model.model.get_submodule(m)
        torch.testing.assert_close(layer.lora_A["cat_mix"].weight.detach(), ours.lora[m].A)
        torch.testing.assert_close(layer.lora_B["cat_mix"].weight.detach(), ours.lora[m].B)
        torch.testing.assert_close(peft_delta(pm, "cat_mix", m), ours.lora[m].delta(), rtol=1e-5, atol=1e-6)


def test_peft_linear_equals_factor(peft_model):
    pm, experts = peft_model
    w = [0.7, -0.4, 1.5]
    pm.base_model.add_weighted_adapter(["e0", "e1", "e2"], w, "lin_mix", combination_type="linear")
    ours = lmerge([experts[n] for n in ("e0", "e1", "e2")], "task_arithmetic", w, "factor")
    for m in LLAMA_MODULES:
        torch.testing.assert_close(peft_delta(pm, "lin_mix", m), ours.lora[m].delta(), rtol=1e-5, atol=1e-6)


def test_peft_ties_equals_factor_ties_for_unit_weights(peft_model):
    """Definitions coincide when every wᵢ·sᵢ = 1 (PEFT divides by the count, mergekit/moerge by Σ wᵢ·maskᵢ)."""
    pm, experts = peft_model
    pm.base_model.add_weighted_adapter(
        ["u0", "u1"], [1.0, 1.0], "ties_mix", combination_type="ties", density=0.5
    )
    ours = lmerge([experts["u0"], experts["u1"]], "ties", [1.0, 1.0], "factor", density=0.5)
    for m in LLAMA_MODULES:
        torch.testing.assert_close(peft_delta(pm, "ties_mix", m), ours.lora[m].delta(), rtol=1e-5, atol=1e-6)


def test_peft_svd_equals_svd_mode(peft_model):
    pm, experts = peft_model
    w = [0.7, 0.4, 1.5]
    pm.base_model.add_weighted_adapter(["e0", "e1", "e2"], w, "svd_mix", combination_type="svd", svd_rank=6)
    ours = lmerge([experts[n] for n in ("e0", "e1", "e2")], "task_arithmetic", w, "svd", rank=6)
    for m in LLAMA_MODULES:
        torch.testing.assert_close(peft_delta(pm, "svd_mix", m), ours.lora[m].delta(), rtol=1e-4, atol=1e-5)
