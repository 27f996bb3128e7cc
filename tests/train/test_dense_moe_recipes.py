"""WEMoE, PWE MoE and Twin-Merging (moerge.recipes.weight_ensembling, moerge.recipes.twin_merging) on a tiny
Llama with dense experts (random full-fine-tune-like task vectors on every parameter): each built model against
a dense computation written out here (a plain copy of the model whose weights are set by hand, per example),
and each training objective lowered in a handful of steps."""

from __future__ import annotations

import copy

import pytest
import torch

from moerge.backbones.tiny import build_tiny_model
from moerge.experts.expert import Expert
from moerge.experts.metadata import ExpertMetadata
from moerge.recipes.recipe import BuildContext

T = 3
LAM = 0.3


@pytest.fixture(scope="module")
def setup():
    model, tok = build_tiny_model(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, seed=4)
    model.eval()
    g = torch.Generator().manual_seed(0)
    experts = []
    for t in range(T):
        dense = {n: 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
        experts.append(Expert(metadata=ExpertMetadata(name=f"e{t}", kind="dense"), dense=dense))
    texts = ["abc de", "hello there, world", "xyz", "the cat sat", "foo bar baz qux", "ok"]
    return model, tok, experts, texts


def ctx_of(setup) -> BuildContext:
    model, tok, experts, _ = setup
    return BuildContext(model=model, experts=experts, tokenizer=tok)


def plain_with(model, values: dict[str, torch.Tensor]):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in out.named_parameters():
            if n in values:
                p.copy_(values[n])
    return out


def test_wemoe_matches_a_dense_per_example_reference(setup):
    from moerge.model.weight_ensembling import routing_mask
    from moerge.recipes.weight_ensembling import WemoeOptions, build_wemoe_model, prompt_batch

    model, tok, experts, texts = setup
    built = build_wemoe_model(ctx_of(setup), WemoeOptions(steps=0))
    torch.manual_seed(1)
    gates = {}
    with torch.no_grad():  # routers away from their init, so that the weights differ per example and layer
        for name, m in built.named_modules():
            if type(m).__name__ == "WeightEnsemblingMoE":
                for p in m.gate.parameters():
                    p.add_(0.3 * torch.randn_like(p))
                gates[name] = {k: v.clone() for k, v in m.gate.state_dict().items()}
    ids, mask = prompt_batch(tok, texts[:4], 64)
    prompt = mask.clone()
    prompt[:, -1] = 0  # the router sees fewer tokens than the model runs on
    with routing_mask(prompt):
        got = built(input_ids=ids, attention_mask=mask).logits

    # by hand: θ₀ + λ Σ τ outside the MLPs; in each MLP, θ₀ + Σ_t w_t τ_t with w = mean over the prompt tokens
    # of fc2(relu(fc1 x)), x the MLP's input in that example
    tv = [e.dense for e in experts]
    base = dict(model.named_parameters())
    for b in range(ids.shape[0]):
        values = {n: p + LAM * sum(t[n] for t in tv) for n, p in base.items() if ".mlp." not in n}
        ref = plain_with(model, values)

        def hook(module, args, name, b=b):
            x = args[0]
            gs = gates[name]
            s = torch.relu(x @ gs["fc1.weight"].T + gs["fc1.bias"]) @ gs["fc2.weight"].T + gs["fc2.bias"]
            m = prompt[b : b + 1, : x.shape[1], None].float()
            w = (s * m).sum(1)[0] / m.sum()
            with torch.no_grad():
                for local, p in module.named_parameters():
                    key = f"{name}.{local}"
                    p.copy_(base[key] + sum(w[t] * tv[t][key] for t in range(T)))

        for name in gates:
            ref.get_submodule(name).register_forward_pre_hook(
                lambda mod, args, name=name: hook(mod, args, name)
            )
        want = ref(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1]).logits
        torch.testing.assert_close(got[b : b + 1], want, rtol=1e-4, atol=1e-5)


