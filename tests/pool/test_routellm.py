"""RouteLLM's routers (`moerge.pool.routellm`), each against a reference written out here: the preference labels
and the classifier's classes by loops, the threshold by numpy's quantile, the SW-ranking ratings by
``compute_elo_mle_with_tie``'s own formulation (scikit-learn's unpenalised logistic regression on the duplicated,
weighted battles), MF's score by its dense formula; and the learned routers on a pool whose best member is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moerge.pool.query import PoolData, choose
from moerge.pool.routellm import (
    ClassifierRouter,
    MatrixFactorizationRouter,
    SWRankingRouter,
    bradley_terry,
    calibrate_threshold,
    pairwise_preferences,
    similarity_weights,
)


def toy_pool(n: int = 96, seed: int = 0) -> PoolData:
    """Three members: ``weak`` (cheap) is right on queries whose first feature is positive, ``strong`` (dear) on
    most queries, ``mid`` on none; features are noisy 8-d vectors."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 8, generator=g)
    easy = feats[:, 0] > 0
    weak = easy.float()
    strong = (torch.rand(n, generator=g) < 0.9).float()
    mid = torch.zeros(n)
    quality = torch.stack([weak, mid, strong], dim=1)
    return PoolData([f"q{i}" for i in range(n)], feats, quality, ["weak", "mid", "strong"],
                    torch.tensor([1.0, 2.0, 8.0]))  # fmt: skip


def test_pairwise_preferences_match_a_loop():
    q = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.5, 1.0, 0.0]])
    pairs, outcome = pairwise_preferences(q)
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2]]
    for i in range(3):
        for p, (a, b) in enumerate(pairs.tolist()):
            want = 1.0 if q[i, a] > q[i, b] else 0.0 if q[i, a] < q[i, b] else 0.5
            assert outcome[i, p] == want


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_calibrated_threshold_is_the_quantile_and_routes_that_share(share):
    rates = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    t = calibrate_threshold(rates, share)
    assert t == pytest.approx(float(np.quantile(rates.double().numpy(), 1 - share)))
    assert float((rates >= t).double().mean()) == pytest.approx(share, abs=2e-3)


def test_similarity_weights_formula():
    sims = torch.tensor([[0.2, 0.5, -0.1]], dtype=torch.float64)
    want = [10 * 10 ** (s / 0.5) for s in (0.2, 0.5, -0.1)]
    assert similarity_weights(sims)[0].tolist() == pytest.approx(want)


