"""Routers: scores in, `Selection` out. One interface for every family:

- ``begin_call(call)`` runs once per call before the model (example/task-level routers compute their
  per-example weights here, e.g. from an embedding of the input);
- ``select(module, x, call)`` runs in every expert layer on that layer's input ``x`` and returns a
  `Selection` (or None: no expert for this call).

Routers know nothing of the benchmark, and the expert layer knows nothing of how decisions are made.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Literal

import torch

from moerge.errors import MoergeError, RecipeNotApplicableError
from moerge.routing.selection import Selection, SelectionConfig, one_hot, select

if TYPE_CHECKING:
    from moerge.model.attach import CallState
    from moerge.routing.embedding import Embedder

Score = Literal["abs_dot", "dot", "std_dot", "cos"]


def standardize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm without affine parameters over the last dimension."""
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)


def prototype_scores(x: torch.Tensor, prototypes: torch.Tensor, score: Score) -> torch.Tensor:
    """Scores ``[N, E]`` of inputs ``[N, d]`` against prototypes ``[E, d]``.

    ``abs_dot``: |⟨x, v⟩| (Arrow); ``dot``: ⟨x, v⟩; ``std_dot``: ⟨LN(x), LN(v)⟩/√d (PHATGOOSE, average
    activation); ``cos``: cosine similarity (centroid routers).
    """
    if score == "abs_dot":
        return (x @ prototypes.T).abs()
    if score == "dot":
        return x @ prototypes.T
    if score == "std_dot":
        return (standardize(x) @ standardize(prototypes).T) / (x.shape[-1] ** 0.5)
    if score == "cos":
        xn = torch.nn.functional.normalize(x, dim=-1)
        return xn @ torch.nn.functional.normalize(prototypes, dim=-1).T
    raise MoergeError(f"unknown score {score!r}; use one of abs_dot, dot, std_dot, cos")


class Router:
    """Base router. ``granularity`` is ``"token"``, ``"example"`` or ``"task"``."""

    granularity: str = "token"
    needs: tuple[str, ...] = ()  # RoutingInputs fields a call must carry, e.g. ("task_names",)

    def begin_call(self, call: CallState) -> None:
        for field in self.needs:
            if getattr(call.inputs, field) is None:
                raise MoergeError(
                    f"router {type(self).__name__} needs routing={{{field}: ...}} with every call: pass "
                    f"RoutingInputs({field}=[...]) (one per example)"
                )

    def select(self, module: str, x: torch.Tensor, call: CallState) -> Selection | None:
        return call.plan.get("selection")

    def routing_flops_per_token(self, dims: dict[str, tuple[int, int]]) -> float:
        """Multiply-adds ×2 spent deciding, per token (0 for routers that decide once per example)."""
        return 0.0


class FixedRouter(Router):
    """The same weights for every example: uniform over all experts, or one named expert."""

    granularity = "task"

    def __init__(self, weights: torch.Tensor):
        self.weights = weights.float()
        nz = (self.weights != 0).nonzero().flatten()
        self.sparse = len(nz) < len(self.weights)
        self.indices = nz

    def begin_call(self, call: CallState) -> None:
        B = call.batch_size
        if self.sparse:
            sel = Selection(self.weights[self.indices].expand(B, -1), self.indices.expand(B, -1), "example")
        else:
            sel = Selection(self.weights.expand(B, -1), None, "example")
        call.plan["selection"] = sel


class TaskNameRouter(Router):
    """Task-name oracle: each example goes to the expert(s) trained on its task (mixed batches allowed)."""

    granularity = "task"
    needs = ("task_names",)

    def __init__(self, task_to_expert: dict[str, int], fallback: Literal["error", "base"] = "error"):
        self.task_to_expert = dict(task_to_expert)
        self.fallback = fallback

    def begin_call(self, call: CallState) -> None:
        super().begin_call(call)
        idx = []
        for t in call.inputs.task_names:
            if t not in self.task_to_expert:
                if self.fallback == "error":
                    known = ", ".join(sorted(self.task_to_expert)) or "none"
                    raise MoergeError(
                        f"no expert for task {t!r} (known tasks: {known}); pass fallback='base'"
                    )
                idx.append(-1)
            else:
                idx.append(self.task_to_expert[t])
        call.plan["selection"] = one_hot(torch.tensor(idx, dtype=torch.long), "example")


