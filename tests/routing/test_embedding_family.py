"""The embedding-routing family (AdapterSoup, LoraRetriever, Mo'LoRA, Token-Level Adaptation, What the
Weight?!, Airoboros kNN) and the vector index, each against a reference written out here."""

from __future__ import annotations

import copy

import pytest
import torch
from _routing_helpers import make_experts, task_texts

from moerge.errors import RecipeNotApplicableError
from moerge.experts.library import ExpertLibrary
from moerge.recipes import BuildContext, get_recipe
from moerge.recipes.facade import attach
from moerge.recipes.recipe import TargetData
from moerge.routing.index import VectorIndex, faiss_available
from moerge.routing.inputs import RoutingInputs
from moerge.transforms.centroids import compute_embedding_centroids
from moerge.transforms.kmeans import kmeans

TASKS = ["task0", "task1", "task2"]


class CharHistogramEmbedder:
    """A cheap text embedder: character histograms (the tasks differ in their alphabets)."""

    name = "char-histogram-family"

    def embed_texts(self, texts):
        return torch.stack(
            [
                torch.bincount(torch.tensor([ord(c) for c in t] or [0]), minlength=128)[:128].float()
                for t in texts
            ]
        )


def histogram(texts):
    return CharHistogramEmbedder().embed_texts(texts)


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_llama):
    """3 experts (one per task) in a library holding every signature the family needs, for the char embedder."""
    model, tok = tiny_llama
    experts = make_experts(model, 3, ranks=(4,), seed=21, scale=0.3)
    lib = ExpertLibrary.create(tmp_path_factory.mktemp("family") / "lib")
    for e in experts:
        lib.add(e)
    data = {f"expert{i}": task_texts(t, 12) for i, t in enumerate(TASKS)}
    emb = CharHistogramEmbedder()
    compute_embedding_centroids(emb, data, library=lib, max_samples=12)
    rows = {n: [{"prompt": t, "completion": ""} for t in texts] for n, texts in data.items()}
    for name in ("lora_retriever", "airoboros_knn"):
        recipe = get_recipe(name)
        ctx = BuildContext(model=model, experts=experts, library=lib, embedder=emb)
        opts = recipe.parse_options({})
        recipe.signatures[0].compute(
            ctx, opts, {n: r[: recipe.signatures[0].max_rows] for n, r in rows.items()}
        )
    return model, tok, experts, lib, data


def merged_copy(model, experts, weights):
    """The base model with Σ_e w_e ΔW_e added to its weights (the reference for parameter aggregation)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for e, expert in enumerate(experts):
            for name, lm in expert.lora.items():
                ref.get_submodule(name).weight += float(weights[e]) * lm.delta_for_weight()
    return ref


def factor_merged_copy(model, experts, weights):
    """The base model with ΔW = (Σ w_e B_e)(Σ w_e s_e A_e) added (averaged LoRA factors; all ranks equal)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in experts[0].lora:
            B = sum(float(w) * e.lora[name].B for w, e in zip(weights, experts))
            A = sum(float(w) * e.lora[name].scaling * e.lora[name].A for w, e in zip(weights, experts))
            ref.get_submodule(name).weight += B @ A
    return ref


def run(model, tok, texts, **kw):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc, **kw).logits, enc