def test_wemoe_test_time_adaptation_lowers_the_entropy(setup):
    from moerge.model.weight_ensembling import routing_mask
    from moerge.recipes.weight_ensembling import (
        WemoeOptions,
        adapt_by_entropy,
        build_wemoe_model,
        next_token_entropy,
        prompt_batch,
    )

    model, tok, experts, texts = setup
    o = WemoeOptions(steps=15, lr=1e-2, batch_size=6)
    built = build_wemoe_model(ctx_of(setup), o)
    ids, mask = prompt_batch(tok, texts, 64)

    def entropy():
        with torch.no_grad(), routing_mask(mask):
            return float(next_token_entropy(built(input_ids=ids, attention_mask=mask).logits, mask))

    before = entropy()
    adapt_by_entropy(built, ids, mask, o)
    assert entropy() < before - 1e-3
    assert all(not p.requires_grad for n, p in built.named_parameters() if ".gate." not in n)


def test_wemoe_adapted_routers_are_cached_in_the_library(setup, tmp_path, monkeypatch):
    """A second build on the same inputs loads the adapted routers (adaptation made to fail) and gives the same
    logits; other inputs adapt anew."""
    from moerge.experts.library import ExpertLibrary
    from moerge.recipes import weight_ensembling as we
    from moerge.recipes.recipe import TargetData

    model, tok, experts, texts = setup
    lib = ExpertLibrary.create(tmp_path / "lib")
    target = TargetData("t", "full", tuple({"prompt": t, "completion": "x"} for t in texts))
    o = we.WemoeOptions(steps=3, lr=1e-2, batch_size=4)

    def ctx():
        return BuildContext(
            model=model, experts=experts, tokenizer=tok, library=lib, target=target, recipe="wemoe"
        )

    first = we._build_wemoe(ctx(), o)
    ids, mask = we.prompt_batch(tok, texts, 64)
    monkeypatch.setattr(
        we, "adapt_by_entropy", lambda *a, **k: pytest.fail("adapted again despite the cache")
    )
    second = we._build_wemoe(ctx(), o)
    torch.testing.assert_close(second.logits(ids, mask), first.logits(ids, mask))
    assert second.train_seconds == pytest.approx(first.train_seconds)
    other = TargetData("t", "full", tuple({"prompt": t + "!", "completion": "x"} for t in texts))
    with pytest.raises(pytest.fail.Exception, match="adapted again"):
        we._build_wemoe(
            BuildContext(model=model, experts=experts, tokenizer=tok, library=lib, target=other), o
        )


