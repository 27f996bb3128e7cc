"""Learned routers (MoLE, LoRA-Flow, AdapterFusion, MeteoRA, SMEAR, PEMT, MixDA): each routed module's output checked against a
dense computation written out here from each expert's ΔW and the router's parameters; the one training path
(loss goes down, only the router changes, a second build loads the cached router and trains nothing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moerge
from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
from moerge.recipes.recipe import TargetData
from moerge.routing.learned import key

SUFFIXES = ("q_proj", "v_proj", "down_proj")


def make_expert(model, name: str, seed: int, scale: float) -> Expert:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n.endswith(SUFFIXES):
            A = torch.randn(2, m.in_features, generator=g) * 0.5
            B = torch.randn(m.out_features, 2, generator=g) * scale
            lora[n] = LoraModule(A=A, B=B, alpha=4.0)
    return Expert(metadata=ExpertMetadata(name=name, base_model="tiny", kind="lora"), lora=lora)


@pytest.fixture(scope="module")
def setup(tiny_llama, reverse_data):
    """Two experts that hurt the model and one that changes nothing: a router that learns anything learns to
    prefer the third."""
    model, tok = tiny_llama
    experts = [
        make_expert(model, "loud", 0, 1.0),
        make_expert(model, "noisy", 1, 1.0),
        make_expert(model, "quiet", 2, 0.0),
    ]
    return model, tok, experts, reverse_data


def delta(expert: Expert, module: str) -> torch.Tensor:
    lm = expert.lora[module]
    return lm.scaling * lm.B @ lm.A  # ΔW [d_out, d_in]


def perturb(router, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if p.ndim == 0:  # a temperature: positive
                p.abs_().add_(0.5)


def run_layer(routed, module: str, x: torch.Tensor, mask: torch.Tensor | None = None, before=()):
    layer = routed.expert_layers[module]
    with (
        torch.no_grad(),
        routed.call(input_ids=torch.zeros(x.shape[:2], dtype=torch.long), attention_mask=mask),
    ):
        for m, xm in before:  # modules that run first in the same forward (LoRA-Flow's layer gate)
            routed.expert_layers[m](xm)
        return layer(x)


def target(rows, n=24, mode="few-shot"):
    return TargetData("reverse", mode, tuple(rows[:n]), tuple(rows[n : n + 8]))


@pytest.fixture
def attached(setup):
    model, tok, experts, rows = setup
    made = []

    def attach(recipe, library=None, **options):
        routed = moerge.attach(
            model, library if library is not None else experts, recipe, tokenizer=tok, **options
        )
        made.append(routed)
        return routed

    yield attach
    for r in made:
        moerge.detach(r)


MODULE = "model.layers.1.self_attn.q_proj"


def test_mole_gate_over_outputs_matches_dense_and_masks_without_retraining(setup, attached, tmp_path):
    model, _, experts, rows = setup
    lib = moerge.ExpertLibrary.create(tmp_path / "lib")
    for e in experts:
        lib.add(e)
    routed = attached("mole", lib, target=target(rows), steps=2)
    perturb(routed.router)
    x = torch.randn(2, 5, 32)
    gate = routed.router.net[key(MODULE)]
    outs = torch.stack([x @ delta(e, MODULE).T for e in experts], dim=2)  # [B, T, E, d_out]
    xi = F.layer_norm(outs.reshape(2, 5, -1), (outs.shape[2] * outs.shape[3],))
    logits = (xi @ gate.weight.T + gate.bias) / gate.temperature  # τ is learned (perturbed here)
    base = routed.expert_layers[MODULE].base(x)
    want = base + (torch.softmax(logits, -1)[..., None] * outs).sum(2)
    torch.testing.assert_close(run_layer(routed, MODULE, x), want, rtol=1e-4, atol=1e-5)
    # masking "noisy" at inference: softmax over the other two logits, no training (the cache is hit)
    state = routed.router.state()
    moerge.detach(routed)
    from moerge.train import router as router_module

    calls = []
    original = router_module.train_router
    router_module.train_router = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        masked = attached("mole", lib, target=target(rows), steps=2, mask=["noisy"])
    finally:
        router_module.train_router = original
    assert calls == []
    masked.router.load_state(state)
    keep = [0, 2]
    w = torch.softmax(logits[..., keep], -1)
    want = base + (w[..., None] * outs[:, :, keep]).sum(2)
    torch.testing.assert_close(run_layer(masked, MODULE, x), want, rtol=1e-4, atol=1e-5)


def test_lora_flow_layer_gate_from_the_first_module_matches_dense(setup, attached):
    _, _, experts, rows = setup
    routed = attached("lora_flow", target=target(rows), steps=1)
    perturb(routed.router)
    leader, other = "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    assert routed.router.leaders["layer.1"] == leader and routed.router.groups[other] == "layer.1"
    x1, x2 = torch.randn(1, 4, 32), torch.randn(1, 4, 64)
    gate = routed.router.net[key("layer.1")]
    w = torch.softmax(x1 @ gate.weight.T, -1) + gate.bias  # softmax(W x) + b, from the leader's input
    base = routed.expert_layers[other].base(x2)
    want = base + sum(w[..., e, None] * (x2 @ delta(ex, other).T) for e, ex in enumerate(experts))
    torch.testing.assert_close(
        run_layer(routed, other, x2, before=[(leader, x1)]), want, rtol=1e-4, atol=1e-5
    )


def test_adapter_fusion_attention_over_outputs_matches_dense(setup, attached, reverse_data):
    _, _, experts, rows = setup
    routed = attached("adapter_fusion", target=target(rows, mode="full"), steps=1)
    perturb(routed.router)
    x = torch.randn(2, 3, 32)
    pair = routed.router.net[key(MODULE)]
    base = routed.expert_layers[MODULE].base(x)
    outs = torch.stack([x @ delta(e, MODULE).T for e in experts], dim=2)  # [B, T, E, d]
    q = base @ pair["query"].weight.T + pair["query"].bias
    k = outs @ pair["key"].weight.T + pair["key"].bias
    alpha = torch.softmax((q[:, :, None, :] * k).sum(-1), -1)
    want = base + (alpha[..., None] * outs).sum(2)
    torch.testing.assert_close(run_layer(routed, MODULE, x), want, rtol=1e-4, atol=1e-5)


def test_adapter_fusion_refuses_few_shot_data(setup):
    model, tok, experts, rows = setup
    with pytest.raises(moerge.errors.RecipeNotApplicableError, match="needs full target data"):
        moerge.attach(model, experts, "adapter_fusion", tokenizer=tok, target=target(rows))


@pytest.fixture(scope="module")
def joint_library(setup, tmp_path_factory):
    """A library whose experts' own data trained the MeteoRA and SMEAR routers (one artifact each)."""
    model, tok, experts, rows = setup
    lib = moerge.ExpertLibrary.create(tmp_path_factory.mktemp("joint") / "lib")
    for e in experts:
        lib.add(e)
    data = {e.name: rows[:16] for e in experts}
    for recipe in ("meteora", "smear"):
        done = moerge.recipes.prepare_signatures(recipe, model, tok, lib, data, steps=8)
        assert len(done) == 1 and "3 experts" in done[0]
        assert moerge.recipes.prepare_signatures(recipe, model, tok, lib, data, steps=8) == []  # cached
    return lib, data


