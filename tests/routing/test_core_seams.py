"""The core's seams: concurrent calls on one routed model, any device (the meta device stands in for a GPU:
a selection left on the CPU fails there as it would on CUDA), activation checkpointing, PEFT-style
target_modules, and embedders resolved only by recipes that embed."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from _routing_helpers import make_experts, task_texts

from moerge.errors import MoergeError, RoutingError
from moerge.experts.library import ExpertLibrary
from moerge.model.routed import enable_activation_checkpointing
from moerge.recipes import list_recipes
from moerge.recipes.facade import attach, detach, prepare_signatures
from moerge.routing.inputs import RoutingInputs
from moerge.routing.router import Router
from moerge.routing.selection import Selection


# ---------------------------------------------------------------------------------------------- threads
def test_threads_calling_one_routed_model_get_their_own_experts(tiny_llama):
    """N threads × M calls, each thread with its own explicit experts, equal the same calls made one by one."""
    model, tok = tiny_llama
    model = copy.deepcopy(model)
    experts = make_experts(model, 4, seed=5, scale=0.5)
    routed = attach(model, experts, recipe="uniform")
    ids = tok(["abc def ghi", "xyz 12"], return_tensors="pt", padding=True)["input_ids"]

    def weights_for(i: int) -> torch.Tensor:
        w = torch.zeros(2, 4)
        w[:, i % 4] = 1.0
        w[1, (i + 1) % 4] = 0.5
        return w

    n_threads, calls = 6, 8
    with torch.no_grad():
        want = {
            i: routed(input_ids=ids, routing=RoutingInputs(weights=weights_for(i))).logits for i in range(4)
        }
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(n_threads)}
    recorded: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(calls):
                with torch.no_grad():
                    ri = RoutingInputs(weights=weights_for(i), record=True)
                    got[i].append(routed(input_ids=ids, routing=ri).logits)
            recorded[i] = next(iter(routed.last_routing().values()))
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(n_threads):
        assert len(got[i]) == calls
        for logits in got[i]:
            torch.testing.assert_close(logits, want[i % 4], rtol=0, atol=0)
        # each thread's last_routing is its own call's routing
        assert recorded[i][:, 0].argmax(-1).tolist() == [i % 4, i % 4]


def test_calls_do_not_nest_in_one_thread(tiny_llama):
    model, tok = tiny_llama
    routed = attach(copy.deepcopy(model), make_experts(model, 2), recipe="uniform")
    ids = tok(["abc"], return_tensors="pt")["input_ids"]
    with routed.call(input_ids=ids), pytest.raises(RoutingError, match="do not nest"):
        routed(input_ids=ids)
    routed(input_ids=ids)  # the failed call left nothing behind


# ---------------------------------------------------------------------------------------------- devices
class CpuEmbedder:
    """A deterministic text embedder living on the CPU (as MiniLM does) while the model is elsewhere."""

    name = "test:char-counts"

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), 64)
        for i, t in enumerate(texts):
            for c in t:
                out[i, ord(c) % 64] += 1.0
        return torch.nn.functional.normalize(out + 1e-3, dim=-1)


# Recipes that route experts injected into a model (`attach`); model-building recipes (BTX, WEMoE …) build a new
# model with `build_model` and are checked in their own tests.
ROUTER_RECIPES = [r for r in list_recipes() if r.kind == "router"]


@pytest.fixture(scope="module")
def library_with_signatures(tiny_llama, tmp_path_factory):
    """Three experts with every recipe's signatures computed (on the CPU model)."""
    model, tok = tiny_llama
    model = copy.deepcopy(model)
    experts = make_experts(model, 3, ranks=(4,), seed=11, scale=0.3)
    lib = ExpertLibrary.create(tmp_path_factory.mktemp("seams") / "lib")
    for e in experts:
        lib.add(e)
    data = {e.name: [{"prompt": t[:4], "completion": t[4:]} for t in task_texts(f"task{i}", 6)]
            for i, e in enumerate(experts)}  # fmt: skip
    for r in ROUTER_RECIPES:
        for options in _variants(r):  # a variant may read a signature the defaults do not (TF-IDF terms)
            prepare_signatures(r, model, tok, lib, data, embedder=CpuEmbedder(), **options)
    return model, tok, experts, lib


