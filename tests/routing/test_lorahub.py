"""LoraHub: the merged update against a dense ΔW = (Σ wᵢ Bᵢ)(Σ wᵢ sᵢ Aᵢ) written out here, and the search against
the official algorithm (sail-sg/lorahub's ``get_score`` and ``default_l1_regularization`` under its NGOpt loop)
on the same adapters and examples (skipped without the peer: pip install 'moerge[peers-lorahub]')."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from _routing_helpers import linear_module_names, make_experts

from moerge import attach, detach
from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
from moerge.recipes.lorahub import example_batches, merged_lora
from moerge.recipes.recipe import TargetData

pytest.importorskip("nevergrad")

ROWS = (
    {"prompt": "abc>", "completion": "cba"},
    {"prompt": "hello>", "completion": "olleh"},
    {"prompt": "xyz>", "completion": "zyx"},
    {"prompt": "moe>", "completion": "eom"},
    {"prompt": "ab>", "completion": "ba"},
)


def dense_model(model, experts, w):
    """A copy of ``model`` with W += (Σ wᵢ Bᵢ)(Σ wᵢ sᵢ Aᵢ) in every adapted module (ranks zero-padded)."""
    dense = copy.deepcopy(model)
    for name in linear_module_names(model):
        R = max(e.lora[name].rank for e in experts)
        d_in, d_out = experts[0].lora[name].d_in, experts[0].lora[name].d_out
        A, B = torch.zeros(R, d_in), torch.zeros(d_out, R)
        for wi, e in zip(w, experts):
            lm = e.lora[name]
            A[: lm.rank] += wi * lm.scaling * lm.A
            B[:, : lm.rank] += wi * lm.B
        with torch.no_grad():
            dense.get_submodule(name).weight += B @ A
    return dense


def test_lorahub_is_one_factor_mixed_lora(tiny_llama):
    model, tok = tiny_llama
    experts = make_experts(model, 3, ranks=(2, 4, 3), seed=5)  # mixed ranks and scalings
    routed = attach(
        model, experts, "lorahub", tokenizer=tok, target=TargetData("rev", "few-shot", ROWS), budget=6
    )
    try:
        assert routed.router.trainable_parameters == 3 and routed.router.train_seconds > 0
        assert all(abs(x) <= 1.5 for x in routed.router.weights.tolist())
        w = [0.7, -0.4, 1.2]  # any weights the search may find (on random experts it keeps ~0)
        routed.router.weights = torch.tensor(w)
        ids, mask, _ = example_batches(tok, ROWS, None)[0]
        with torch.no_grad():
            got = routed(input_ids=ids, attention_mask=mask).logits
    finally:
        detach(routed)
    with torch.no_grad():
        want = dense_model(model, experts, w)(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        # the one merged LoRA gives the same update
        merged = merged_lora(experts, w)
        one = copy.deepcopy(model)
        for name, lm in merged.items():
            one.get_submodule(name).weight += lm.delta_for_weight()
        torch.testing.assert_close(one(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5, rtol=1e-4)


def test_lorahub_weights_are_cached_in_the_library(tiny_llama, tmp_path, monkeypatch):
    """A second build on the same data loads the searched weights (and their cost) instead of searching."""
    import moerge
    from moerge.recipes import lorahub

    model, tok = tiny_llama
    lib = moerge.ExpertLibrary.create(tmp_path / "lib")
    for e in make_experts(model, 2, ranks=(2, 2), seed=3):
        lib.add(e)
    target = TargetData("rev", "few-shot", ROWS)
    first = attach(copy.deepcopy(model), lib, "lorahub", tokenizer=tok, target=target, budget=4)
    w, seconds = first.router.weights.clone(), first.router.train_seconds

    def no_search(*a, **k):
        raise AssertionError("searched again")

    monkeypatch.setattr(lorahub, "search_weights", no_search)
    second = attach(copy.deepcopy(model), lib, "lorahub", tokenizer=tok, target=target, budget=4)
    assert torch.equal(second.router.weights, w) and second.router.train_seconds == seconds > 0
    with pytest.raises(AssertionError, match="searched again"):  # other data: a new search
        attach(copy.deepcopy(model), lib, "lorahub", tokenizer=tok, budget=4,
               target=TargetData("rev", "few-shot", ROWS[:3]))  # fmt: skip


def test_lorahub_without_target_data_says_how(tiny_llama):
    from moerge.errors import RecipeNotApplicableError

    model, tok = tiny_llama
    with pytest.raises(RecipeNotApplicableError, match="TargetData"):
        attach(model, make_experts(model, 2), "lorahub", tokenizer=tok)


# scipy's COBYLA inside NGOpt warns on the official code's path
@pytest.mark.filterwarnings("ignore:COBYLA. Invalid RHOEND")
def test_lorahub_search_matches_the_official_algorithm(tiny_llama):
    """The official loop (lorahub_learning's lines, which load seq2seq models from the Hub) around the official
    ``get_score`` on a PEFT model holding the same adapters; its ``default_get_loss`` for a causal LM."""
    algorithm = pytest.importorskip("lorahub.algorithm", exc_type=ImportError)
    import nevergrad as ng
    import numpy
    from peft import LoraConfig, get_peft_model
    from peft.utils.save_and_load import get_peft_model_state_dict

    model, tok = tiny_llama
    targets = ["q_proj", "v_proj"]
    names = [n for n in linear_module_names(model) if n.rsplit(".", 1)[-1] in targets]
    gen = torch.Generator().manual_seed(11)
    experts = []
    for i in range(3):  # LoraHub needs identical adapter configs: rank 4, alpha 8
        lora = {n: LoraModule(torch.randn(4, model.get_submodule(n).in_features, generator=gen) * 0.3,
                              torch.randn(model.get_submodule(n).out_features, 4, generator=gen) * 0.3, alpha=8.0)
                for n in names}  # fmt: skip
        experts.append(Expert(ExpertMetadata(name=f"e{i}"), lora=lora))

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    peft_model.eval()
    keys = list(get_peft_model_state_dict(peft_model))
    cache = {}
    for e in experts:
        sd = {}
        for key in keys:
            module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
            sd[key] = (e.lora[module].A if part.startswith("A") else e.lora[module].B).clone()
        cache[e.name] = sd
    batches = example_batches(tok, ROWS, None)

    def get_loss(example_dataset, model, batch_size):  # default_get_loss, for a causal LM
        total = 0.0
        with torch.no_grad():
            for ids, mask, labels in example_dataset:
                total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        return total / len(ROWS)

    budget, seed = 12, 42
    random.seed(seed)
    numpy.random.seed(seed)
    instrum = ng.p.Array(init=[0] * 3, upper=[1.5] * 3, lower=[-1.5] * 3)
    optimizer = ng.optimizers.NGOpt(parametrization=instrum, budget=budget)

    def score(w):
        return algorithm.get_score(
            w, peft_model, cache, batches, None, get_loss, algorithm.default_l1_regularization
        )

    official = optimizer.minimize(score).value

    routed = attach(model, experts, "lorahub", tokenizer=tok, target=TargetData("rev", "few-shot", ROWS),
                    budget=budget, seed=seed)  # fmt: skip
    try:
        ours = routed.router.weights
    finally:
        detach(routed)
    assert max(abs(float(v)) for v in official) > 0.05, official  # the search moved away from its start
    torch.testing.assert_close(ours, torch.tensor(official, dtype=torch.float32), atol=1e-4, rtol=0)
