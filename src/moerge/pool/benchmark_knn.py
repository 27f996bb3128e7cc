"""Routing with benchmark datasets: kNN correctness predictors per member, task-level scores S1/S2/S3 and
per-instance routing.

Shnitzer, Ou, Silva, Soule, Sun, Solomon, Thompson, Yurochkin, "Large Language Model Routing with Benchmark
Datasets", arXiv:2309.15789, 2023. Taxonomy record (the survey's companion table omits it; the card's reading,
kept here): training standard, expert data private, routing data general, granularity task (per-instance
routing an option), depth model, selection sparse, aggregation none, generalization out-of-distribution, user
data zero-shot.

- **Correctness predictors.** For each member m, g_m(x) = the share of the k nearest benchmark inputs (L2 on
  the sentence embeddings) that m answered correctly (the paper's kNN classifier on sentence embeddings,
  trained on the members' per-sample correctness; here a routing split's quality, thresholded at
  ``correct_at`` for graded scores).
- **Per-instance routing** sends each query to argmax_m g_m(x) (``granularity="example"``).
- **Task-level selection** (``granularity="task"``: every call of `scores` is one new task d' with inputs
  x_1..x_n, and every query of it goes to the member with the best score):
  - S1(m) = (1/n) Σ_i g_m(x_i), the predicted accuracy;
  - S2(m) = (1/n) Σ_i [p̃_m ḡ_m(x_i) + (1 − p̃_m)(1 − ḡ_m(x_i))], ḡ = 1{g > 1/2}: the expected accuracy
    when m's predictor is right with probability p̃_m on the new task;
  - S3(m) = p̃_m S2(m) + (1 − p̃_m) ā_m, ā_m m's accuracy over all the benchmark data: the less the predictor
    can be trusted on the new task, the more the choice falls back to the best model on average.
  p̃_m is estimated as the paper proposes, from how far the new task lies from the benchmark data: leaving
  each benchmark dataset (tag) out in turn gives the predictor's accuracy on it, p_d(m), and its distance
  φ_d (the mean distance of its inputs to their k nearest neighbours in the other datasets); the whole split,
  each input left out of its own neighbours, adds the in-distribution point; a per-member least-squares line
  p ≈ a_m + b_m φ through these points, evaluated at the new task's φ and clipped to [0, 1], is p̃_m.

[U] The paper's text was not readable in this build (the card has a secondary summary). S1 and the form of S2
follow the summary and our reading of the paper; the regression of p̃ on the dataset distance (a line here)
and S3's fallback to the average accuracy are this implementation's reading, not checked against the paper.
k defaults to 5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from moerge.pool.query import PoolData, QueryRouter


def knn_indices(query: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``bank`` to each row of ``query`` (L2): distances and indices ``[n, k]``."""
    d = torch.cdist(query.double(), bank.double())
    k = min(k, bank.shape[0])
    dist, idx = d.topk(k, dim=1, largest=False)
    return dist, idx


def knn_correctness(query: torch.Tensor, bank: torch.Tensor, correct: torch.Tensor, k: int) -> torch.Tensor:
    """g_m(x) for every query row and member: the mean of ``correct [B, M]`` over its k nearest bank rows."""
    _, idx = knn_indices(query, bank, k)
    return correct.double()[idx].mean(dim=1).float()


class BenchmarkKNNRouter(QueryRouter):
    """kNN correctness predictors; per-instance scores g_m(x), or the task-level S1/S2/S3 of the batch."""

    def __init__(
        self,
        *,
        k: int = 5,
        granularity: Literal["example", "task"] = "example",
        score: Literal["s1", "s2", "s3"] = "s3",
        correct_at: float = 0.5,
    ):
        self.k, self.granularity, self.score, self.correct_at = k, granularity, score, correct_at
        self.bank: torch.Tensor | None = None
        self.correct: torch.Tensor | None = None
        self.average: torch.Tensor | None = None
        self.line: torch.Tensor | None = None  # [M, 2]: p̃ = a + b φ
        self.held_out: list[dict[str, Any]] = []

    def fit(self, data: PoolData) -> BenchmarkKNNRouter:
        self.members = list(data.members)
        self.bank = data.features.double()
        self.correct = (data.quality >= self.correct_at).double()
        self.average = self.correct.mean(0)
        self.line = self._fit_reliability(data.tags)
        return self

    def _fit_reliability(self, tags: Sequence[str] | None) -> torch.Tensor:
        """The per-member line p ≈ a + b φ from leaving each benchmark dataset out in turn."""
        assert self.bank is not None and self.correct is not None
        m = self.correct.shape[1]
        names = sorted(set(tags)) if tags is not None else []
        phis, accs = [], []
        for name in names:
            out = torch.tensor([t == name for t in tags])  # type: ignore[union-attr]
            if bool(out.all()) or int((~out).sum()) == 0:
                continue
            dist, idx = knn_indices(self.bank[out], self.bank[~out], self.k)
            g = self.correct[~out][idx].mean(dim=1)
            acc = ((g > 0.5).double() == self.correct[out]).double().mean(0)
            phis.append(float(dist.mean()))
            accs.append(acc)
            self.held_out.append({"task": name, "distance": phis[-1], "accuracy": acc.tolist()})
        # the split itself, each input left out of its own neighbours, anchors the in-distribution end
        dist, idx = knn_indices(self.bank, self.bank, self.k + 1)
        g = self.correct[idx[:, 1:]].mean(dim=1)
        phis.append(float(dist[:, 1:].mean()))
        accs.append(((g > 0.5).double() == self.correct).double().mean(0))
        if len(phis) >= 2 and max(phis) - min(phis) > 1e-12:
            x = torch.tensor(phis, dtype=torch.float64)
            design = torch.stack([torch.ones_like(x), x], dim=1)  # [D, 2]
            coef = torch.linalg.lstsq(design, torch.stack(accs)).solution  # [2, M]
            return coef.T.contiguous()
        return torch.stack([accs[-1], torch.zeros(m, dtype=torch.float64)], dim=1)

    def correctness(self, features: torch.Tensor) -> torch.Tensor:
        """g_m(x) ``[N, M]``."""
        if self.bank is None or self.correct is None:
            raise RuntimeError("BenchmarkKNNRouter used before fit")
        return knn_correctness(features, self.bank, self.correct, self.k)

    def reliability(self, features: torch.Tensor) -> torch.Tensor:
        """p̃_m ``[M]``: each member's predictor accuracy estimated for the task ``features`` form."""
        assert self.bank is not None and self.line is not None
        dist, _ = knn_indices(features, self.bank, self.k)
        phi = float(dist.mean())
        return (self.line[:, 0] + self.line[:, 1] * phi).clamp(0.0, 1.0)

    def task_scores(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """S1, S2, S3 ``[M]`` for the new task whose inputs are ``features``."""
        assert self.average is not None
        g = self.correctness(features).double()
        hard = (g > 0.5).double()
        p = self.reliability(features)
        s1 = g.mean(0)
        s2 = (p * hard + (1 - p) * (1 - hard)).mean(0)
        s3 = p * s2 + (1 - p) * self.average
        return {"s1": s1.float(), "s2": s2.float(), "s3": s3.float()}

    def scores(self, features: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        if self.granularity == "example":
            return self.correctness(features)
        row = self.task_scores(features)[self.score]
        return row.unsqueeze(0).expand(features.shape[0], -1).clone()

    @property
    def info(self) -> dict[str, Any]:
        return {"k": self.k, "held_out": self.held_out}
