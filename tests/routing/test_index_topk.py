"""`VectorIndex`'s exact top-k (``torch.topk`` plus tie handling) and the centroid router's search through it,
against full stable sorts and scoring every centroid."""

from __future__ import annotations

import pytest
import torch

from moerge.routing.call import CallState
from moerge.routing.embedding import EmbeddingRouter
from moerge.routing.index import VectorIndex
from moerge.routing.inputs import RoutingInputs
from moerge.routing.router import prototype_scores
from moerge.routing.selection import SelectionConfig, select


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_search_is_a_stable_full_sort(ties, metric):
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        n = int(torch.randint(2, 30, (1,), generator=g))
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        make = (
            (lambda *s: torch.randint(-2, 3, s, generator=g).float())
            if ties
            else (lambda *s: torch.randn(*s, generator=g))
        )
        bank, queries = make(n, 3), make(6, 3)
        scores, ids = VectorIndex(bank, metric, "exact").search(queries, k)
        if metric == "ip":
            full = queries @ bank.T
        else:
            full = ((queries[:, None, :] - bank[None]) ** 2).sum(-1)
        order = torch.sort(full, dim=-1, descending=metric == "ip", stable=True).indices[:, :k]
        assert torch.equal(ids, order)
        torch.testing.assert_close(scores, full.gather(1, order), atol=1e-5, rtol=1e-5)


class Fixed:
    name = "fixed-embeddings"

    def __init__(self, emb):
        self.emb = emb

    def embed_texts(self, texts):
        return self.emb[: len(texts)]


@pytest.mark.parametrize("k, temperature", [(1, 1.0), (3, 0.1), (5, 2.0)])
def test_centroid_topk_through_the_index_matches_scoring_every_centroid(k, temperature):
    g = torch.Generator().manual_seed(1)
    cents, emb = torch.randn(40, 8, generator=g), torch.randn(5, 8, generator=g)
    config = SelectionConfig(k=k, temperature=temperature)
    router = EmbeddingRouter(Fixed(emb), cents, config)
    assert router.index is not None
    call = CallState(router, RoutingInputs(texts=["x"] * 5), num_experts=40, batch_size=5)
    router.begin_call(call)
    got = call.plan["selection"]
    want = select(prototype_scores(emb, cents, "cos"), config, "example")
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.weights, want.weights)