def test_meteora_top2_gate_matches_dense(setup, attached, joint_library):
    _, _, experts, _ = setup
    routed = attached("meteora", joint_library[0], steps=8)
    assert routed.router.train_seconds > 0 and routed.router.trainable_parameters == 3 * 2 * (32 + 32 + 64)
    perturb(routed.router)
    x = torch.randn(1, 6, 32)
    logits = x @ routed.router.net[key(MODULE)].weight.T
    top, idx = logits.topk(2, -1)
    w = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, -1))
    base = routed.expert_layers[MODULE].base(x)
    want = base + sum(w[..., e, None] * (x @ delta(ex, MODULE).T) for e, ex in enumerate(experts))
    torch.testing.assert_close(run_layer(routed, MODULE, x), want, rtol=1e-4, atol=1e-5)


def test_smear_merges_parameters_per_example_from_the_masked_mean(setup, attached, joint_library):
    _, _, experts, _ = setup
    routed = attached("smear", joint_library[0], steps=8)
    assert routed.aggregation == "parameter" and routed.router.train_seconds > 0
    perturb(routed.router)
    x = torch.randn(2, 4, 32)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    gate = routed.router.net[key(MODULE)]
    pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    # the official router: LayerNorm of the pooled input times the per-expert-normalised weights, plus a bias
    normed = F.layer_norm(pooled, (32,), gate.input_norm.weight, gate.input_norm.bias)
    w = F.layer_norm(gate.weight, (32,), gate.weight_norm.weight, gate.weight_norm.bias)  # [E, d]
    p = torch.softmax(normed @ w.T + gate.bias, -1)  # [B, E]
    base = routed.expert_layers[MODULE].base(x)
    merged = [sum(p[b, e] * delta(ex, MODULE) for e, ex in enumerate(experts)) for b in range(2)]
    want = base + torch.stack([x[b] @ merged[b].T for b in range(2)])
    torch.testing.assert_close(run_layer(routed, MODULE, x, mask), want, rtol=1e-4, atol=1e-5)