def _options(recipe: str) -> dict:
    return {"phatgoose": {"gate_steps": 2}, "single_expert": {"expert": "expert1"}}.get(recipe, {})


def _variants(recipe) -> list[dict]:
    return [_options(recipe.name)] + [{**_options(recipe.name), **v} for v in recipe.variants()]


@pytest.mark.parametrize("recipe", [r.name for r in ROUTER_RECIPES])
def test_every_recipe_runs_on_a_non_cpu_device(library_with_signatures, recipe):
    """The meta device runs shapes without data: any tensor a router leaves on the CPU fails there."""
    from moerge.recipes import get_recipe

    model, tok, experts, lib = library_with_signatures
    rec = get_recipe(recipe)
    texts = ["abc def", "xy zz"]
    ids = tok(texts, return_tensors="pt", padding=True)["input_ids"].to("meta")
    extra: dict = {}
    if rec.taxonomy.user_data in ("few-shot", "full"):  # trained on the CPU, loaded from the library on meta
        from moerge.recipes.recipe import TargetData

        rows = tuple({"prompt": t[:4], "completion": t[4:]} for t in task_texts("task0", 6))
        extra = {"target": TargetData("task0", rec.taxonomy.user_data, rows), "tokenizer": tok}
        for options in _variants(rec):
            detach(attach(copy.deepcopy(model), lib, recipe, embedder=CpuEmbedder(), **extra, **options))
    for options in _variants(rec):
        meta_model = copy.deepcopy(model).to("meta")
        routed = attach(meta_model, lib, recipe, embedder=CpuEmbedder(), **extra, **options)
        ri = RoutingInputs(task_names=["task0", "task2"], texts=texts, record=True)
        out = routed(input_ids=ids, routing=ri)
        assert out.logits.device.type == "meta" and out.logits.shape[:2] == ids.shape, (recipe, options)
        if routed.router is not None:
            recorded = routed.last_call().recorded  # kept on the device until read
            assert recorded and all(c.device.type == "meta" for cs in recorded.values() for c in cs)
            detach(routed)


def test_explicit_weights_and_generation_on_a_non_cpu_device(library_with_signatures):
    model, tok, experts, lib = library_with_signatures
    routed = attach(copy.deepcopy(model).to("meta"), lib, "arrow", k=2)
    ids = tok(["abc def"], return_tensors="pt")["input_ids"].to("meta")
    out = routed(input_ids=ids, routing=RoutingInputs(weights=torch.tensor([[0.5, 0.0, 0.5]])))
    assert out.logits.device.type == "meta"


# ---------------------------------------------------------------------------------------------- checkpointing
class TrainableGates(Router):
    """Per-token weights σ(⟨g_e, x⟩) from trainable per-module gate vectors (a stand-in for a learned router)."""

    def __init__(self, gates: dict[str, torch.Tensor]):
        self.gates = gates

    def select(self, module, x, call):
        xs = x.reshape(-1, x.shape[-1])
        return Selection(torch.sigmoid(xs @ self.gates[module].T), None, "token")


def _gate_grads(model, experts, ids, checkpointing: dict | None):
    torch.manual_seed(0)
    gates = {
        n: (torch.randn(len(experts), m.d_in) * 0.1).requires_grad_() for n, m in experts[0].lora.items()
    }
    model = copy.deepcopy(model).train()
    if checkpointing is not None:
        enable_activation_checkpointing(model, **checkpointing)
    routed = attach(model, experts, router=TrainableGates(gates))
    loss = routed(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: g.grad.clone() for n, g in gates.items()}


def test_gradient_checkpointing_gives_the_same_gradients_to_a_router(tiny_llama):
    model, tok = tiny_llama
    experts = make_experts(model, 3, ranks=(4,), seed=2, scale=0.3)
    ids = tok(["abc def ghi", "xyz 12 ab"], return_tensors="pt", padding=True)["input_ids"]
    loss, want = _gate_grads(model, experts, ids, None)
    loss_ckpt, got = _gate_grads(model, experts, ids, {"use_reentrant": False})
    torch.testing.assert_close(loss_ckpt, loss)
    assert set(got) == set(want)
    for n in want:
        assert want[n].abs().sum() > 0
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