# ---------------------------------------------------------------------------------------------- the index
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_index_matches_a_brute_force_search(metric):
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 16, generator=gen), torch.randn(7, 16, generator=gen)
    scores, ids = VectorIndex(bank, metric, "exact").search(queries, 5)
    for q in range(7):
        vals = [(float(bank[i] @ queries[q]) if metric == "ip" else float(((bank[i] - queries[q]) ** 2).sum()), i)
                for i in range(300)]  # fmt: skip
        best = sorted(vals, key=lambda v: -v[0] if metric == "ip" else v[0])[:5]
        assert ids[q].tolist() == [i for _, i in best]
        torch.testing.assert_close(scores[q], torch.tensor([v for v, _ in best]), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed (pip install 'moerge[index]')")
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_faiss_index_returns_what_the_exact_index_returns(metric):
    gen = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(2000, 32, generator=gen), torch.randn(50, 32, generator=gen)
    s_exact, i_exact = VectorIndex(bank, metric, "exact").search(queries, 10)
    s_faiss, i_faiss = VectorIndex(bank, metric, "faiss").search(queries, 10)
    assert torch.equal(i_exact, i_faiss)
    torch.testing.assert_close(s_exact, s_faiss, atol=1e-3, rtol=1e-4)


def test_kmeans_reaches_a_lloyd_fixed_point_and_finds_separated_blobs():
    gen = torch.Generator().manual_seed(2)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.cat([c + torch.randn(20, 2, generator=gen) for c in centres])
    fit = kmeans(pts, 3, seed=0)
    # each point is in its nearest centroid's cluster, and each centroid is its cluster's mean
    assert torch.equal(fit.labels, torch.cdist(pts, fit.centroids).argmin(1))
    for c in range(3):
        torch.testing.assert_close(fit.centroids[c], pts[fit.labels == c].mean(0))
    assert sorted(len(set(fit.labels[i * 20 : (i + 1) * 20].tolist())) for i in range(3)) == [1, 1, 1]
    assert len(set(fit.labels.tolist())) == 3


# ---------------------------------------------------------------------------------------------- LoraRetriever
def _retriever_reference(data, instruction, texts, k):
    """Each text's top-k experts: cosine of hist(instruction + x) to the mean of hist(instruction + sample)."""
    means = torch.stack(
        [histogram([instruction + t for t in data[f"expert{i}"][:20]]).mean(0) for i in range(3)]
    )
    q = torch.nn.functional.normalize(histogram([instruction + t for t in texts]), dim=-1)
    sims = q @ torch.nn.functional.normalize(means, dim=-1).T
    return [sorted(range(3), key=lambda e: (-float(sims[b, e]), e))[:k] for b in range(len(texts))]


@pytest.mark.parametrize(
    ("composition", "fusion_of"), [("mixture", "factors"), ("fusion", "factors"), ("fusion", "delta")]
)
def test_lora_retriever_mixed_batch_matches_one_example_at_a_time(family, composition, fusion_of):
    model, tok, experts, lib, data = family
    texts = [task_texts("task2", 1, seed=31)[0], task_texts("task0", 1, seed=32)[0][:15],
             task_texts("task1", 1, seed=33)[0]]  # fmt: skip
    routed = attach(copy.deepcopy(model), lib, recipe="lora_retriever", tokenizer=tok, embedder=CharHistogramEmbedder(),
                    k=2, composition=composition, fusion_of=fusion_of)  # fmt: skip
    instruction = routed.options.instruction
    chosen = _retriever_reference(data, instruction, texts, 2)
    assert len({tuple(sorted(c)) for c in chosen}) > 1  # a mixed batch: the examples' expert sets differ
    batch, enc = run(routed, tok, texts, routing=RoutingInputs(record=True))
    w = next(iter(routed.last_routing().values()))[:, 0]  # [B, E]
    for b, text in enumerate(texts):
        want_w = torch.zeros(3)
        want_w[chosen[b]] = 0.5
        torch.testing.assert_close(w[b], want_w)
        alone, one = run(routed, tok, [text])
        n = int(one["attention_mask"].sum())
        torch.testing.assert_close(batch[b, :n], alone[0, :n], atol=1e-5, rtol=1e-5)  # right padding
        ref_model = (
            factor_merged_copy if (composition, fusion_of) == ("fusion", "factors") else merged_copy
        )(model, experts, want_w)
        with torch.no_grad():
            ref = ref_model(**one).logits
        torch.testing.assert_close(alone, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- Airoboros
def test_airoboros_routes_each_example_to_the_nearest_bank_on_average(family):
    model, tok, experts, lib, data = family
    texts = [task_texts(t, 1, seed=40 + i)[0] for i, t in enumerate(("task1", "task2", "task0"))]
    texts[0] = texts[0][:10] + "abc"  # a mixed example
    routed = attach(copy.deepcopy(model), lib, recipe="airoboros_knn", tokenizer=tok,
                    embedder=CharHistogramEmbedder(), k=5)  # fmt: skip
    logits, enc = run(routed, tok, texts, routing=RoutingInputs(texts=texts, record=True))
    w = next(iter(routed.last_routing().values()))[:, 0]
    q = histogram(texts)
    for b in range(len(texts)):
        mean_d = []
        for i in range(3):
            d = sorted(float(((q[b] - s) ** 2).sum()) for s in histogram(data[f"expert{i}"]))
            mean_d.append(sum(d[:5]) / 5)
        best = min(range(3), key=lambda e: (mean_d[e], e))
        torch.testing.assert_close(w[b], torch.nn.functional.one_hot(torch.tensor(best), 3).float())
        with torch.no_grad():
            ref = merged_copy(model, experts, torch.nn.functional.one_hot(torch.tensor(best), 3).float())(
                **{k: v[b : b + 1] for k, v in enc.items()}
            ).logits
        torch.testing.assert_close(logits[b : b + 1], ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- AdapterSoup
@pytest.mark.parametrize("selection", ["similarity", "clustering"])
def test_adapter_soup_averages_the_experts_its_target_texts_choose(family, selection):
    model, tok, experts, lib, data = family
    target_texts = [
        t[:12] + u[:12] for t, u in zip(task_texts("task1", 4, seed=50), task_texts("task2", 4, seed=51))
    ]
    target = TargetData("new-task", "few-shot", tuple({"prompt": t, "completion": ""} for t in target_texts))
    with pytest.raises(RecipeNotApplicableError, match="target"):
        attach(copy.deepcopy(model), lib, recipe="adapter_soup", embedder=CharHistogramEmbedder())
    routed = attach(copy.deepcopy(model), lib, recipe="adapter_soup", embedder=CharHistogramEmbedder(),
                    target=target, k=2, selection=selection)  # fmt: skip
    q = histogram(target_texts)
    if selection == "similarity":  # mean cosine of the target texts to each expert's data centroid
        cents = [histogram(data[f"expert{i}"]).mean(0) for i in range(3)]
        scores = [float(torch.nn.functional.cosine_similarity(q, c[None]).mean()) for c in cents]
    else:  # share of each expert's samples in the clusters the target texts fall into
        bank = torch.cat([histogram(data[f"expert{i}"]) for i in range(3)])
        fit = kmeans(bank, 3, seed=0)
        target_clusters = torch.cdist(q.double(), fit.centroids.double()).argmin(1).tolist()
        scores = []
        for i in range(3):
            mine = fit.labels[i * 12 : (i + 1) * 12].tolist()
            scores.append(
                sum(mine.count(c) / 12 * target_clusters.count(c) / len(q) for c in set(target_clusters))
            )
    chosen = sorted(range(3), key=lambda e: (-scores[e], e))[:2]
    chosen = [e for e in chosen if scores[e] > 0] or chosen[:1]
    want = torch.zeros(3)
    want[chosen] = 1.0 / len(chosen)
    texts = task_texts("task0", 2, seed=52)
    got, enc = run(routed, tok, texts)
    with torch.no_grad():
        ref = merged_copy(model, experts, want)(**enc).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- Mo'LoRA
def test_molora_merges_per_example_by_cosine_shares(family):
    model, tok, experts, lib, data = family
    texts = [task_texts("task0", 1, seed=60)[0][:12] + task_texts("task1", 1, seed=61)[0][:12],
             task_texts("task2", 1, seed=62)[0]]  # fmt: skip
    routed = attach(copy.deepcopy(model), lib, recipe="molora", embedder=CharHistogramEmbedder())
    got, enc = run(routed, tok, texts, routing=RoutingInputs(texts=texts))
    cents = torch.stack([histogram(data[f"expert{i}"]).mean(0) for i in range(3)])
    cos = torch.nn.functional.cosine_similarity(histogram(texts)[:, None], cents[None], dim=-1).clamp(min=0)
    for b in range(2):
        with torch.no_grad():
            ref = merged_copy(model, experts, cos[b] / cos[b].sum())(
                **{k: v[b : b + 1] for k, v in enc.items()}
            ).logits
        torch.testing.assert_close(got[b : b + 1], ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- Token-Level Adaptation
def _tla_weights(tok, ids, cents):
    cos = torch.nn.functional.cosine_similarity(
        histogram([tok.decode(ids, skip_special_tokens=True)]), cents, dim=-1
    )
    boost = torch.ones(3)
    boost[cos.argmax()] = 4.0
    return torch.softmax(cos * boost, -1)


@pytest.mark.parametrize("every", [1, 2])
def test_token_level_adaptation_reembeds_the_prefix_every_n_tokens(family, every):
    from moerge.model.generation import GenerateConfig, complete

    model, tok, experts, lib, data = family
    routed = attach(copy.deepcopy(model), lib, recipe="token_level_adaptation", tokenizer=tok,
                    embedder=CharHistogramEmbedder(), every=every)  # fmt: skip
    prompt = task_texts("task0", 1, seed=70)[0][:10]
    got = complete(routed, tok, prompt, GenerateConfig(max_new_tokens=6))  # generate without a KV cache
    cents = torch.stack([histogram(data[f"expert{i}"]).mean(0) for i in range(3)])
    # reference, written out: no cache; PEFT's linear mix (both factors scaled by √w) of the current weights
    ids = got.ids[: got.prompt_tokens].tolist()
    w, since, history = _tla_weights(tok, ids, cents), 0, 1
    for _ in range(6):
        with torch.no_grad():
            logits = factor_merged_copy(model, experts, w.sqrt())(input_ids=torch.tensor([ids])).logits
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] == tok.eos_token_id:
            break
        since += 1
        if since >= every:
            w, since, history = _tla_weights(tok, ids, cents), 0, history + 1
    assert got.ids.tolist() == ids[: len(got.ids)]
    assert len(routed.last_call().plan["history"]) >= history - 1


# ---------------------------------------------------------------------------------------------- What the Weight?!
@pytest.mark.parametrize(
    ("scoring", "combination", "k"), [("prior", "parameter", 2), ("entropy", "top1", None)]
)
def test_what_the_weight_likelihood_scores_match_single_expert_models(family, scoring, combination, k):
    model, tok, experts, lib, data = family
    texts = [task_texts("task1", 1, seed=80)[0], task_texts("task2", 1, seed=81)[0][:16]]
    routed = attach(copy.deepcopy(model), lib, recipe="what_the_weight", embedder=CharHistogramEmbedder(),
                    scoring=scoring, combination=combination, k=k)  # fmt: skip
    got, enc = run(routed, tok, texts)
    for b in range(2):
        one = {key: v[b : b + 1, : int(enc["attention_mask"][b].sum())] for key, v in enc.items()}
        ll, ent = [], []
        for e in range(3):
            with torch.no_grad():
                logp = torch.log_softmax(
                    merged_copy(model, experts, torch.eye(3)[e])(**one).logits[0, :-1], -1
                )
            ll.append(float(logp.gather(-1, one["input_ids"][0, 1:, None]).sum()))
            ent.append(float(-(logp.exp() * logp).sum(-1).mean()))
        s = torch.softmax(torch.tensor(ll) if scoring == "prior" else -torch.tensor(ent), -1)
        keep = sorted(range(3), key=lambda e: -float(s[e]))[: (1 if combination == "top1" else k)]
        w = torch.zeros(3)
        w[keep] = s[keep] / s[keep].sum()
        torch.testing.assert_close(routed.last_call().plan["scores"][b], s, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            ref = merged_copy(model, experts, w)(**one).logits
        n = one["input_ids"].shape[1]
        torch.testing.assert_close(got[b : b + 1, :n], ref, atol=1e-4, rtol=1e-4)


TOPIC_WORDS = [
    "the cat sat on a mat and the dog chased the cat around the garden",
    "stocks fell as the market reacted to interest rates and bank earnings reports",
    "the recipe needs flour butter sugar eggs and an oven heated for baking bread",
]


def topic_rows(topic, n, seed):
    import random

    rng = random.Random(seed)
    words = TOPIC_WORDS[topic].split() + ["is", "it", "very", "Good!", "today,"]
    return [{"prompt": " ".join(rng.choice(words) for _ in range(8)), "completion": " ok."} for _ in range(n)]


def sklearn_tfidf_cosine(doc, text, stop_words):
    """The official code's ``cosine_sim``: a TfidfVectorizer fitted on the two documents, cosine of the rows."""
    import string

    from sklearn.feature_extraction.text import TfidfVectorizer

    table = str.maketrans("", "", string.punctuation)
    vec = TfidfVectorizer(tokenizer=lambda t: t.lower().translate(table).split(), token_pattern=None,
                          stop_words=stop_words)  # fmt: skip
    try:
        m = vec.fit_transform([doc, text])
    except ValueError:  # an empty vocabulary (every token a stop word)
        return 0.0
    return float((m @ m.T).toarray()[0, 1])


@pytest.mark.parametrize(("stop_words", "k", "uniform"), [("english", 2, False), ("none", None, True)])
def test_what_the_weight_tfidf_scores_match_scikit_learn(tmp_path, tiny_llama, stop_words, k, uniform):
    pytest.importorskip("sklearn")
    model, tok = tiny_llama
    experts = make_experts(model, 3, ranks=(4,), seed=23, scale=0.3)
    lib = ExpertLibrary.create(tmp_path / "lib")
    for e in experts:
        lib.add(e)
    data = {f"expert{i}": topic_rows(i, 120, seed=i) for i in range(3)}  # 100 of them make the document
    from moerge.recipes.facade import prepare_signatures

    opts = dict(
        scoring="tfidf", combination="parameter", k=k, topk_uniform=uniform, tfidf_stop_words=stop_words
    )
    with pytest.raises(RecipeNotApplicableError, match="-o scoring=tfidf"):
        attach(copy.deepcopy(model), lib, recipe="what_the_weight", **opts)
    prepare_signatures("what_the_weight", model, tok, lib, data, **opts)
    texts = [topic_rows(1, 1, seed=90)[0]["prompt"], "the cat and a dog baking bread", "it is the"]
    routed = attach(copy.deepcopy(model), lib, recipe="what_the_weight", **opts)
    got, enc = run(routed, tok, texts, routing=RoutingInputs(texts=texts))
    sw = "english" if stop_words == "english" else None
    for b, text in enumerate(texts):
        docs = [" ".join(r["prompt"] + r["completion"] for r in data[f"expert{e}"][:100]) for e in range(3)]
        s = torch.tensor([sklearn_tfidf_cosine(docs[e], text, sw) for e in range(3)])
        torch.testing.assert_close(routed.last_call().plan["scores"][b], s, atol=1e-5, rtol=1e-5)
        keep = sorted(range(3), key=lambda e: -float(s[e]))[: k or 3]
        w = torch.zeros(3)
        w[keep] = 1.0 / len(keep) if uniform or s[keep].sum() == 0 else s[keep] / s[keep].sum()
        with torch.no_grad():
            ref = merged_copy(model, experts, w)(**{key: v[b : b + 1] for key, v in enc.items()}).logits
        torch.testing.assert_close(got[b : b + 1], ref, atol=1e-4, rtol=1e-4)
    if stop_words == "english":
        assert float(routed.last_call().plan["scores"][2].abs().sum()) == 0.0  # only stop words: no evidence
