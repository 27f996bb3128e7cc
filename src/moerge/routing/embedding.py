"""Embedding routers: an embedding of each example (a sentence embedder, or the base model's hidden states)
compared with embeddings of each expert's data — DAM-style centroids, and Retrieval of Experts.

An embedder is anything with ``name: str`` and ``embed_texts(texts) -> Tensor [N, d]`` (`Embedder`); the name
keys cached centroids, so centroids computed with one embedder are never used with another.
`default_embedder` picks one by a recipe's ``embedding_model`` option."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from moerge.backbones.embedder import HiddenStateEmbedder
from moerge.backbones.embedder import SentenceEmbedder as Embedder
from moerge.routing.router import Router, prototype_scores
from moerge.routing.selection import SelectionConfig, one_hot, select

if TYPE_CHECKING:
    from moerge.routing.call import CallState

# What an embedding recipe's ``embedding_model`` option may name.
EmbedderChoice = Literal["default", "minilm", "base"]


def default_embedder(
    model: Any, tokenizer: Any = None, embedder: Embedder | None = None, choice: EmbedderChoice = "default"
) -> Embedder:
    """``embedder`` if given; else per ``choice``: ``"base"`` the base model's mean-pooled hidden states
    (`HiddenStateEmbedder`, which also embeds token ids directly), ``"minilm"`` all-MiniLM-L6-v2, and
    ``"default"`` MiniLM where installed (the ``embeddings`` extra), else the base model's hidden states."""
    if embedder is not None:
        return embedder
    from moerge.backbones import embedder as installed

    if choice == "base":
        return HiddenStateEmbedder(model, tokenizer)
    if choice == "minilm":
        return installed.MiniLMEmbedder()
    return installed.default_embedder(model, tokenizer)


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

    def experts_per_token(self, num_experts: int) -> float:
        return float(min(self.selection.k or num_experts, num_experts))


class RetrievalRouter(Router):
    """Retrieval of Experts: each input retrieves its nearest stored sample (cosine); each task (the examples of
    the call sharing a task name, or the whole call) uses the expert retrieved most often, alone (ties: the
    lower expert index). Votes are counted with tensor ops, on the embeddings' device."""

    granularity = "task"

    def __init__(self, embedder: Embedder, sample_embeddings: torch.Tensor, sample_experts: torch.Tensor):
        self.embedder = embedder
        self.samples = torch.nn.functional.normalize(sample_embeddings.float(), dim=-1)
        self.sample_experts = sample_experts.long()
        self.num_experts = int(self.sample_experts.max()) + 1 if len(self.sample_experts) else 0

    def begin_call(self, call: CallState) -> None:
        emb = torch.nn.functional.normalize(call.embed(self.embedder).float(), dim=-1)
        dev = emb.device
        nearest = self.sample_experts.to(dev)[(emb @ self.samples.to(dev).T).argmax(-1)]  # [B]
        groups = _group_ids(call.inputs.task_names, len(nearest)).to(dev)  # [B]
        G = int(groups.max()) + 1 if len(groups) else 0
        votes = torch.zeros(G, max(self.num_experts, call.num_experts), device=dev)
        votes.index_put_((groups, nearest), torch.ones_like(nearest, dtype=votes.dtype), accumulate=True)
        chosen = votes.argmax(-1)[groups]  # argmax takes the first maximum: ties go to the lower index
        call.plan["selection"] = one_hot(chosen, "example")
        call.plan["votes"] = nearest

    def experts_per_token(self, num_experts: int) -> float:
        return 1.0


def _group_ids(task_names: list[str] | None, n: int) -> torch.Tensor:
    """Index of each example's task among the call's distinct task names (all 0 without names)."""
    if task_names is None:
        return torch.zeros(n, dtype=torch.long)
    order = {t: i for i, t in enumerate(dict.fromkeys(task_names))}
    return torch.tensor([order[t] for t in task_names], dtype=torch.long)


def _average_by_task(scores: torch.Tensor, task_names: list[str] | None) -> torch.Tensor:
    if task_names is None:
        return scores.mean(0, keepdim=True).expand_as(scores)
    ids = _group_ids(task_names, len(task_names)).to(scores.device)
    onehot = torch.nn.functional.one_hot(ids, int(ids.max()) + 1).to(scores.dtype)  # [B, G]
    means = (onehot.T @ scores) / onehot.sum(0)[:, None]
    return means[ids]


__all__ = [
    "Embedder",
    "EmbedderChoice",
    "EmbeddingRouter",
    "HiddenStateEmbedder",
    "RetrievalRouter",
    "default_embedder",
]