class PrototypeRouter(Router):
    """Per-module prototypes ``[E, d_in]`` scored against each token's input to that module (Arrow, PHATGOOSE,
    average activation). ``granularity="example"`` averages each example's token scores (one decision per
    example and module, kept for the tokens generated after the prompt)."""

    def __init__(
        self,
        prototypes: dict[str, torch.Tensor],
        score: Score,
        selection: SelectionConfig,
        granularity: Literal["token", "example"] = "token",
    ):
        self.prototypes = {k: v.float() for k, v in prototypes.items()}
        self.score = score
        self.selection = selection
        self.granularity = granularity
        self._cache: dict[tuple, torch.Tensor] = {}

    def _protos(self, module: str, x: torch.Tensor) -> torch.Tensor:
        p = self.prototypes.get(module)
        if p is None:
            raise MoergeError(f"no routing prototypes for module {module}; recompute the recipe's signatures")
        if p.device != x.device or p.dtype != x.dtype:
            key = (module, x.device, x.dtype)
            if key not in self._cache:
                self._cache[key] = p.to(device=x.device, dtype=x.dtype)
            p = self._cache[key]
        return p

    def select(self, module: str, x: torch.Tensor, call: CallState) -> Selection | None:
        P = self._protos(module, x)
        if self.granularity == "token":
            return select(
                prototype_scores(x.reshape(-1, x.shape[-1]), P, self.score), self.selection, "token"
            )
        stored = call.plan.setdefault("per_module", {})
        if module in stored:  # decode steps after the prompt keep the prompt's decision
            return stored[module]
        x3 = x.reshape(call.batch_size, -1, x.shape[-1])
        s = prototype_scores(x3.reshape(-1, x.shape[-1]), P, self.score).view(x3.shape[0], x3.shape[1], -1)
        mask = call.token_mask(x3.shape[1], s.dtype)
        pooled = (s * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        stored[module] = select(pooled, self.selection, "example")
        return stored[module]

    def routing_flops_per_token(self, dims: dict[str, tuple[int, int]]) -> float:
        return float(sum(2 * p.shape[0] * p.shape[1] for p in self.prototypes.values()))


class EmbeddingRouter(Router):
    """Example embeddings scored against per-expert centroids (cosine); DAM-style per-example weights (dense
    softmax) or top-k. ``granularity="task"`` averages the weights over the examples of each task in the call."""

    def __init__(
        self,
        embedder: Embedder,
        centroids: torch.Tensor,
        selection: SelectionConfig,
        granularity: Literal["example", "task"] = "example",
    ):
        self.embedder = embedder
        self.centroids = centroids.float()
        self.selection = selection
        self.granularity = granularity

    def begin_call(self, call: CallState) -> None:
        emb = call.embed(self.embedder)
        scores = prototype_scores(emb.float(), self.centroids.to(emb.device), "cos")
        if self.granularity == "task":
            scores = _average_by_task(scores, call.inputs.task_names)
        call.plan["selection"] = select(scores, self.selection, "example")


class RetrievalRouter(Router):
    """Retrieval of Experts: each input retrieves its nearest stored sample (cosine); each task (the examples of
    the call sharing a task name, or the whole call) uses the expert retrieved most often, alone."""

    granularity = "task"

    def __init__(self, embedder: Embedder, sample_embeddings: torch.Tensor, sample_experts: torch.Tensor):
        self.embedder = embedder
        self.samples = torch.nn.functional.normalize(sample_embeddings.float(), dim=-1)
        self.sample_experts = sample_experts.long()

    def begin_call(self, call: CallState) -> None:
        emb = torch.nn.functional.normalize(call.embed(self.embedder).float(), dim=-1)
        nearest = self.sample_experts[(emb @ self.samples.to(emb.device).T).argmax(-1).cpu()]
        tasks = call.inputs.task_names or ["<call>"] * len(nearest)
        chosen = torch.empty_like(nearest)
        for task in set(tasks):  # per distinct task of the call, not per expert
            rows = [i for i, t in enumerate(tasks) if t == task]
            votes = Counter(nearest[rows].tolist())
            best = max(votes.items(), key=lambda kv: (kv[1], -kv[0]))[0]
            chosen[rows] = best
        call.plan["selection"] = one_hot(chosen, "example")
        call.plan["votes"] = nearest


def _average_by_task(scores: torch.Tensor, task_names: list[str] | None) -> torch.Tensor:
    if task_names is None:
        return scores.mean(0, keepdim=True).expand_as(scores)
    names = sorted(set(task_names))
    ids = torch.tensor([names.index(t) for t in task_names])
    onehot = torch.nn.functional.one_hot(ids, len(names)).to(scores.dtype)  # [B, T]
    means = (onehot.T @ scores) / onehot.sum(0)[:, None]
    return means[ids]


def require(condition: bool, message: str) -> None:
    if not condition:
        raise RecipeNotApplicableError(message)
