"""Recipes: taxonomy records, the `moerge recipes` table, applicability checks, and the data-driven routers
(PHATGOOSE, average activation, embedding centroids, Retrieval of Experts) against references written out."""

from __future__ import annotations

import copy

import pytest
import torch
from _routing_helpers import LoopRouterReference, make_experts, replace_layers, task_texts

from moerge.errors import MalformedConfigError, MoergeError, RecipeNotApplicableError
from moerge.experts.library import ExpertLibrary
from moerge.recipes import AXES, BuildContext, get_recipe, list_recipes, taxonomy_rows
from moerge.recipes.facade import attach
from moerge.routing.embedding import HiddenStateEmbedder
from moerge.routing.inputs import RoutingInputs
from moerge.train.gates import GateTrainConfig, train_phatgoose_gates
from moerge.transforms.centroids import compute_embedding_centroids, compute_hidden_centroids

TASKS = ["task0", "task1", "task2"]


@pytest.fixture(scope="module")
def lib_setup(tmp_path_factory, tiny_llama):
    """A library of 3 experts (one per synthetic task) with every data statistic computed, and one without."""
    model, tok = tiny_llama
    model = copy.deepcopy(model)
    experts = make_experts(model, 3, ranks=(4,), seed=11, scale=0.3)
    root = tmp_path_factory.mktemp("recipes")
    bare = ExpertLibrary.create(root / "bare")
    lib = ExpertLibrary.create(root / "full")
    for e in experts:
        bare.add(e)
        lib.add(e)
    data = {f"expert{i}": task_texts(t, 8) for i, t in enumerate(TASKS)}
    compute_hidden_centroids(model, tok, data, library=lib)
    compute_embedding_centroids(
        HiddenStateEmbedder(model, tok, cache_dir=None), data, library=lib, max_samples=8
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for e in experts:
        train_phatgoose_gates(
            model, tok, e, data[e.name], GateTrainConfig(steps=5, batch_size=2, seq_len=16), library=lib
        )
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)  # gate training leaves the model as it was
    return model, tok, experts, lib, bare


def test_every_recipe_has_a_taxonomy_record_and_is_in_the_table():
    rows = taxonomy_rows()
    assert [r["recipe"] for r in rows] == [r.name for r in list_recipes()]
    names = {r.name for r in list_recipes()}
    assert {
        "arrow",
        "phatgoose",
        "average_activation",
        "embedding_centroids",
        "retrieval_of_experts",
        "base",
        "single_expert",
        "oracle",
        "uniform",
    } <= names
    for r in rows:
        assert all(r[a] for a in AXES)


def test_cli_recipes_prints_every_recipe():
    from typer.testing import CliRunner

    from moerge.cli import app

    result = CliRunner().invoke(app, ["recipes", "--json"])
    assert result.exit_code == 0, result.output
    for r in list_recipes():
        assert f'"{r.name}"' in result.output


def test_recipes_refuse_settings_their_record_rules_out(lib_setup):
    model, tok, experts, lib, bare = lib_setup
    on_bare, on_full = BuildContext(model, experts, library=bare), BuildContext(model, experts, library=lib)
    with pytest.raises(RecipeNotApplicableError, match="hidden-state centroids.*compute_hidden_centroids"):
        get_recipe("average_activation").check_applicable(on_bare)
    with pytest.raises(RecipeNotApplicableError, match="PHATGOOSE gate vectors"):
        attach(copy.deepcopy(model), bare, recipe="phatgoose")
    with pytest.raises(RecipeNotApplicableError, match="library"):
        attach(copy.deepcopy(model), experts, recipe="embedding_centroids")
    with pytest.raises(RecipeNotApplicableError, match="held-in"):
        get_recipe("oracle").check_applicable(on_full, generalization="out-of-distribution")
    get_recipe("average_activation").check_applicable(on_full)  # the full library has the statistics
    get_recipe("arrow").check_applicable(on_bare)  # Arrow needs weights only
    with pytest.raises(MalformedConfigError, match="option"):
        attach(copy.deepcopy(model), experts, recipe="arrow", topk=3)
    with pytest.raises(MoergeError, match="unknown recipe"):
        get_recipe("nope")


def std_dot(x, v):
    ln = torch.nn.functional.layer_norm
    return (ln(x, x.shape) @ ln(v, v.shape)) / x.shape[0] ** 0.5


