"""Zooter: reward-guided routing distilled into a small router.

Lu et al., "Routing to the Expert: Efficient Reward-guided Ensemble of Large Language Models", NAACL 2024,
arXiv:2311.08692. Taxonomy record (survey table, moerging-methods.md): training standard, expert data private,
routing data general, granularity example, depth model, selection sparse, aggregation none, generalization
out-of-distribution, user data zero-shot.

What is computed here (the paper's steps, with the pool's measured quality as the reward):

1. per query q, the reward of each member's answer, r_q,m (Zooter scores answers with a reward model, QwenRM;
   here the reward is the quality in `PoolData.quality`, the suite's score of the member's answer);
2. the reward distribution over the pool, t_q = softmax(r_q / τ) (the paper normalises the rewards into a
   distribution with a softmax; τ is the ``temperature`` option);
3. tag-based label enhancement (optional, ``tag_weight`` β): the paper smooths noisy per-query targets with the
   average distribution of the queries sharing its tags (InsTag tags there; `PoolData.tags`, one tag per query,
   here): t̃_q = (1 − β) t_q + β · mean_{q' : tag(q') = tag(q)} t_q';
4. a small router, p(q) = softmax(f(e_q)) on the query embedding e_q (an mDeBERTa encoder fine-tuned in the
   paper; a linear layer or an MLP on a frozen sentence embedding here), trained to minimise
   KL(t̃_q ‖ p(q)) averaged over the queries;
5. at inference the query goes to argmax_m p_m(q) alone (`scores` returns p; `choose` with penalty 0 is that).

[U] The paper's exact temperature and mixing weight of the tag enhancement were not checked against its text in
this build (the card marks the details unverified); both are options, defaults τ = 0.1, β = 0.3. The router is linear on the embedding by default
(``hidden`` > 0: one hidden layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moerge.pool.fitting import head, train_full_batch
from moerge.pool.query import PoolData, QueryRouter


def reward_distribution(quality: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(quality / temperature)`` per query: the per-query target over the pool."""
    return torch.softmax(quality.double() / temperature, dim=1).float()


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(targets ‖ softmax(logits)) averaged over the queries."""
    return torch.nn.functional.kl_div(torch.log_softmax(logits, dim=1), targets, reduction="batchmean")


def tag_enhanced(targets: torch.Tensor, tags: Sequence[str] | None, weight: float) -> torch.Tensor:
    """Mix each query's target with the mean target of the queries sharing its tag (weight ``weight``)."""
    if tags is None or weight == 0.0:
        return targets
    names = sorted(set(tags))
    index = torch.tensor([names.index(t) for t in tags])
    sums = torch.zeros(len(names), targets.shape[1]).index_add_(0, index, targets)
    counts = torch.bincount(index, minlength=len(names)).clamp_min(1).unsqueeze(1)
    return (1.0 - weight) * targets + weight * (sums / counts)[index]


class ZooterRouter(QueryRouter):
    """Distils the (tag-enhanced) reward distribution into ``softmax(f(embedding))`` with a KL loss."""

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        tag_weight: float = 0.3,
        hidden: int = 0,
        steps: int = 300,
        lr: float = 1e-2,
        weight_decay: float = 0.01,
        seed: int = 0,
    ):
        self.temperature, self.tag_weight, self.hidden = temperature, tag_weight, hidden
        self.steps, self.lr, self.weight_decay, self.seed = steps, lr, weight_decay, seed
        self.net: torch.nn.Module | None = None
        self.losses: list[float] = []

    def targets(self, data: PoolData) -> torch.Tensor:
        """The distillation targets t̃ ``[N, M]`` for a routing split."""
        return tag_enhanced(reward_distribution(data.quality, self.temperature), data.tags, self.tag_weight)

    def fit(self, data: PoolData) -> ZooterRouter:
        self.members = list(data.members)
        target = self.targets(data)
        x = data.features.float()
        net = head(x, len(self.members), self.hidden, seed=self.seed)

        def loss() -> torch.Tensor:
            return distillation_loss(net(x), target)

        self.losses = train_full_batch(
            net, loss, steps=self.steps, lr=self.lr, weight_decay=self.weight_decay
        )
        self.net = net
        return self

    def scores(self, features: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError("ZooterRouter.scores before fit")
        with torch.no_grad():
            return torch.softmax(self.net(features.float()), dim=1)

    @property
    def info(self) -> dict[str, Any]:
        return {"final_kl": self.losses[-1] if self.losses else None, "steps": self.steps}
