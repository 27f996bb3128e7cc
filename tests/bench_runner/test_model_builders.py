"""Model-building recipes (`Recipe.model_builder` → `BuiltModel`): `build_model` runs them without touching the
base model, `attach` refuses them (and `build_model` refuses router recipes), and the benchmark evaluates the
model they return — a builder that returns a copy of the base scores exactly what the base baseline scores,
and one that folds an expert in scores what that expert's model computed by hand does."""

from __future__ import annotations

import copy

import pytest
import torch

from moerge.bench.config import BenchConfig
from moerge.errors import RecipeNotApplicableError
from moerge.recipes.recipe import BuiltModel, Recipe, Taxonomy

TAXONOMY = Taxonomy(training="standard", expert_data="private", routing_data="none", granularity="n/a",
                    depth="model", selection="none", aggregation="parameter", generalization="multiple",
                    user_data="zero-shot")  # fmt: skip


def copy_of_base(ctx, options):
    return BuiltModel(copy.deepcopy(ctx.model), trainable_parameters=7)


def fold_first(ctx, options):
    from moerge.model.routed import weight_deltas

    model = copy.deepcopy(ctx.model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in weight_deltas(model, ctx.experts[0]).items():
            params[name].add_(delta)
    return BuiltModel(model)


@pytest.fixture
def builders(monkeypatch):
    from moerge.recipes import registry

    registry._ensure_loaded()
    for name, fn in (("copy_of_base", copy_of_base), ("fold_first", fold_first)):
        monkeypatch.setitem(
            registry._RECIPES,
            name,
            Recipe(name=name, summary="test", taxonomy=TAXONOMY, builder=None, model_builder=fn),
        )


def test_build_model_leaves_the_base_alone_and_folds_by_hand(builders, base_model, reduced_suite):
    from moerge.recipes import attach, build_model

    model, tok = base_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lib = reduced_suite.open_library()
    expert = lib.get(lib.names()[0])
    built = build_model(model, [expert], "fold_first")
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    # by hand: each LoRA module's W + (alpha / r) · B @ A
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for module, lm in expert.lora.items():
            w = ref.get_submodule(module).weight
            w += (lm.alpha / lm.rank) * (lm.B.float() @ lm.A.float()).to(w.dtype)
    torch.testing.assert_close(built.logits(ids), ref(input_ids=ids).logits)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(RecipeNotApplicableError, match="build_model"):
        attach(model, [expert], "fold_first")
    with pytest.raises(RecipeNotApplicableError, match="attach"):
        build_model(model, [expert], "uniform")


def test_the_benchmark_evaluates_the_built_model(builders, reduced_suite, base_model):
    from moerge.bench.runner import run_bench

    model, tok = base_model
    config = BenchConfig(recipes=["copy_of_base"], baselines=["base"], batch_size=8, progress=False, premise=False,
                         limit=4)  # fmt: skip
    res = run_bench(reduced_suite, config, model=model, tokenizer=tok)
    by = {(r.method, r.task, r.condition): r for r in res.results}
    mine = [r for r in res.results if r.method == "copy_of_base"]
    assert mine and all(r.status == "ok" for r in mine)
    for r in mine:
        assert r.score == pytest.approx(by[("base", r.task, r.condition)].score, abs=1e-6)
    method = {m.name: m for m in res.methods}["copy_of_base"]
    assert method.trainable_parameters == 7


def test_the_dense_moe_recipes_run_through_the_benchmark(reduced_suite, base_model):
    """WEMoE (one build per task, on its unlabelled target inputs), PWE MoE and Twin-Merging (routers trained
    once on the experts' data, as library artifacts) run on the reduced suite's LoRA library."""
    from moerge.bench.runner import run_bench

    model, tok = base_model
    recipes = ["wemoe:steps=2", "pwe_moe:steps=2,batch_size=2", "twin_merging:epochs=2"]
    config = BenchConfig(recipes=recipes, baselines=["base"], batch_size=8, progress=False, premise=False, limit=2,
                         user_data=["zero-shot", "full"])  # fmt: skip
    res = run_bench(reduced_suite, config, model=model, tokenizer=tok)
    for name in ("wemoe", "pwe_moe", "twin_merging"):
        mine = [r for r in res.results if r.method.startswith(name)]
        assert mine and all(r.status == "ok" for r in mine), [(r.task, r.status, r.reason) for r in mine]
    methods = {m.recipe: m for m in res.methods if m.recipe}
    assert all(methods[n].trainable_parameters for n in ("wemoe", "pwe_moe", "twin_merging"))