@pytest.mark.parametrize(
    "recipe,kind", [("phatgoose", "phatgoose_gates"), ("average_activation", "hidden_centroids")]
)
def test_prototype_recipes_match_a_loop_reference(lib_setup, recipe, kind):
    model, tok, experts, lib, _ = lib_setup
    from moerge.train.gates import gates_config
    from moerge.transforms.centroids import HIDDEN_CONFIG

    config = gates_config(5) if kind == "phatgoose_gates" else HIDDEN_CONFIG
    options = {"gate_steps": 5} if recipe == "phatgoose" else {}
    vectors = {e.name: lib.get_artifact(kind, config, e.name)[0] for e in experts}
    ids = tok(["abc 123", "XYZ!? ab"], return_tensors="pt", padding=True)
    ref = copy.deepcopy(model)
    replace_layers(
        ref,
        lambda n, m: (
            LoopRouterReference(
                m, [e.lora[n] for e in experts], [vectors[e.name][n] for e in experts], std_dot, 2
            )
            if n in experts[0].lora
            else None
        ),
    )
    with torch.no_grad():
        want = ref(**ids).logits
        routed = attach(copy.deepcopy(model), lib, recipe=recipe, **options)
        got = routed(**ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def merged_copy(model, experts, weights):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for e, expert in enumerate(experts):
            for name, lm in expert.lora.items():
                ref.get_submodule(name).weight += weights[e] * lm.delta_for_weight()
    return ref


def mean_pooled(model, ids, mask):
    h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def test_embedding_centroids_dam_matches_per_example_merge(lib_setup):
    model, tok, experts, lib, _ = lib_setup
    texts = [task_texts("task1", 1, seed=99)[0], task_texts("task2", 1, seed=98)[0]]
    enc = tok(texts, return_tensors="pt", padding=True)
    # reference, written out: centroids = mean of the experts' data embeddings; p = softmax(cos / T)
    cents = []
    for t in TASKS:
        d = tok(task_texts(t, 8), return_tensors="pt", padding=True)
        pooled = mean_pooled(model, d["input_ids"], d["attention_mask"])
        cents.append(torch.nn.functional.normalize(pooled, dim=-1).mean(0))  # centroid of unit embeddings
    emb = mean_pooled(model, enc["input_ids"], enc["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(emb[:, None], torch.stack(cents)[None], dim=-1)
    p = torch.softmax(cos / 0.1, -1)
    emb_model = HiddenStateEmbedder(model, tok, cache_dir=None)  # the one the centroids were computed with
    routed = attach(
        copy.deepcopy(model),
        lib,
        recipe="embedding_centroids",
        tokenizer=tok,
        embedder=emb_model,
        temperature=0.1,
    )
    with torch.no_grad():
        got = routed(**enc, routing=RoutingInputs(record=True)).logits
        for b in range(2):
            want = merged_copy(model, experts, p[b])(
                input_ids=enc["input_ids"][b : b + 1], attention_mask=enc["attention_mask"][b : b + 1]
            ).logits
            torch.testing.assert_close(got[b : b + 1], want, atol=1e-4, rtol=1e-4)
    w = next(iter(routed.last_routing().values()))
    torch.testing.assert_close(w[:, 0], p, atol=1e-5, rtol=1e-5)
    # the same with texts given explicitly (the embedder's text path)
    with torch.no_grad():
        again = routed(**enc, routing=RoutingInputs(texts=texts)).logits
    torch.testing.assert_close(again, got, atol=1e-5, rtol=1e-5)


def test_retrieval_of_experts_votes_per_task(lib_setup):
    model, tok, experts, lib, _ = lib_setup
    texts = task_texts("task1", 3, seed=5) + task_texts("task2", 2, seed=6)
    tasks = ["a", "a", "a", "b", "b"]
    enc = tok(texts, return_tensors="pt", padding=True)
    emb_model = HiddenStateEmbedder(model, tok, cache_dir=None)
    routed = attach(
        copy.deepcopy(model), lib, recipe="retrieval_of_experts", tokenizer=tok, embedder=emb_model
    )
    with torch.no_grad():
        routed(**enc, routing=RoutingInputs(task_names=tasks, record=True))
    votes = routed.last_call().plan["votes"].tolist()
    w = next(iter(routed.last_routing().values()))[:, 0]  # [B, E]
    chosen = w.argmax(-1).tolist()
    assert all(row.max() == 1 and row.sum() == 1 for row in w)  # one expert, weight 1
    for task in ("a", "b"):
        rows = [i for i, t in enumerate(tasks) if t == task]
        majority = max(set(votes[i] for i in rows), key=lambda e: ([votes[i] for i in rows].count(e), -e))
        assert {chosen[i] for i in rows} == {majority}
    # reference nearest neighbour, written out
    emb = torch.nn.functional.normalize(mean_pooled(model, enc["input_ids"], enc["attention_mask"]), dim=-1)
    samples = []
    for t in TASKS:
        d = tok(task_texts(t, 8), return_tensors="pt", padding=True)
        samples.append(
            torch.nn.functional.normalize(mean_pooled(model, d["input_ids"], d["attention_mask"]), dim=-1)
        )
    owner = torch.arange(3).repeat_interleave(8)
    assert votes == owner[(emb @ torch.cat(samples).T).argmax(-1)].tolist()


class CharHistogramEmbedder:
    """Any object with ``name`` and ``embed_texts`` serves embedding routers (here: character histograms)."""

    name = "char-histogram"

    def embed_texts(self, texts):
        return torch.stack(
            [torch.bincount(torch.tensor([ord(c) for c in t]), minlength=128)[:128].float() for t in texts]
        )


def test_custom_embedder_routes_examples_to_their_experts(lib_setup):
    model, tok, experts, lib, bare = lib_setup
    emb = CharHistogramEmbedder()
    with pytest.raises(RecipeNotApplicableError, match="embedding centroids"):
        attach(
            copy.deepcopy(model), lib, recipe="embedding_centroids", embedder=emb
        )  # none for this embedder yet
    compute_embedding_centroids(
        emb, {f"expert{i}": task_texts(t, 8) for i, t in enumerate(TASKS)}, library=lib
    )
    texts = [task_texts(t, 1, seed=42)[0] for t in ("task2", "task0", "task1")]
    enc = tok(texts, return_tensors="pt", padding=True)
    routed = attach(copy.deepcopy(model), lib, recipe="embedding_centroids", embedder=emb, k=1)
    with torch.no_grad():
        routed(
            **enc,
            routing=RoutingInputs(texts=texts, record=True, expert_labels=["expert2", "expert0", "expert1"]),
        )
    assert routed.routing_report().accuracy == 1.0


def test_text_embedder_gets_decoded_token_ids_when_no_texts_are_given(lib_setup):
    """A routed call with token ids only: an embedder without ``embed_ids`` gets the decoded texts."""
    model, tok, experts, lib, _ = lib_setup
    emb = CharHistogramEmbedder()
    compute_embedding_centroids(
        emb, {f"expert{i}": task_texts(t, 8) for i, t in enumerate(TASKS)}, library=lib
    )
    texts = [task_texts(t, 1, seed=7)[0] for t in ("task1", "task2", "task0")]
    enc = tok(texts, return_tensors="pt", padding=True)
    routed = attach(copy.deepcopy(model), lib, recipe="embedding_centroids", embedder=emb, tokenizer=tok, k=1)
    with torch.no_grad():
        from_texts = routed(**enc, routing=RoutingInputs(texts=texts, record=True))
        w_texts = next(iter(routed.last_routing().values()))
        from_ids = routed(**enc, routing=RoutingInputs(record=True))
        w_ids = next(iter(routed.last_routing().values()))
    torch.testing.assert_close(w_ids, w_texts)
    torch.testing.assert_close(from_ids.logits, from_texts.logits)
    no_tok = attach(copy.deepcopy(model), lib, recipe="embedding_centroids", embedder=emb, k=1)
    with pytest.raises(MoergeError, match="needs the examples' texts"), torch.no_grad():
        no_tok(**enc)


def test_only_a_held_in_only_recipe_refuses_held_out_tasks():
    with pytest.raises(RecipeNotApplicableError, match="only serves held-in"):
        get_recipe("oracle").check_applicable(None, generalization="out-of-distribution")
    dam = get_recipe("embedding_centroids")
    assert dam.taxonomy.generalization == "in-distribution" and not dam.held_in_only


def test_embedding_model_option_picks_the_embedder(lib_setup, monkeypatch, tmp_path):
    """``embedding_model="base"`` uses the base model's hidden states, whose centroids the library holds;
    the default (MiniLM where installed) has none there, and says so."""
    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path))
    model, tok, experts, lib, _ = lib_setup
    texts = [task_texts("task0", 1, seed=3)[0], task_texts("task2", 1, seed=4)[0]]
    enc = tok(texts, return_tensors="pt", padding=True)
    explicit = attach(
        copy.deepcopy(model), lib, recipe="embedding_centroids", embedder=HiddenStateEmbedder(model, tok)
    )
    by_option = attach(
        copy.deepcopy(model), lib, recipe="embedding_centroids", tokenizer=tok, embedding_model="base"
    )
    with torch.no_grad():
        torch.testing.assert_close(by_option(**enc).logits, explicit(**enc).logits)
    from moerge.backbones.embedder import minilm_available

    if minilm_available():
        with pytest.raises(RecipeNotApplicableError, match="all-MiniLM-L6-v2"):
            attach(copy.deepcopy(model), lib, recipe="embedding_centroids", tokenizer=tok)