def elo_reference(battles: list[tuple[int, int, str]], weights: list[float], m: int) -> np.ndarray:
    """``compute_elo_mle_with_tie`` (RouteLLM, similarity_weighted/utils.py) restated: duplicated battles, ±ln 10
    design, a tie counted as one win each, unpenalised logistic regression without intercept; ratings 400β+1000."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    rows = battles + battles
    x = np.zeros((len(rows), m))
    y = np.zeros(len(rows))
    for i, (a, b, w) in enumerate(rows):
        x[i, a], x[i, b] = math.log(10), -math.log(10)
        y[i] = 1.0 if w == "model_a" or (w == "tie" and i < len(battles)) else 0.0
    lr = sklearn.LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-10, max_iter=10000)  # penalty=None
    lr.fit(x, y, sample_weight=np.concatenate([weights, weights]))
    return 400 * lr.coef_[0] + 1000


def test_bradley_terry_matches_the_weighted_logistic_regression():
    pool = toy_pool(40)
    pairs, outcome = pairwise_preferences(pool.quality)
    w = torch.rand(40, generator=torch.Generator().manual_seed(3)).double() + 0.1
    battles, weights = [], []
    for j in range(40):
        for p, (a, b) in enumerate(pairs.tolist()):
            o = float(outcome[j, p])
            battles.append((a, b, "model_a" if o == 1 else "model_b" if o == 0 else "tie"))
            weights.append(float(w[j]))
    ref = elo_reference(battles, weights, 3)
    got = bradley_terry(pairs, (w @ outcome)[None], w.sum().expand(1, pairs.shape[0]), 3)[0].numpy()
    # ratings are defined up to a common offset: compare differences
    np.testing.assert_allclose(got - got.mean(), ref - ref.mean(), atol=0.05)


def test_sw_ranking_win_rate_is_the_weighted_elo_of_the_pair():
    pool = toy_pool(30)
    router = SWRankingRouter(strong="strong", weak="weak").fit(pool)
    query = torch.randn(2, 8, generator=torch.Generator().manual_seed(5))
    got = router.win_rate(query)
    pairs, outcome = pairwise_preferences(pool.quality)
    for i in range(2):
        sims = [
            float(torch.nn.functional.cosine_similarity(query[i], pool.features[j], dim=0)) for j in range(30)
        ]
        weights = [10 * 10 ** (s / max(sims)) for s in sims]
        battles, bw = [], []
        for j in range(30):
            for p, (a, b) in enumerate(pairs.tolist()):
                o = float(outcome[j, p])
                battles.append((a, b, "model_a" if o == 1 else "model_b" if o == 0 else "tie"))
                bw.append(weights[j])
        r = elo_reference(battles, bw, 3)
        want = 1 - 1 / (1 + 10 ** ((r[2] - r[0]) / 400))
        assert float(got[i]) == pytest.approx(want, abs=1e-4)


def test_mf_score_is_the_dense_bilinear_formula():
    router = MatrixFactorizationRouter(dim=6, epochs=1, strong="strong", weak="weak").fit(toy_pool(16))
    net = router.net
    e = torch.randn(4, 8)
    want = torch.zeros(4, 3)
    for i in range(4):
        for m in range(3):
            v = net.P.weight[m] / net.P.weight[m].norm()
            want[i, m] = (net.classifier.weight[0] * (v * (net.text_proj.weight @ e[i]))).sum()
    torch.testing.assert_close(router.member_scores(e).float(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        router.win_rate(e).float(), torch.sigmoid(want[:, 2] - want[:, 0]), atol=1e-6, rtol=0
    )


def test_classifier_labels_and_win_rate():
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    assert ClassifierRouter.labels(q, strong=1, weak=0).tolist() == [2, 1, 0, 1]
    pool = toy_pool(64)
    router = ClassifierRouter(epochs=5, strong="strong", weak="weak").fit(pool)
    probs = router.net(pool.features).softmax(-1).double()
    torch.testing.assert_close(router.win_rate(pool.features), probs[:, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SWRankingRouter(),
        lambda: MatrixFactorizationRouter(dim=16, epochs=30, lr=1e-2),
        lambda: ClassifierRouter(epochs=100),
    ],
    ids=["sw", "mf", "bert"],
)
def test_router_learns_when_the_weak_member_suffices(make):
    """The weak member is right exactly where feature 0 > 0: a good router sends those queries to it and the
    rest to the strong one; the threshold policy is RouteLLM's (strong iff win rate ≥ α), α calibrated to half
    the routing split; defaults pick strong = the best, weak = the cheapest."""
    train, test = toy_pool(160, seed=0), toy_pool(160, seed=1)
    router = make().fit(train)
    assert (router.members[router.strong], router.members[router.weak]) == ("strong", "weak")
    rates = router.win_rate(test.features)
    easy = test.features[:, 0] > 0
    assert float(rates[~easy].mean()) > float(rates[easy].mean()) + 0.05
    # the routing split is sent to the strong member at the calibrated share
    share = float((router.win_rate(train.features) >= router.threshold).double().mean())
    assert share == pytest.approx(0.5, abs=0.05)
    picked = choose(router.scores(test.features), test.costs)
    want = torch.where(rates >= router.threshold, 2, 0)
    assert picked.tolist() == want.tolist()


def test_pool_policy_scores_every_member():
    pool = toy_pool(40)
    router = MatrixFactorizationRouter(dim=8, epochs=2, policy="pool").fit(pool)
    s = router.scores(pool.features)
    assert s.shape == (40, 3) and torch.isfinite(s).all()
    torch.testing.assert_close(s, router.member_scores(pool.features))
