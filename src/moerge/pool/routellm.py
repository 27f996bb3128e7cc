"""RouteLLM's routers (Ong et al. 2024, "RouteLLM: Learning to Route LLMs with Preference Data",
arXiv:2406.18665; official code lm-sys/RouteLLM @ 0b64fda, ``routellm/routers/``, read for what follows).

Each router predicts the strong model's win rate against the weak one for a query, and the query goes to the
strong model iff that rate ≥ a threshold α (``Router.route``), with α calibrated to a target share of strong
calls as ``calibrate_threshold.py`` does: the (1 − share) quantile of the router's win rates on its calibration
data (here the routing split, the data the router learns from). Training data are pairwise preferences derived
from the pool's own answers on the routing split: for each query and each pair of members, the one whose answer
scored higher wins, equal scores are a tie (RouteLLM's Arena battles; its ``preprocess_battles`` labels).

- `SWRankingRouter` (``SWRankingRouter.calculate_strong_win_rate``): every battle is weighted by its prompt's
  cosine similarity to the query, ``10 · 10^(sim / max sim)`` (``get_weightings``); a Bradley–Terry/Elo MLE
  with ties (``compute_elo_mle_with_tie``: a tie counts as one win for each side, a win as two; ratings
  ``400·β + 1000``) is fitted on the weighted battles; the strong win rate is ``1 / (1 + 10^((R_w − R_s)/400))``.
  Deviations: the MLE is solved by Newton's method on battle counts aggregated per pair (the same likelihood
  as ``LogisticRegression(fit_intercept=False, penalty=None)`` on the duplicated battles, with a 1e-6 ridge
  that fixes the ratings' common offset) so it runs for every query in one batch; members are not grouped
  into tiers (``compute_tiers``; RouteLLM groups Arena's 64 models into 10, our pools are small).
- `MatrixFactorizationRouter` (``matrix_factorization/model.py``, ``train_matrix_factorization.py``):
  ``δ(m, q) = wᵀ(normalize(P_m) ⊙ W e_q)``, trained with a logistic loss on ``δ(winner) − δ(loser)`` (ties
  dropped, Gaussian noise ``α·N(0, 1)`` on the prompt embedding while training, Adam), win rate
  ``σ(δ(strong) − δ(weak))``; the authors' settings (dim 128, α 0.1, lr 3e-4, weight decay 1e-5, batch 64,
  100 epochs) are the defaults.
- `ClassifierRouter` (the BERT router's role, ``BERTRouter``): a 3-way classifier (strong wins / tie / weak
  wins) on the query's sentence embedding; win rate ``1 − P(tie or weak wins)``. Deviation: RouteLLM fine-tunes
  BERT-base end to end; here the embedder (MiniLM where installed) is frozen and a small MLP head is trained
  on its features, so the router trains in seconds on CPU.

With ``policy="pool"`` SW-ranking and MF score every member (its rating, or ``δ(m, q)``) and `choose` picks
among the whole pool — an extension beyond the paper's two-model routing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from moerge.errors import MalformedConfigError
from moerge.pool.query import PoolData, QueryRouter

LN10 = math.log(10.0)


def pairwise_preferences(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pairs [P, 2], outcome [N, P])`` for every unordered pair ``a < b`` of the M members: outcome 1 where
    ``a`` scored higher on the query, 0 where ``b`` did, 0.5 for a tie."""
    m = quality.shape[1]
    pairs = torch.tensor([(a, b) for a in range(m) for b in range(a + 1, m)], dtype=torch.long).reshape(-1, 2)
    qa, qb = quality[:, pairs[:, 0]], quality[:, pairs[:, 1]]
    outcome = torch.where(qa > qb, 1.0, torch.where(qa < qb, 0.0, 0.5)).double()
    return pairs, outcome


def calibrate_threshold(win_rates: torch.Tensor, strong_share: float) -> float:
    """RouteLLM's ``calibrate_threshold``: the threshold at which a share ``strong_share`` of these win rates
    routes to the strong model — their ``1 − strong_share`` quantile (linear interpolation, as pandas)."""
    if not 0.0 <= strong_share <= 1.0:
        raise MalformedConfigError(f"strong_share must be in [0, 1]; got {strong_share}")
    return float(torch.quantile(win_rates.double(), 1.0 - strong_share))


def similarity_weights(similarities: torch.Tensor) -> torch.Tensor:
    """``SWRankingRouter.get_weightings``: ``10 · 10^(sim / max sim)`` per row of ``[Q, J]`` similarities."""
    max_sim = similarities.max(dim=-1, keepdim=True).values
    return 10.0 * torch.pow(10.0, similarities / max_sim)