def test_reentrant_checkpointing_is_refused_with_the_fix(tiny_llama):
    model, tok = tiny_llama
    experts = make_experts(model, 2, ranks=(4,), seed=2)
    ids = tok(["abc def"], return_tensors="pt")["input_ids"]
    with pytest.raises(RoutingError, match="use_reentrant"):
        _gate_grads(model, experts, ids, {"use_reentrant": True})


# ---------------------------------------------------------------------------------------------- target_modules
def test_target_modules_take_pefts_forms(tiny_llama):
    model, _ = tiny_llama
    experts = make_experts(model, 2)
    for target, want in [
        (["q_proj", "v_proj"], lambda n: n.endswith(("q_proj", "v_proj"))),
        (r".*layers\.0\..*_proj", lambda n: ".layers.0." in n),
        (["model.layers.1.mlp.down_proj"], lambda n: n == "model.layers.1.mlp.down_proj"),
    ]:
        routed = attach(copy.deepcopy(model), experts, "uniform", target_modules=target)
        adapted = sorted(experts[0].lora)
        assert sorted(routed.expert_layers) == [n for n in adapted if want(n)], target
        assert routed.expert_layers
    for bad in (["q_prj"], "nothing.*matches"):
        with pytest.raises(MoergeError, match="matches none|selects none"):
            attach(copy.deepcopy(model), experts, "uniform", target_modules=bad)


# ---------------------------------------------------------------------------------------------- embedders
def test_only_embedding_recipes_resolve_an_embedder(tiny_llama, monkeypatch):
    """Without the embeddings extra (MiniLM missing), Arrow and uniform attach; no embedder is ever built."""
    from moerge.backbones import embedder as embedders

    def refuse(*a, **k):
        raise AssertionError("an embedder was resolved for a recipe that does not embed")

    monkeypatch.setattr(embedders, "default_embedder", refuse)
    monkeypatch.setattr(embedders, "MiniLMEmbedder", refuse)
    monkeypatch.setattr(embedders, "HiddenStateEmbedder", refuse)
    model, tok = tiny_llama
    experts = make_experts(model, 3)
    ids = tok(["abc"], return_tensors="pt")["input_ids"]
    for recipe in ("arrow", "uniform"):
        routed = attach(copy.deepcopy(model), experts, recipe, tokenizer=tok)
        assert routed(input_ids=ids).logits.shape[:2] == ids.shape


# ---------------------------------------------------------------------------------------------- recipe options
def test_aggregation_is_a_recipe_option_validated_by_the_recipe(tiny_llama):
    from moerge.errors import MalformedConfigError

    model, tok = tiny_llama
    experts = make_experts(model, 2)
    with pytest.raises(MalformedConfigError, match="aggregation"):
        attach(copy.deepcopy(model), experts, "arrow", aggregation="parameter")  # arrow: output or factor
    assert attach(copy.deepcopy(model), experts, "arrow", aggregation="factor").aggregation == "factor"
    assert attach(
        copy.deepcopy(model), experts, router=TrainableGates({}), aggregation="parameter"
    ).aggregation == ("parameter")
    with pytest.raises(MoergeError, match="no recipe options"):
        attach(copy.deepcopy(model), experts, router=TrainableGates({}), k=2)


def test_hyphenated_recipe_names_register_and_fetch(monkeypatch):
    from moerge.recipes import Recipe, Taxonomy, get_recipe, register_recipe, registry

    list_recipes()
    monkeypatch.setattr(registry, "_RECIPES", dict(registry._RECIPES))
    tax = Taxonomy(training="standard", expert_data="private", routing_data="none", granularity="task",
                   depth="model", selection="dense", aggregation="output", generalization="multiple",
                   user_data="zero-shot")  # fmt: skip
    mine = register_recipe(Recipe(name="my-recipe", summary="s", taxonomy=tax, builder=None))
    assert get_recipe("my-recipe") is mine and get_recipe("my_recipe") is mine
    with pytest.raises(MoergeError, match="already registered"):
        register_recipe(Recipe(name="my_recipe", summary="other", taxonomy=tax, builder=None))