def test_meteora_without_prepared_router_says_how(setup, tmp_path):
    model, tok, experts, _ = setup
    lib = moerge.ExpertLibrary.create(tmp_path / "lib")
    for e in experts:
        lib.add(e)
    with pytest.raises(moerge.errors.RecipeNotApplicableError, match="library prepare .* --recipe meteora"):
        moerge.attach(model, lib, "meteora", tokenizer=tok)


def test_router_training_lowers_the_loss_and_a_second_build_loads_it(setup, tmp_path, monkeypatch):
    from moerge.train import router as router_module
    from moerge.train.router import ROUTER_KIND

    model, tok, experts, rows = setup
    lib = moerge.ExpertLibrary.create(tmp_path / "lib")
    for e in experts:
        lib.add(e)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    data = TargetData("reverse", "few-shot", tuple(rows[:32]))  # no validation: every step runs
    routed = moerge.attach(model, lib, "lora_flow", tokenizer=tok, target=data, steps=30, lr=5e-2)
    first = routed.router.state()
    moerge.detach(routed)
    (config,) = _configs(lib, ROUTER_KIND)
    assert config["recipe"] == "lora_flow" and config["experts"] == ["loud", "noisy", "quiet"]
    info = lib.get_artifact(ROUTER_KIND, config, None)[1]
    assert info["steps_run"] == 30 and info["final_loss"] < info["first_loss"] - 0.05
    for n, p in model.named_parameters():  # the base stayed frozen and untouched
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]
    monkeypatch.setattr(router_module, "train_router", lambda *a, **k: pytest.fail("trained again"))
    again = moerge.attach(model, lib, "lora_flow", tokenizer=tok, target=data, steps=30, lr=5e-2)
    assert again.router.train_seconds == pytest.approx(info["train_seconds"])
    for k, v in again.router.state().items():
        torch.testing.assert_close(v, first[k])
    moerge.detach(again)
    other = TargetData("reverse", "few-shot", tuple(rows[1:33]))  # other data: another key, trained anew
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        moerge.attach(model, lib, "lora_flow", tokenizer=tok, target=other, steps=30, lr=5e-2)


def _configs(lib, kind):
    import json

    out = []
    for _, h, _ in lib.list_artifacts(kind):
        raw = lib.storage.read_bytes(f"artifacts/{kind}/{h}/_library.json")
        out.append(json.loads(raw)["config"])
    return out


def test_early_stopping_keeps_the_best_validation_router(setup):
    from moerge.routing.learned import InputGateRouter
    from moerge.train.router import RouterTrainConfig, train_router

    model, tok, experts, rows = setup
    dims = {n: lm.d_in for n, lm in experts[0].lora.items()}
    router = InputGateRouter(dims, 3, k=2, bias=False)
    cfg = RouterTrainConfig(steps=40, lr=0.5, eval_every=2, patience=1)
    result = train_router(model, tok, experts, router, rows[:16], cfg, validation=rows[40:48])
    assert result.val_losses and result.best_step is not None
    assert result.best_step == 2 * (result.val_losses.index(min(result.val_losses)) + 1)
    if result.stopped_early:  # patience 1: stopped at the first evaluation that did not improve
        assert len(result.losses) == result.best_step + 2
    from moerge.model.expert_layer import ExpertLayer

    assert not any(isinstance(m, ExpertLayer) for m in model.modules())  # injected for training, detached


def test_gradient_checkpointing_trains_the_same_router(setup):
    from moerge.routing.learned import InputGateRouter
    from moerge.train.router import RouterTrainConfig, train_router

    model, tok, experts, rows = setup
    dims = {n: lm.d_in for n, lm in experts[0].lora.items()}
    states = []
    for checkpointing in (False, True):
        router = InputGateRouter(dims, 3, k=2, bias=False)
        cfg = RouterTrainConfig(steps=3, lr=0.1, gradient_checkpointing=checkpointing)
        train_router(model, tok, experts, router, rows[:16], cfg)
        states.append(router.state())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # switched off again
    for k, v in states[0].items():
        assert v.abs().sum() > 0
        torch.testing.assert_close(states[1][k], v)