def bradley_terry(
    pairs: torch.Tensor,
    wins: torch.Tensor,
    totals: torch.Tensor,
    m: int,
    ridge: float = 1e-6,
    iters: int = 50,
) -> torch.Tensor:
    """Elo ratings ``[Q, m]`` (``400·β + 1000``, mean 1000) maximising, for each of Q weightings, the Bradley–Terry
    likelihood ``Σ_p totals[p]·(ŷ_p log σ(d_p) + (1 − ŷ_p) log σ(−d_p))`` with ``d_p = ln10·(β_a − β_b)`` and
    ``ŷ_p = wins[p] / totals[p]`` — ``compute_elo_mle_with_tie``'s objective, battles aggregated per pair."""
    q = wins.shape[0]
    x = torch.zeros(pairs.shape[0], m, dtype=torch.float64)
    x[torch.arange(pairs.shape[0]), pairs[:, 0]] = LN10
    x[torch.arange(pairs.shape[0]), pairs[:, 1]] = -LN10
    beta = torch.zeros(q, m, dtype=torch.float64)
    eye = torch.eye(m, dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(beta @ x.T)  # [Q, P]
        grad = (totals * p - wins) @ x + ridge * beta  # gradient of the negative log-likelihood
        hess = torch.einsum("qp,pi,pj->qij", totals * p * (1 - p), x, x) + ridge * eye
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        beta = beta - step
        if step.abs().max() < 1e-10:
            break
    beta = beta - beta.mean(dim=1, keepdim=True)
    return 400.0 * beta + 1000.0


def _pair_indices(
    data_members: Sequence[str], strong: str | None, weak: str | None, data: PoolData
) -> tuple[int, int]:
    names = list(data_members)
    for n in (strong, weak):
        if n is not None and n not in names:
            raise MalformedConfigError(f"member {n!r} is not in the pool ({', '.join(names)})")
    mean = data.quality.double().mean(0)
    costs = data.costs.double()
    s = names.index(strong) if strong else int(mean.argmax())
    if weak:
        w = names.index(weak)
    else:  # the cheapest member; among equally cheap ones the best
        cheapest = (costs == costs.min()).nonzero().flatten()
        w = int(cheapest[mean[cheapest].argmax()])
    if s == w:
        raise MalformedConfigError(
            f"the strong and weak members are both {names[s]!r}: name them (options strong=…, weak=…)"
        )
    return s, w


class _PairRouter(QueryRouter):
    """What RouteLLM's routers share: the strong/weak pair, the calibrated threshold, and the scores
    ``choose`` turns into the threshold policy (strong iff win rate ≥ α; every other member excluded)."""

    def __init__(
        self, strong: str | None = None, weak: str | None = None, strong_share: float = 0.5,
        policy: Literal["pair", "pool"] = "pair",
    ) -> None:  # fmt: skip
        self.strong_name, self.weak_name, self.strong_share, self.policy = strong, weak, strong_share, policy
        self.members: list[str] = []
        self.threshold = 0.5

    def _setup(self, data: PoolData) -> None:
        self.members = list(data.members)
        self.strong, self.weak = _pair_indices(self.members, self.strong_name, self.weak_name, data)

    def win_rate(self, features: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        """``[N]``: the predicted probability that the strong member's answer beats the weak one's."""
        raise NotImplementedError

    def member_scores(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} scores a strong/weak pair only (policy=pair)")

    def _calibrate(self, data: PoolData) -> None:
        self.threshold = calibrate_threshold(self.win_rate(data.features, data.texts), self.strong_share)

    def scores(self, features: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        if self.policy == "pool":
            return self.member_scores(features)
        rate = self.win_rate(features, texts).double()
        out = torch.full((features.shape[0], len(self.members)), -math.inf, dtype=torch.float64)
        out[:, self.strong] = rate - self.threshold
        out[:, self.weak] = -1e-12  # RouteLLM routes to the strong model on equality (≥ α)
        return out

    @property
    def info(self) -> dict[str, Any]:
        if self.policy == "pool":
            return {"policy": "pool"}
        return {"strong": self.members[self.strong], "weak": self.members[self.weak],
                "threshold": round(self.threshold, 6), "strong_share": self.strong_share, "policy": self.policy}  # fmt: skip


class SWRankingRouter(_PairRouter):
    """Similarity-weighted Bradley–Terry ranking (RouteLLM ``sw_ranking``): no training, the battles are kept
    and weighted per query."""

    def fit(self, data: PoolData) -> SWRankingRouter:
        self._setup(data)
        self.pairs, outcome = pairwise_preferences(data.quality)
        self.outcome = outcome  # [J, P]
        self.keys = F.normalize(data.features.double(), dim=-1)
        self._calibrate(data)
        return self

    def ratings(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, M]`` Elo ratings fitted on the battles weighted by their similarity to each query."""
        sims = F.normalize(features.double(), dim=-1) @ self.keys.T  # [N, J]
        w = similarity_weights(sims)
        wins = w @ self.outcome  # [N, P]: every prompt holds one battle per pair
        totals = w.sum(dim=1, keepdim=True).expand_as(wins)
        return bradley_terry(self.pairs, wins, totals, len(self.members))

    def win_rate(self, features: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        r = self.ratings(features)
        return 1.0 - 1.0 / (1.0 + torch.pow(10.0, (r[:, self.strong] - r[:, self.weak]) / 400.0))

    def member_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.ratings(features) / 400.0


class MFNet(nn.Module):
    """RouteLLM's ``MFModel``: model embeddings ``P``, a text projection and a linear head, no biases."""

    def __init__(self, num_models: int, text_dim: int, dim: int = 128) -> None:
        super().__init__()
        self.P = nn.Embedding(num_models, dim)
        self.text_proj = nn.Linear(text_dim, dim, bias=False)
        self.classifier = nn.Linear(dim, 1, bias=False)

    def delta(self, prompt_embed: torch.Tensor) -> torch.Tensor:
        """``[N, M]``: ``δ(m, q) = wᵀ(normalize(P_m) ⊙ W e_q)`` for every member."""
        models = F.normalize(self.P.weight, p=2, dim=1)  # [M, dim]
        proj = self.text_proj(prompt_embed)  # [N, dim]
        return (proj.unsqueeze(1) * models.unsqueeze(0)) @ self.classifier.weight.squeeze(0)


class MatrixFactorizationRouter(_PairRouter):
    """RouteLLM's ``mf`` router, trained here on the pool's preferences (``train_matrix_factorization.py``)."""

    def __init__(
        self, dim: int = 128, epochs: int = 100, lr: float = 3e-4, weight_decay: float = 1e-5, alpha: float = 0.1,
        batch_size: int = 64, seed: int = 42, **kw: Any,
    ) -> None:  # fmt: skip
        super().__init__(**kw)
        self.dim, self.epochs, self.lr, self.wd, self.alpha = dim, epochs, lr, weight_decay, alpha
        self.batch_size, self.seed = batch_size, seed

    def fit(self, data: PoolData) -> MatrixFactorizationRouter:
        self._setup(data)
        pairs, outcome = pairwise_preferences(data.quality)
        q_idx, p_idx = (outcome != 0.5).nonzero(as_tuple=True)  # ties dropped, as the authors filter them
        a, b = pairs[p_idx, 0], pairs[p_idx, 1]
        a_won = outcome[q_idx, p_idx] == 1.0
        winner, loser = torch.where(a_won, a, b), torch.where(a_won, b, a)
        feats = data.features.float()
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = MFNet(len(self.members), feats.shape[1], self.dim)
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.wd)
        n = len(q_idx)
        self.train_steps = 0
        for _ in range(self.epochs if n else 0):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, self.batch_size):
                idx = order[i : i + self.batch_size]
                e = feats[q_idx[idx]]
                e = e + torch.randn(e.shape, generator=gen) * self.alpha  # noise on the prompt embedding
                models = F.normalize(self.net.P(torch.stack([winner[idx], loser[idx]])), p=2, dim=-1)
                logit = self.net.classifier((models[0] - models[1]) * self.net.text_proj(e)).squeeze(-1)
                loss = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
                opt.zero_grad()
                loss.backward()
                opt.step()
                self.train_steps += 1
        self.net.eval()
        self._calibrate(data)
        return self

    def member_scores(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net.delta(features.float()).double()

    def win_rate(self, features: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        d = self.member_scores(features)
        return torch.sigmoid(d[:, self.strong] - d[:, self.weak])


class ClassifierRouter(_PairRouter):
    """The BERT router's role: a 3-way classifier (0 strong wins, 1 tie, 2 weak wins) on frozen sentence
    embeddings; win rate ``1 − P(tie or weak wins)``."""

    def __init__(
        self, hidden: int = 256, epochs: int = 200, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
        **kw: Any,
    ) -> None:  # fmt: skip
        super().__init__(**kw)
        self.hidden, self.epochs, self.lr, self.wd, self.seed = hidden, epochs, lr, weight_decay, seed

    @staticmethod
    def labels(quality: torch.Tensor, strong: int, weak: int) -> torch.Tensor:
        """``[N]`` class per query: 0 the strong member scored higher, 1 a tie, 2 the weak one scored higher."""
        s, w = quality[:, strong], quality[:, weak]
        return torch.where(s > w, 0, torch.where(s == w, 1, 2)).long()

    def fit(self, data: PoolData) -> ClassifierRouter:
        self._setup(data)
        y = self.labels(data.quality, self.strong, self.weak)
        x = data.features.float()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = nn.Sequential(nn.Linear(x.shape[1], self.hidden), nn.GELU(), nn.Linear(self.hidden, 3))
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.wd)
        for _ in range(self.epochs):  # full batch: routing splits are small
            loss = F.cross_entropy(self.net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.net.eval()
        self._calibrate(data)
        return self

    def win_rate(self, features: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        with torch.no_grad():
            probs = self.net(features.float()).softmax(-1).double()
        return 1.0 - probs[:, 1:].sum(-1)
