"""Routed models (tiny Llama, tiny GPT-2 with Conv1D, a plain MLP) against dense references written out here."""

from __future__ import annotations

import copy

import pytest
import torch
from _routing_helpers import make_experts
from torch import nn

from moerge.model.expert_layer import ExpertLayer
from moerge.recipes.facade import attach, detach
from moerge.routing.inputs import RoutingInputs


def run(model, x):
    if isinstance(x, dict):
        return model(**x).logits
    return model(x)


def inputs_for(kind, B=3, T=6):
    g = torch.Generator().manual_seed(7)
    if kind == "mlp":
        return torch.randn(B, 16, generator=g)
    return {"input_ids": torch.randint(4, 95, (B, T), generator=g)}


def merged_copy(model, experts, weights):
    """Reference: a copy of the base model whose weights carry Σ_e w_e ΔW_e, written out expert by expert."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for e, expert in enumerate(experts):
            for name, lm in expert.lora.items():
                ref.get_submodule(name).weight += weights[e] * lm.delta_for_weight()
    return ref


def slice_inputs(x, b):
    if isinstance(x, dict):
        return {k: v[b : b + 1] for k, v in x.items()}
    return x[b : b + 1]


@pytest.fixture(params=["llama", "gpt2", "mlp"])
def setup(request, tiny_llama, tiny_gpt2, mlp):
    model = {"llama": tiny_llama[0], "gpt2": tiny_gpt2[0], "mlp": mlp}[request.param]
    model = copy.deepcopy(model)
    return request.param, model, make_experts(model, 5)


@pytest.mark.parametrize("aggregation", ["output", "parameter"])
def test_mixed_batch_matches_merged_reference(setup, aggregation):
    """Each example has its own expert set and weights; equals running it through its own merged model."""
    kind, model, experts = setup
    x = inputs_for(kind)
    weights = torch.tensor([[0.7, 0.0, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    routed = attach(model, experts, recipe="uniform", aggregation=aggregation)
    routing = RoutingInputs(weights=weights)
    got = routed(**x, routing=routing).logits if isinstance(x, dict) else routed(x, routing=routing)
    detach(routed)
    for b in range(3):
        want = run(merged_copy(model, experts, weights[b]), slice_inputs(x, b))
        torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=1e-4)


class ArrowReferenceLayer(nn.Module):
    """Arrow written out: dense ΔW per expert, prototypes from a full SVD, a loop over tokens and experts."""

    def __init__(self, base, mods, k, T=1.0, per_example=False):
        super().__init__()
        self.base, self.k, self.T, self.per_example = base, k, T, per_example
        self.deltas = [m.delta() for m in mods]  # nn.Linear layout [d_out, d_in]
        self.protos = [torch.linalg.svd(d)[2][0] for d in self.deltas]

    def forward(self, x):
        out = self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        extra = torch.zeros(flat.shape[0], out.shape[-1])
        T = x.shape[1]
        for n in range(flat.shape[0]):
            scores = torch.stack([(flat[n] @ v).abs() for v in self.protos]) / self.T
            if self.per_example:  # one decision per example: the mean of its tokens' scores
                b = n // T
                scores = (
                    torch.stack([(flat[b * T : (b + 1) * T] @ v).abs().mean() for v in self.protos]) / self.T
                )
            top, idx = torch.topk(scores, self.k)
            w = torch.softmax(top, 0)
            for wt, e in zip(w, idx.tolist()):
                extra[n] += wt * (self.deltas[e] @ flat[n])
        return out + extra.view(*out.shape)


@pytest.mark.parametrize("k", [1, 2])
def test_arrow_token_routing_matches_reference(setup, k):
    kind, model, experts = setup
    x = inputs_for(kind)
    ref = copy.deepcopy(model)
    for name in experts[0].lora:
        parent, _, child = name.rpartition(".")
        holder = ref.get_submodule(parent) if parent else ref
        setattr(
            holder, child, ArrowReferenceLayer(ref.get_submodule(name), [e.lora[name] for e in experts], k)
        )
    with torch.no_grad():
        want = run(ref, x)
        routed = attach(model, experts, recipe="arrow", k=k)
        got = run(routed, x)
    detach(routed)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_arrow_example_granularity_matches_reference(tiny_llama):
    """granularity='example' (an option, not new code): each example's tokens share one decision per module."""
    model = copy.deepcopy(tiny_llama[0])
    experts = make_experts(model, 5)
    x = inputs_for("llama")
    ref = copy.deepcopy(model)
    for name in experts[0].lora:
        parent, _, child = name.rpartition(".")
        setattr(
            ref.get_submodule(parent),
            child,
            ArrowReferenceLayer(
                ref.get_submodule(name), [e.lora[name] for e in experts], 2, per_example=True
            ),
        )
    with torch.no_grad():
        want = ref(**x).logits
        routed = attach(model, experts, recipe="arrow", k=2, granularity="example")
        got = routed(**x, routing=RoutingInputs(record=True)).logits
    w = next(iter(routed.last_routing().values()))
    assert torch.equal(w, w[:, :1].expand_as(w))  # the same weights for every token of an example
    detach(routed)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_detach_restores_the_original_model(setup):
    kind, model, experts = setup
    x = inputs_for(kind)
    originals = {n: m for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = run(model, x)
    routed = attach(model, experts, recipe="arrow", k=2)
    assert any(isinstance(m, ExpertLayer) for m in model.modules())
    assert not torch.allclose(run(routed, x), before)
    back = detach(routed)
    assert back is model
    assert {n: m for n, m in model.named_modules()} == originals
    assert not any(isinstance(m, ExpertLayer) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    torch.testing.assert_close(run(model, x), before, atol=0, rtol=0)


def test_inner_model_is_never_routed(tiny_llama):
    model = copy.deepcopy(tiny_llama[0])
    x = inputs_for("llama")
    before = model(**x).logits
    routed = attach(model, make_experts(model, 3), recipe="uniform")
    torch.testing.assert_close(routed.model(**x).logits, before)
    detach(routed)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_kv_cache_routes_every_new_token(arch, tiny_llama, tiny_gpt2):
    """Greedy generation with the KV cache equals generation recomputing the whole prefix each step, and the
    recorded routing covers every generated token."""
    model = copy.deepcopy({"llama": tiny_llama, "gpt2": tiny_gpt2}[arch][0])
    experts = make_experts(model, 6, scale=0.5)
    routed = attach(model, experts, recipe="arrow", k=2)
    ids = inputs_for("llama", B=2, T=5)["input_ids"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = routed.generate(ids, use_cache=True, routing=RoutingInputs(record=True), **kw)
    weights = routed.last_routing()
    uncached = routed.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    w = next(iter(weights.values()))
    assert w.shape[:2] == (2, 5 + 6 - 1)  # prompt + one step per new token but the last
    assert torch.all((w > 0).sum(-1) == 2)
    # the last step's logits equal a full forward over the generated prefix
    full = routed(input_ids=cached[:, :-1]).logits[:, -1]
    assert torch.equal(full.argmax(-1), cached[:, -1])
    detach(routed)


def test_task_oracle_and_single_expert(tiny_llama):
    model = copy.deepcopy(tiny_llama[0])
    experts = make_experts(model, 4)
    x = inputs_for("llama")
    routed = attach(model, experts, recipe="oracle")
    got = routed(**x, routing=RoutingInputs(task_names=["task2", "task0", "task2"])).logits
    detach(routed)
    for b, e in enumerate([2, 0, 2]):
        onehot = torch.zeros(4)
        onehot[e] = 1
        torch.testing.assert_close(
            got[b : b + 1],
            merged_copy(model, experts, onehot)(**slice_inputs(x, b)).logits,
            atol=1e-5,
            rtol=1e-4,
        )
    routed = attach(model, experts, recipe="single_expert", expert="expert3")
    got = routed(**x).logits
    detach(routed)
    torch.testing.assert_close(
        got, merged_copy(model, experts, torch.tensor([0, 0, 0, 1.0]))(**x).logits, atol=1e-5, rtol=1e-4
    )
