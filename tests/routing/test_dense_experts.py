"""Dense experts (full fine-tunes' task vectors) in the routed model, against dense references written out:
an explicit loop over experts for the layer, and the expert updates folded into a copy of the model's weights
for the whole routed model (one copy per example)."""

from __future__ import annotations

import copy

import pytest
import torch
from _routing_helpers import linear_module_names, make_experts

from moerge.errors import RoutingError
from moerge.experts.expert import Expert, ExpertMetadata
from moerge.model.expert_layer import dense_delta
from moerge.recipes import attach
from moerge.routing.fixed import FixedRouter
from moerge.routing.inputs import RoutingInputs
from moerge.routing.selection import Selection

E, D_IN, D_OUT = 5, 9, 6


def _sparse(rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(rows)])
    return idx, torch.rand(rows, k, generator=g)


@pytest.mark.parametrize("per", ["token", "example"])
@pytest.mark.parametrize("aggregation", ["output", "parameter"])
@pytest.mark.parametrize("k", [2, None])
def test_dense_delta_matches_loop(per, aggregation, k):
    """Experts 1, 3, 4 are dense (ΔW_e, Δb_e); the others are not in the stack and must contribute nothing."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([1, 3, 4])
    D = torch.randn(3, D_OUT, D_IN, generator=g)
    Db = torch.randn(3, D_OUT, generator=g)
    B, T = 3, 4
    x = torch.randn(B, T, D_IN, generator=g)
    rows = B * T if per == "token" else B
    if k is None:
        sel = Selection(torch.rand(rows, E, generator=g), None, per)
    else:
        idx, w = _sparse(rows, k, seed=1)
        sel = Selection(w, idx, per)
    got = dense_delta(x, D, Db, ids, E, sel, aggregation)
    W = sel.dense(E)
    expected = torch.zeros(B, T, D_OUT)
    for b in range(B):
        for t in range(T):
            row = b * T + t if per == "token" else b
            for j, e in enumerate(ids.tolist()):
                expected[b, t] += W[row, e] * (D[j] @ x[b, t] + Db[j])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _dense_experts(model, num, seed, with_norm):
    """Random full-fine-tune task vectors: every linear weight (and bias), plus the final norm when asked."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = []
    for i in range(num):
        dense = {}
        for n in linear_module_names(model):
            for leaf in ("weight", "bias"):
                p = params.get(f"{n}.{leaf}")
                if p is not None:
                    dense[f"{n}.{leaf}"] = torch.randn(p.shape, generator=gen) * 0.05
        if with_norm:
            norm = next(k for k in params if "norm" in k or k.startswith("transformer.ln_f"))
            dense[norm] = torch.randn(params[norm].shape, generator=gen) * 0.1
        md = ExpertMetadata(name=f"full{i}", task=f"task{i}", kind="dense")
        out.append(Expert(md, dense=dense))
    return out


def _folded_logits(model, experts, weights, ids, unrouted_keys):
    """Per example b: a copy of the model with W + Σ_e w_be ΔW_e on the routed (linear) parameters and the
    experts' mean update on the unrouted ones, run on example b alone."""
    rows = []
    for b in range(ids.shape[0]):
        m = copy.deepcopy(model)
        params = dict(m.named_parameters())
        with torch.no_grad():
            for e, ex in enumerate(experts):
                updates = dict(ex.dense) or {
                    f"{k}.weight": lm.delta_for_weight() for k, lm in ex.lora.items()
                }
                for key, d in updates.items():
                    scale = 1.0 / len(experts) if key in unrouted_keys else float(weights[b, e])
                    params[key].add_(d, alpha=scale)
        rows.append(m(input_ids=ids[b : b + 1]).logits[0])
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("aggregation", ["output", "parameter"])
def test_routed_dense_and_lora_match_folding(arch, aggregation, request):
    """A mixed library (two dense experts, one LoRA) routed with per-example weights gives the same logits as
    folding each example's weighted experts into the weights; the norm's updates are averaged statically, and
    detach restores the model exactly."""
    base, _ = request.getfixturevalue(arch)
    model = copy.deepcopy(base).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    experts = _dense_experts(model, 2, seed=3, with_norm=True) + make_experts(model, 1, seed=4)
    norm_key = next(k for k in experts[0].dense if "norm" in k or "ln_f" in k)
    ids = torch.randint(3, 40, (3, 7), generator=torch.Generator().manual_seed(5))
    w = torch.tensor([[0.7, 0.0, 0.3], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    expected = _folded_logits(model, experts, w, ids, {norm_key})
    routed = attach(
        model, experts, router=FixedRouter(torch.ones(3)), aggregation=aggregation, unrouted="average"
    )
    with torch.no_grad():
        got = routed(input_ids=ids, routing=RoutingInputs(weights=w)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    layer = next(iter(routed.expert_layers.values()))
    assert layer.num_dense == 2 and layer.has_lora
    from moerge.model.routed import detach

    detach(routed)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unrouted_updates_refused_by_default(tiny_llama):
    model = copy.deepcopy(tiny_llama[0])
    experts = _dense_experts(model, 2, seed=6, with_norm=True)
    with pytest.raises(RoutingError, match="unrouted='average'"):
        attach(model, experts, router=FixedRouter(torch.ones(2)))
    assert not any(type(m).__name__ == "ExpertLayer" for m in model.modules())


def test_factor_aggregation_refused_for_dense(tiny_llama):
    model = copy.deepcopy(tiny_llama[0])
    experts = _dense_experts(model, 2, seed=7, with_norm=False)
    routed = attach(model, experts, router=FixedRouter(torch.ones(2)), aggregation="factor")
    with pytest.raises(RoutingError, match="factor aggregation"):
        routed(input_ids=torch.tensor([[3, 4, 5]]))
