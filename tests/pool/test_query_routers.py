"""The pool's query routers (Zooter, Routoo, benchmark-kNN, description routing) against references written
out here, and on a synthetic pool where the right member is learnable: each beats random routing and comes
near the oracle's per-query choice."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moerge.errors import RecipeNotApplicableError
from moerge.pool.benchmark_knn import BenchmarkKNNRouter, knn_correctness
from moerge.pool.description import DescriptionRouter
from moerge.pool.query import PoolData, QueryRouter, choose
from moerge.pool.routoo import RoutooRouter, budget_choice
from moerge.pool.synthetic import TOPICS, routed_quality, split, synthetic_pool
from moerge.pool.zooter import ZooterRouter, distillation_loss
from moerge.recipes.registry import get_recipe


class BagOfTopics:
    """A toy sentence embedder: which topic words a text contains (plus a constant, so no row is zero)."""

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[float(t in s) for t in TOPICS] + [0.1] for s in texts])


@pytest.fixture(scope="module")
def pool() -> tuple[PoolData, PoolData]:
    return split(synthetic_pool(600, seed=0))


def tiny(n: int = 12, m: int = 3, d: int = 4, seed: int = 1, tags: int = 3) -> PoolData:
    g = torch.Generator().manual_seed(seed)
    return PoolData(
        texts=[f"q{i}" for i in range(n)],
        features=torch.randn(n, d, generator=g),
        quality=torch.rand(n, m, generator=g).round(decimals=1),
        members=[f"m{j}" for j in range(m)],
        costs=torch.tensor([1.0, 2.0, 5.0][:m]),
        tags=[f"t{i % tags}" for i in range(n)],
    )


# --- Zooter ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag_weight", [0.0, 0.3])
def test_zooter_targets_are_the_tag_smoothed_softmax_of_the_rewards(tag_weight):
    data, tau = tiny(), 0.2
    got = ZooterRouter(temperature=tau, tag_weight=tag_weight).targets(data)
    n, m = data.quality.shape
    soft = []
    for i in range(n):
        e = [math.exp(float(data.quality[i, j]) / tau) for j in range(m)]
        soft.append([x / sum(e) for x in e])
    for i in range(n):
        same = [k for k in range(n) if data.tags[k] == data.tags[i]]
        for j in range(m):
            tag_mean = sum(soft[k][j] for k in same) / len(same)
            want = (1 - tag_weight) * soft[i][j] + tag_weight * tag_mean
            assert float(got[i, j]) == pytest.approx(want, abs=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(n))


def test_zooter_loss_is_the_kl_from_the_targets_to_the_router():
    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(5, 4, generator=g), torch.softmax(torch.randn(5, 4, generator=g), 1)
    want = 0.0
    for i in range(5):
        z = sum(math.exp(float(v)) for v in logits[i])
        for j in range(4):
            p, t = math.exp(float(logits[i, j])) / z, float(targets[i, j])
            want += t * (math.log(t) - math.log(p))
    assert float(distillation_loss(logits, targets)) == pytest.approx(want / 5, rel=1e-5)


# --- Routoo ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1.0, 1.5, 2.2, 3.0, 10.0])
def test_routoo_selector_is_optimal_for_its_cost_by_brute_force(budget):
    g = torch.Generator().manual_seed(7)
    scores, costs = torch.rand(6, 3, generator=g, dtype=torch.float64), torch.tensor([1.0, 2.0, 4.0])
    picks, penalty = budget_choice(scores, costs, budget)
    spent = float(costs[picks].sum())
    assert spent / 6 <= budget + 1e-9
    value = float(scores.gather(1, picks.view(-1, 1)).sum())
    best_within = max(
        sum(float(scores[i, a[i]]) for i in range(6))
        for a in itertools.product(range(3), repeat=6)
        if sum(float(costs[x]) for x in a) <= spent + 1e-9
    )
    assert value == pytest.approx(best_within, abs=1e-9)  # nothing as cheap does better (Everett)
    if penalty > 0:  # the smallest penalty that meets the budget: a clearly smaller one overspends
        assert float(costs[choose(scores, costs, penalty * 0.98)].mean()) > budget


def test_routoo_budget_below_the_cheapest_sends_everything_there():
    scores, costs = torch.rand(5, 3), torch.tensor([2.0, 1.0, 3.0])
    picks, _ = budget_choice(scores, costs, 0.5)
    assert picks.tolist() == [1] * 5


# --- benchmark kNN (Shnitzer et al.) --------------------------------------------------------------------


def test_knn_correctness_is_the_mean_over_the_nearest_benchmark_inputs():
    data, k = tiny(20, seed=2), 4
    queries = torch.randn(6, 4, generator=torch.Generator().manual_seed(9))
    correct = (data.quality >= 0.5).float()
    got = knn_correctness(queries, data.features, correct, k)
    for i in range(6):
        dists = sorted((math.dist(queries[i].tolist(), data.features[b].tolist()), b) for b in range(20))
        near = [b for _, b in dists[:k]]
        for m in range(3):
            assert float(got[i, m]) == pytest.approx(sum(float(correct[b, m]) for b in near) / k, abs=1e-6)


def test_task_scores_s1_s2_s3_and_the_reliability_line():
    data, k = tiny(24, seed=4, tags=3), 3
    router = BenchmarkKNNRouter(k=k).fit(data)
    correct = (data.quality >= 0.5).double()
    # the reliability line: leave each tag out, plus the split with each input out of its own neighbours
    points = []
    X, n = data.features.double(), 24

    def knn(i_rows, bank_rows, kk):
        out = []
        for i in i_rows:
            ds = sorted((math.dist(X[i].tolist(), X[b].tolist()), b) for b in bank_rows if b != i)[:kk]
            out.append(ds)
        return out

    for tag in sorted(set(data.tags)):
        inside = [i for i in range(n) if data.tags[i] == tag]
        rest = [i for i in range(n) if data.tags[i] != tag]
        near = knn(inside, rest, k)
        phi = sum(d for row in near for d, _ in row) / (len(inside) * k)
        acc = [sum(float((sum(float(correct[b, m]) for _, b in row) / k > 0.5) == bool(correct[i, m]))
                   for i, row in zip(inside, near)) / len(inside) for m in range(3)]  # fmt: skip
        points.append((phi, acc))
    near = knn(range(n), range(n), k)
    points.append((sum(d for row in near for d, _ in row) / (n * k),
                   [sum(float((sum(float(correct[b, m]) for _, b in row) / k > 0.5) == bool(correct[i, m]))
                        for i, row in enumerate(near)) / n for m in range(3)]))  # fmt: skip
    xs = [p for p, _ in points]
    xbar = sum(xs) / len(xs)
    for m in range(3):
        ys = [a[m] for _, a in points]
        ybar = sum(ys) / len(ys)
        b = sum((x - xbar) * (y - ybar) for x, y in zip(xs, ys)) / sum((x - xbar) ** 2 for x in xs)
        assert float(router.line[m, 1]) == pytest.approx(b, abs=1e-6)
        assert float(router.line[m, 0]) == pytest.approx(ybar - b * xbar, abs=1e-6)
    # S1, S2, S3 on a new task
    task = torch.randn(5, 4, generator=torch.Generator().manual_seed(11))
    g = knn_correctness(task, data.features, correct, k).double()
    phi = sum(sorted(math.dist(t.tolist(), x.tolist()) for x in X)[j] for t in task for j in range(k)) / (
        5 * k
    )
    got = router.task_scores(task)
    for m in range(3):
        p = min(1.0, max(0.0, float(router.line[m, 0]) + float(router.line[m, 1]) * phi))
        s1 = sum(float(g[i, m]) for i in range(5)) / 5
        s2 = sum(p * float(g[i, m] > 0.5) + (1 - p) * float(g[i, m] <= 0.5) for i in range(5)) / 5
        s3 = p * s2 + (1 - p) * float(correct[:, m].mean())
        assert float(got["s1"][m]) == pytest.approx(s1, abs=1e-5)
        assert float(got["s2"][m]) == pytest.approx(s2, abs=1e-5)
        assert float(got["s3"][m]) == pytest.approx(s3, abs=1e-5)


@pytest.mark.parametrize("score", ["s1", "s2", "s3"])
def test_task_level_selection_picks_each_tasks_specialist(pool, score):
    train, test = pool
    router = BenchmarkKNNRouter(granularity="task", score=score).fit(train)
    for tag in sorted(set(test.tags)):
        rows = [i for i, t in enumerate(test.tags) if t == tag]
        picks = choose(router.scores(test.features[rows]), test.costs)
        assert len(set(picks.tolist())) == 1  # one member for the whole task
        best = int(test.quality[rows].mean(0).argmax())
        assert int(picks[0]) == best, (tag, score)


# --- description routing --------------------------------------------------------------------------------


def test_description_scores_are_cosines_of_query_and_description_embeddings(pool):
    train, test = pool
    router = DescriptionRouter(embedder=BagOfTopics()).fit(train)
    got = router.scores(test.features[:5], test.texts[:5])
    emb = BagOfTopics()
    for i in range(5):
        q = emb.embed_texts([test.texts[i]])[0].tolist()
        for m, desc in enumerate(train.descriptions):
            d = emb.embed_texts([desc])[0].tolist()
            cos = sum(a * b for a, b in zip(q, d)) / math.sqrt(sum(a * a for a in q) * sum(b * b for b in d))
            assert float(got[i, m]) == pytest.approx(cos, abs=1e-6)


def test_description_routing_refuses_a_pool_without_descriptions():
    with pytest.raises(RecipeNotApplicableError, match="description"):
        DescriptionRouter(embedder=BagOfTopics()).fit(tiny())


# --- every router on a learnable pool -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zooter", "routoo", "benchmark_knn", "description_router"])
def test_each_router_beats_random_and_approaches_the_oracle(pool, name):
    train, test = pool
    recipe = get_recipe(name)
    assert recipe.kind == "pool"
    router = recipe.query_router(recipe.parse_options({}))
    assert isinstance(router, QueryRouter)
    if name == "description_router":
        router.embedder = BagOfTopics()
    router.fit(train)
    got = routed_quality(test.quality, choose(router.scores(test.features, test.texts), test.costs))
    random = float(test.quality.mean())  # a uniformly random member's expected quality
    oracle = float(test.quality.max(1).values.mean())
    best_single = float(test.quality.mean(0).max())
    assert got > best_single + 0.2
    assert got - random >= 0.8 * (oracle - random) - 0.05, (got, random, oracle)


def test_routoo_budget_trades_quality_for_cost():
    data = synthetic_pool(600, seed=1, good=0.7, generalist=0.95)  # the expensive generalist is the best
    train, test = split(data)
    router = RoutooRouter(steps=200).fit(train)
    spent, quality = [], []
    for budget in (1.5, 3.0, 5.0, None):
        picks = router.select(test.features, budget)
        spent.append(float(test.costs[picks].mean()))
        quality.append(routed_quality(test.quality, picks))
        if budget is not None:
            assert spent[-1] <= budget + 1e-9
    assert spent == sorted(spent) and quality[-1] > quality[0]


def test_pool_recipes_are_listed_and_left_out_of_an_expert_suites_default_methods():
    import json

    from typer.testing import CliRunner

    from moerge.bench.runner import default_methods
    from moerge.cli import app
    from moerge.recipes.registry import list_recipes

    pool_names = {r.name for r in list_recipes() if r.kind == "pool"}
    assert {"zooter", "routoo", "benchmark_knn", "description_router"} <= pool_names
    listed = {row["recipe"] for row in json.loads(CliRunner().invoke(app, ["recipes", "--json"]).stdout)}
    assert pool_names <= listed
    assert not pool_names & {get_recipe(s.recipe).name for s in default_methods()}


def test_routoo_scores_with_a_budget_make_choose_pick_the_budgeted_members(pool):
    train, test = pool
    router = RoutooRouter(steps=50).fit(train)
    budgeted = RoutooRouter(steps=50, budget=1.6).fit(train)
    want = router.select(test.features, 1.6)
    assert torch.equal(choose(budgeted.scores(test.features), test.costs), want)
    assert float(test.costs[want].mean()) <= 1.6


def test_description_likelihood_is_the_mean_log_prob_of_each_description_after_the_query(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.pool.description import TEMPLATE

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = synthetic_pool(6, members=3, clusters=2, seed=5)
    descriptions = ["math", "a general assistant", "poems"]  # different lengths: padding matters
    data = PoolData(
        data.texts, data.features, data.quality, data.members, data.costs, data.tags, descriptions
    )
    recipe = get_recipe("description_router")
    router = recipe.query_router(recipe.parse_options({"scorer": "likelihood"}))
    router.model, router.tokenizer = model, tok
    got = router.fit(data).scores(data.features[:3], data.texts[:3])
    for n in range(3):
        prompt = [tok.bos_token_id] + tok(TEMPLATE.format(query=data.texts[n]), add_special_tokens=False)[
            "input_ids"
        ]
        for m, d in enumerate(descriptions):
            ids = prompt + tok(d, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0]
            logp = [float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(len(prompt), len(ids))]
            assert float(got[n, m]) == pytest.approx(sum(logp) / len(logp), abs=1e-4)