def test_pemt_task_gate_matches_dense_and_its_sparsity_loss(setup, attached):
    _, _, experts, rows = setup
    routed = attached("pemt", target=target(rows), steps=1)
    perturb(routed.router)
    params = routed.router.net[key(MODULE)]
    g = torch.softmax(params["task"] @ params["gate"], -1)  # task-level: one weight vector for every token
    x = torch.randn(2, 3, 32)
    base = routed.expert_layers[MODULE].base(x)
    outs = torch.stack([x @ delta(e, MODULE).T for e in experts], dim=2)  # [B, T, E, d]
    want = base + (g[:, None] * outs).sum(2)
    torch.testing.assert_close(run_layer(routed, MODULE, x), want, rtol=1e-4, atol=1e-5)
    # the Task Sparsity Loss of the official code: sum_e g_e (1 - mean_t cos(y_t, E_e(x_t)))
    layer = routed.expert_layers[MODULE]
    with routed.call(input_ids=torch.zeros(2, 3, dtype=torch.long)) as call:
        layer(x)
        got = routed.router.aux_loss(call)
    cos = F.cosine_similarity(want[:, :, None, :], outs, dim=-1).reshape(-1, 3).mean(0)
    torch.testing.assert_close(got, (g * (1 - cos)).sum(), rtol=1e-4, atol=1e-6)


def test_mixda_gate_from_the_last_visible_token_mixes_the_original_module(setup, attached):
    _, _, experts, rows = setup
    for include_original in (True, False):
        routed = attached(
            "mixda", target=target(rows, mode="full"), steps=1, gate_hidden=8,
            include_original=include_original,
        )  # fmt: skip
        perturb(routed.router)
        x = torch.randn(2, 4, 32)
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
        gate = routed.router.net[key(MODULE)]
        h = x[[0, 1], [3, 1]]  # each example's last visible token
        for i, lin in enumerate(gate.linears):  # the MLP written out (no dropout at inference)
            h = lin(torch.relu(h) if i else h)
        p = torch.softmax(h, -1)
        assert p.shape[-1] == 3 + include_original
        w = p[:, 1:] if include_original else p  # the original module's share adds no update
        base = routed.expert_layers[MODULE].base(x)
        want = base + sum(w[:, e, None, None] * (x @ delta(ex, MODULE).T) for e, ex in enumerate(experts))
        torch.testing.assert_close(run_layer(routed, MODULE, x, mask), want, rtol=1e-4, atol=1e-5)
        moerge.detach(routed)


@pytest.mark.parametrize("recipe", ["pemt", "mixda"])
def test_pemt_and_mixda_training_lowers_the_held_out_loss(setup, recipe):
    """A few steps of router training lower the loss on rows it never saw, and move the weights."""
    from moerge.model.routed import detach
    from moerge.routing.learned import MixtureGateRouter, TaskGateRouter
    from moerge.train.router import RouterTrainConfig, _eval_batches, _routed, _validation_loss, train_router

    model, tok, experts, rows = setup
    modules = list(experts[0].lora)
    if recipe == "pemt":
        factors = {m: (torch.stack([e.lora[m].A * e.lora[m].scaling for e in experts]),
                       torch.stack([e.lora[m].B.T for e in experts])) for m in modules}  # fmt: skip
        router = TaskGateRouter(factors, {m: model.get_submodule(m) for m in modules})
    else:
        router = MixtureGateRouter({m: experts[0].lora[m].d_in for m in modules}, 3, hidden=8)
    held = _eval_batches(tok, rows[40:56], 8, 64)

    def held_loss():
        routed, _ = _routed(model, experts, router, "output")
        try:
            return _validation_loss(routed, router, held, "cpu")
        finally:
            detach(routed)

    before, state = held_loss(), router.state()
    train_router(model, tok, experts, router, rows[:24], RouterTrainConfig(steps=12, lr=5e-2, aux_weight=0.1))
    assert held_loss() < before - 0.01
    assert any(not torch.allclose(v, state[k]) for k, v in router.state().items())


