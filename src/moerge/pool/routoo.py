"""Routoo: a per-member performance predictor plus a cost-aware selector.

Mohammadshahi, Shaikh, Yazdani (Leeroo), "Routoo: Learning to Route to Large Language Models Effectively",
arXiv:2401.13979, 2024. Taxonomy record (survey table, moerging-methods.md): training standard, expert data
private, routing data multiple, granularity example, depth model, selection sparse, aggregation none,
generalization out-of-distribution, user data few-shot.

- **Performance predictor.** Routoo predicts, without running any candidate, how well each candidate model
  would answer a query: a lightweight LLM reads the query, each candidate is a learned embedding, and the
  predictor outputs the candidate's expected score (trained on the candidates' measured scores). Here: a query
  encoder h(e_q) (an MLP on the frozen query embedding, in place of the paper's LLM), one learned embedding
  v_m per member, and ŝ_m(q) = σ(w · GELU(W [h(e_q); v_m] + b) + c), trained with binary cross-entropy against
  `PoolData.quality` (1/0 correctness, or a graded score in [0, 1] as a soft label).
- **Cost-aware selector.** The paper's selector picks, per query, the model maximising predicted quality under a
  cost constraint. Here the constraint is an average ``budget`` per query over the batch routed together:
  maximise Σ_q ŝ_{m_q}(q) subject to mean_q cost(m_q) ≤ budget. It is solved by its Lagrangian relaxation,
  m_q = argmax_m ŝ_m(q) − λ·cost_m (`moerge.pool.query.choose`, ties to the cheaper), with the smallest λ
  that meets the budget found by bisection (the average cost is non-increasing in λ). By Everett's theorem
  the assignment this returns is optimal among all assignments costing no more than it does (the test checks
  this by brute force); it may leave part of the budget unspent where the exact knapsack would not.

[U] The paper's predictor is an LLM with candidate embeddings and its selector's exact form was not checked
against its text in this build (the card has only the abstract); the architecture and the Lagrangian selector
above are this implementation's choices, named as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moerge.pool.fitting import Standardise, train_full_batch
from moerge.pool.query import PoolData, QueryRouter, choose


class PerformancePredictor(nn.Module):
    """ŝ_m(q) = σ(MLP([h(e_q); v_m])) for every member m at once: ``[N, d] → [N, M]`` logits."""

    def __init__(self, features: torch.Tensor, members: int, *, hidden: int = 64, member_dim: int = 16):
        super().__init__()
        d = features.shape[1]
        self.encode = nn.Sequential(Standardise(features), nn.Linear(d, hidden), nn.GELU())
        self.members = nn.Parameter(torch.randn(members, member_dim) * 0.1)
        self.mix = nn.Linear(hidden + member_dim, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encode(x)  # [N, H]
        n, m = h.shape[0], self.members.shape[0]
        pair = torch.cat(
            [h.unsqueeze(1).expand(n, m, -1), self.members.unsqueeze(0).expand(n, m, -1)], dim=-1
        )
        return self.out(torch.nn.functional.gelu(self.mix(pair))).squeeze(-1)


def budget_choice(
    scores: torch.Tensor, costs: torch.Tensor, budget: float, *, iterations: int = 60
) -> tuple[torch.Tensor, float]:
    """The members maximising Σ scores under ``mean cost ≤ budget`` by the Lagrangian relaxation: the picks of
    `choose` at the smallest penalty λ whose picks meet the budget (bisection), and that λ. A budget below
    the cheapest member's cost sends every query to the cheapest member."""
    if len(scores) == 0:
        return torch.zeros(0, dtype=torch.long), 0.0
    picks = choose(scores, costs, 0.0)
    if float(costs[picks].double().mean()) <= budget:
        return picks, 0.0
    lo, hi = 0.0, 1.0
    span = float(scores.double().max() - scores.double().min())
    rel = costs.double() / costs.double().max()
    gaps = (rel.unsqueeze(0) - rel.unsqueeze(1)).abs()
    smallest = float(gaps[gaps > 0].min()) if bool((gaps > 0).any()) else 1.0
    hi = (span + 1.0) / smallest  # at this penalty every query goes to the cheapest member
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if float(costs[choose(scores, costs, mid)].double().mean()) <= budget:
            hi = mid
        else:
            lo = mid
    return choose(scores, costs, hi), hi


class RoutooRouter(QueryRouter):
    """A performance predictor per member (`predict`: quality in [0, 1]) and the budgeted selector (`select`);
    `scores` is the prediction, made budget-aware when the router has a ``budget`` (see `scores`)."""

    def __init__(
        self,
        *,
        budget: float | None = None,
        hidden: int = 64,
        member_dim: int = 16,
        steps: int = 300,
        lr: float = 1e-2,
        weight_decay: float = 0.01,
        seed: int = 0,
    ):
        self.budget, self.hidden, self.member_dim = budget, hidden, member_dim
        self.steps, self.lr, self.weight_decay, self.seed = steps, lr, weight_decay, seed
        self.net: PerformancePredictor | None = None
        self.costs: torch.Tensor | None = None
        self.losses: list[float] = []
        self.penalty: float | None = None  # the last batch's budget penalty λ

    def fit(self, data: PoolData) -> RoutooRouter:
        self.members = list(data.members)
        self.costs = data.costs.double()
        x, y = data.features.float(), data.quality.float().clamp(0.0, 1.0)
        torch.manual_seed(self.seed)
        net = PerformancePredictor(x, len(self.members), hidden=self.hidden, member_dim=self.member_dim)

        def loss() -> torch.Tensor:
            return torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)

        self.losses = train_full_batch(
            net, loss, steps=self.steps, lr=self.lr, weight_decay=self.weight_decay
        )
        self.net = net
        return self

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """The predicted quality of each member on each query, ``[N, M]`` in [0, 1]."""
        if self.net is None:
            raise RuntimeError("RoutooRouter used before fit")
        with torch.no_grad():
            return torch.sigmoid(self.net(features.float()))

    def scores(self, features: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        """The predicted quality; with a ``budget``, less the batch's Lagrangian cost penalty
        (ŝ − λ·cost / max cost), so that ``choose(scores, costs)`` makes the budgeted pick."""
        predicted = self.predict(features)
        if self.budget is None:
            return predicted
        assert self.costs is not None
        _, penalty = budget_choice(predicted, self.costs, self.budget)
        self.penalty = penalty
        return (predicted.double() - penalty * self.costs / self.costs.max()).float()

    def select(self, features: torch.Tensor, budget: float | None = None) -> torch.Tensor:
        """The member per query maximising predicted quality under the average ``budget`` (this router's
        ``budget`` when None; no budget: the best predicted member)."""
        budget = self.budget if budget is None else budget
        scores = self.predict(features)
        assert self.costs is not None
        if budget is None:
            return choose(scores, self.costs)
        return budget_choice(scores, self.costs, budget)[0]

    @property
    def info(self) -> dict[str, Any]:
        return {
            "final_bce": self.losses[-1] if self.losses else None,
            "budget": self.budget,
            "penalty": self.penalty,
        }
