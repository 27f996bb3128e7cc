"""`moerge.pool.query.choose`: the cost-penalised argmax, checked against a loop written out here."""

from __future__ import annotations

import pytest
import torch

from moerge.pool.query import PoolData, choose


@pytest.mark.parametrize("penalty", [0.0, 0.1, 0.5, 2.0])
def test_choose_is_the_penalised_argmax_with_ties_to_the_cheaper(penalty):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 3, generator=g).round(decimals=1)  # many ties
    costs = torch.tensor([4.0, 1.0, 2.0])
    got = choose(scores, costs, penalty)
    for i in range(50):
        best, pick = None, None
        for m in sorted(range(3), key=lambda m: costs[m]):  # cheaper first: wins ties
            v = float(scores[i, m]) - penalty * float(costs[m]) / 4.0
            if best is None or v > best + 1e-7:
                best, pick = v, m
        assert int(got[i]) == pick


def test_pool_data_checks_its_shapes():
    with pytest.raises(ValueError, match="quality"):
        PoolData(["a", "b"], torch.zeros(2, 4), torch.zeros(2, 3), ["x", "y"], torch.ones(2))
