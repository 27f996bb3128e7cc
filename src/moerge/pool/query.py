"""What every query-level router shares.

A query router learns from `PoolData` — the routing split's queries, their sentence embeddings, and the quality
each pool member's answer to each query was measured to have — and predicts, for new queries, a score per
member (`QueryRouter.scores`, higher is better; routers that predict a probability of a good answer return
it in [0, 1]). Which member answers is then a policy over those scores and the members' costs (`choose`): the
best predicted member, or the best after a cost penalty λ — sweeping λ traces the quality–cost curve, and a
two-member pool with RouteLLM's threshold α is the special case ``scores[:, strong] − scores[:, weak] ≥ α``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PoolData:
    """A routing split: ``texts`` (N queries), ``features`` ``[N, d]`` their embeddings, ``quality`` ``[N, M]``
    each member's measured quality on each query (the suite's score of its answer: 1/0 for exact match, or a
    graded score in [0, 1]), ``members`` the M member names, ``costs`` ``[M]`` one query's cost on each member
    (relative units: FLOPs per token, or measured seconds), ``tags`` each query's task or category (Zooter's
    tag smoothing, Shnitzer's per-dataset scores), ``descriptions`` each member's description."""

    texts: Sequence[str]
    features: torch.Tensor
    quality: torch.Tensor
    members: Sequence[str]
    costs: torch.Tensor
    tags: Sequence[str] | None = None
    descriptions: Sequence[str] | None = None

    def __post_init__(self) -> None:
        n, m = len(self.texts), len(self.members)
        if self.features.shape[0] != n or tuple(self.quality.shape) != (n, m) or self.costs.shape != (m,):
            raise ValueError(
                f"PoolData: {n} texts and {m} members need features [{n}, d], quality [{n}, {m}], costs [{m}]; got "
                f"{tuple(self.features.shape)}, {tuple(self.quality.shape)}, {tuple(self.costs.shape)}"
            )


class QueryRouter:
    """A query-level router: ``fit`` on a routing split, then ``scores`` per member for new queries.
    ``texts`` are passed along for routers that read the query itself (description routing with an LLM)."""

    members: list[str]

    def fit(self, data: PoolData) -> QueryRouter:
        raise NotImplementedError

    def scores(self, features: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        """``[N, M]``: higher means the member is predicted to answer better."""
        raise NotImplementedError

    @property
    def info(self) -> dict[str, Any]:
        """What the router learned that a report may show (trained parameters, calibrated thresholds …)."""
        return {}


def choose(scores: torch.Tensor, costs: torch.Tensor, penalty: float = 0.0) -> torch.Tensor:
    """The member each query goes to: ``argmax_m scores[:, m] − penalty · costs[m] / max(costs)`` (ties go to
    the cheaper member). ``penalty`` 0 picks the best predicted member; sweeping it traces a quality–cost
    curve from the strongest choice to the cheapest."""
    rel = costs.double() / costs.double().max().clamp_min(1e-12)
    adjusted = scores.double() - penalty * rel
    order = torch.argsort(rel, stable=True)  # cheapest first: argmax returns the first of equal maxima
    return order[adjusted[:, order].argmax(dim=1)]