def test_meteora_gate_loss_is_cross_entropy_against_each_rows_expert(setup, attached, joint_library):
    routed = attached("meteora", joint_library[0], steps=8)
    router = routed.router
    x = torch.randn(2, 3, 32)
    labels, mask = torch.tensor([2, 0]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    with routed.call(input_ids=torch.zeros(2, 3, dtype=torch.long)) as call:
        call.plan.update(row_labels=labels, train_mask=mask)
        routed.expert_layers[MODULE](x)
        got = router.aux_loss(call)
    logits = x @ router.net[key(MODULE)].weight.T  # [B, T, E]
    ce = -torch.log_softmax(logits, -1).gather(-1, labels[:, None, None].expand(-1, 3, 1))[..., 0]
    torch.testing.assert_close(got, (ce * mask).sum() / mask.sum(), rtol=1e-4, atol=1e-6)


def test_mole_balance_loss_averages_the_weights_over_every_gate(setup, attached):
    _, _, _, rows = setup
    routed = attached("mole", target=target(rows), steps=1)
    perturb(routed.router)
    other = "model.layers.0.mlp.down_proj"
    x1, x2 = torch.randn(1, 4, 32), torch.randn(1, 4, 64)
    with routed.call(input_ids=torch.zeros(1, 4, dtype=torch.long)) as call:
        routed.expert_layers[MODULE](x1)
        routed.expert_layers[other](x2)
        got = routed.router.aux_loss(call)
    q = torch.cat(
        [torch.softmax(routed.router.logits(m, x), -1) for m, x in ((MODULE, x1), (other, x2))]
    ).mean(0)
    torch.testing.assert_close(got, -q.log().sum())


def test_training_shows_the_router_the_prompt_only():
    from moerge.train.router import router_view

    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100], [3, 4, 5, -100]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    want = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])  # the last row has no prompt: all of it
    assert torch.equal(router_view(labels, mask), want)


def test_paper_preset_fills_only_the_options_not_given():
    from moerge.recipes.learned import MoleOptions

    o = MoleOptions(preset="paper", lr=1e-3)
    assert (o.steps, o.lr, o.batch_size, o.balance_weight) == (800, 1e-3, 12, 0.5)
    assert MoleOptions().steps == 40


def _alphabet_rows(alphabet: str, n: int, seed: int) -> list[dict[str, str]]:
    import random

    g = random.Random(seed)
    out = []
    for _ in range(n):
        text = "".join(g.choice(alphabet) for _ in range(6))
        out.append({"prompt": text + ":", "completion": text[::-1]})
    return out


def test_meteora_default_training_routes_each_experts_rows_to_it(setup, tmp_path):
    """With the default options (no ``steps`` given), MeteoRA's supervised gates learn which expert a row comes
    from: rows over three disjoint alphabets, each set labelled with one expert; on rows it never saw, the
    recorded gate weight on the row's own expert, averaged over every module and token, is well above chance
    (1/3). (The former default, 40 steps at lr 1e-2 against the gates' N(0, 1) initialisation, left them near
    chance: 0.46-0.51 here; 400 steps give 0.76-0.79.)"""
    from moerge.routing.inputs import RoutingInputs

    model, tok, experts, _ = setup
    lib = moerge.ExpertLibrary.create(tmp_path / "lib")
    for e in experts:
        lib.add(e)
    alphabets = ("abcdefgh", "pqrstuvw", "ABCDEFGH")
    data = {e.name: _alphabet_rows(a, 64, 0) for e, a in zip(experts, alphabets, strict=True)}
    moerge.recipes.prepare_signatures("meteora", model, tok, lib, data)
    routed = moerge.attach(model, lib, "meteora", tokenizer=tok)
    try:
        masses = []
        for i, alphabet in enumerate(alphabets):
            texts = [r["prompt"] + r["completion"] for r in _alphabet_rows(alphabet, 8, 1)]
            ids = tok(texts, return_tensors="pt").input_ids
            with torch.no_grad(), routed.call(RoutingInputs(record=True), input_ids=ids) as call:
                model(input_ids=ids)
            weights = torch.stack(list(call.routing().values()))  # [modules, B, T, E]
            assert weights.shape[-1] == 3
            masses.append(float(weights[..., i].mean()))
    finally:
        moerge.detach(routed)
    assert min(masses) > 0.65, masses


def test_mixda_gate_width_follows_the_models_hidden_size(setup, attached):
    from moerge.recipes.learned import MixdaOptions

    model, _, _, rows = setup
    routed = attached("mixda", target=target(rows, mode="full"), steps=1)
    gate = routed.router.net[key(MODULE)]
    assert [lin.out_features for lin in gate.linears[:-1]] == [model.config.hidden_size] * 3
    assert MixdaOptions(preset="paper").gate_hidden == 768  # the official literal
    assert MixdaOptions(preset="paper", gate_hidden=16).gate_hidden == 16