def test_pwe_moe_folds_to_the_dense_model_of_its_preference(setup):
    from moerge.model.weight_ensembling import fold_preferences, set_preference
    from moerge.recipes.weight_ensembling import PweMoeOptions, build_pwe_model

    model, tok, experts, texts = setup
    built = build_pwe_model(ctx_of(setup), PweMoeOptions())
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in built.named_parameters():
            if ".gate." in n:
                p.add_(0.3 * torch.randn_like(p))
    r = torch.tensor([0.6, 0.1, 0.3])
    set_preference(built, r)
    ids = torch.tensor([[1, 5, 9, 12, 3, 7], [1, 8, 8, 2, 4, 6]])
    routed = built(input_ids=ids).logits

    # by hand: per upscaled module (mlp and self_attn), w = fc2(relu(fc1 r)); θ₀ + Σ w_t τ_t there, θ₀ + λ Σ τ
    # elsewhere
    tv = [e.dense for e in experts]
    base = dict(model.named_parameters())
    gate = dict(built.named_parameters())
    values = {}
    for n, p in base.items():
        layer, _, rest = n.partition(".mlp.") if ".mlp." in n else n.partition(".self_attn.")
        if rest:
            module = layer + (".mlp" if ".mlp." in n else ".self_attn")
            g = {k: gate[f"{module}.gate.{k}"] for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
            w = torch.relu(g["fc1.weight"] @ r + g["fc1.bias"]) @ g["fc2.weight"].T + g["fc2.bias"]
            values[n] = p + sum(w[t] * tv[t][n] for t in range(T))
        else:
            values[n] = p + LAM * sum(t[n] for t in tv)
    want = plain_with(model, values)(input_ids=ids).logits
    torch.testing.assert_close(routed, want, rtol=1e-4, atol=1e-5)
    folded = fold_preferences(built)
    assert not any(type(m).__name__ == "PreferenceEnsembling" for m in folded.modules())
    torch.testing.assert_close(folded(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)


def test_pwe_moe_training_lowers_the_scalarised_loss(setup):
    from moerge.model.weight_ensembling import set_preference
    from moerge.recipes.weight_ensembling import PweMoeOptions, build_pwe_model, train_pwe
    from moerge.train.loop import causal_lm_loss
    from moerge.train.router import router_batches

    model, tok, experts, texts = setup
    rows = [[{"prompt": f"{x} ", "completion": x[::-1] if t else x.upper()} for x in texts] for t in range(T)]
    o = PweMoeOptions(steps=20, lr=1e-2, batch_size=6)
    built = build_pwe_model(ctx_of(setup), o)
    fixed = [router_batches(tok, r, 6, 1, 0, 64)[0] for r in rows]
    r = torch.full((T,), 1.0 / T)

    def loss():
        set_preference(built, r)
        with torch.no_grad():
            return sum(float(causal_lm_loss(built(input_ids=b[0], attention_mask=b[2]).logits, b[1])) / T
                       for b in fixed)  # fmt: skip

    before = loss()
    train_pwe(built, tok, rows, o)
    assert loss() < before - 1e-3


@pytest.mark.parametrize("rank", [2, 64])
def test_twin_merging_matches_a_dense_per_example_reference(setup, rank):
    from moerge.recipes.twin_merging import TwinOptions, build_twin
    from moerge.recipes.weight_ensembling import prompt_batch

    model, tok, experts, texts = setup
    o = TwinOptions(rank=rank)
    torch.manual_seed(3)
    twin = build_twin(ctx_of(setup), o)
    with torch.no_grad():
        for p in twin.router.parameters():
            p.add_(0.5 * torch.randn_like(p))
        twin.router.bn1.running_mean.normal_()
        twin.router.bn3.running_var.uniform_(0.5, 2.0)
    ids, mask = prompt_batch(tok, texts[:4], 64)
    prompt = mask.clone()
    prompt[:, -1] = 0
    got = twin.logits(ids, mask, prompt)

    # by hand: θ* = θ₀ + λ Σ τ; per example w = softmax(router(mean of θ*'s last hidden states over the prompt));
    # each linear weight θ* + Σ_t w_t SVD_r(θ_t − θ*), every other parameter θ*
    tv = [e.dense for e in experts]
    base = dict(model.named_parameters())
    shared = {n: p + LAM * sum(t[n] for t in tv) for n, p in base.items()}
    star = plain_with(model, shared)
    linear = {n for n in base if n.endswith(".weight") and isinstance(
        model.get_submodule(n[: -len(".weight")]), torch.nn.Linear)}  # fmt: skip
    assert "lm_head.weight" in linear or "model.layers.0.mlp.up_proj.weight" in linear
    for b in range(ids.shape[0]):
        h = star(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1], output_hidden_states=True)
        m = prompt[b, :, None].float()
        feat = (h.hidden_states[-1][0] * m).sum(0, keepdim=True) / m.sum()
        with torch.no_grad():
            w = twin.router(feat).softmax(-1)[0]
        values = dict(shared)
        for n in linear:
            for t in range(T):
                U, S, Vh = torch.linalg.svd(base[n] + tv[t][n] - shared[n], full_matrices=False)
                k = min(rank, S.numel())
                values[n] = values[n] + w[t] * (U[:, :k] @ torch.diag(S[:k]) @ Vh[:k])
        want = plain_with(model, values)(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1]).logits
        torch.testing.assert_close(got[b : b + 1], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(twin.last_weights[b], w)


def test_twin_router_training_lowers_the_cross_entropy():
    from moerge.recipes.twin_merging import TwinOptions, train_twin_router

    g = torch.Generator().manual_seed(0)
    y = torch.arange(T).repeat(40)
    x = torch.randn(len(y), 16, generator=g) + 1.5 * torch.nn.functional.one_hot(y, 16).float()
    router, losses = train_twin_router(x, y, T, TwinOptions(epochs=20, lr=5e-3, batch_size=32))
    assert losses[-1] < 0.7 * losses[0]
    with torch.no_grad():
        assert float((router(x).argmax(-1) == y).float().mean()) > 0.8
