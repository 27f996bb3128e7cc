"""Embedding routers: an embedding of each example (a sentence embedder, or the base model's hidden states)
compared with embeddings of each expert's data — DAM-style centroids, Retrieval of Experts, LoraRetriever's
per-example top-k (`TopKRetrievalRouter`), Airoboros's per-expert kNN distance (`KNNDistanceRouter`), and
Token-Level Adaptation's re-embedding of the growing prefix (`PrefixRouter`).

An embedder is anything with ``name: str`` and ``embed_texts(texts) -> Tensor [N, d]`` (`Embedder`); the name
keys cached centroids, so centroids computed with one embedder are never used with another.
`default_embedder` picks one by a recipe's ``embedding_model`` option."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from moerge.backbones.embedder import HiddenStateEmbedder
from moerge.backbones.embedder import SentenceEmbedder as Embedder
from moerge.errors import RoutingError
from moerge.routing.index import Backend, VectorIndex
from moerge.routing.router import Router, prototype_scores
from moerge.routing.selection import Selection, SelectionConfig, one_hot, select

if TYPE_CHECKING:
    from moerge.routing.call import CallState

# What an embedding recipe's ``embedding_model`` option may name: "default", "minilm", "base", or any
# sentence-transformers model by folder path or hub id.
EmbedderChoice = str


def default_embedder(
    model: Any, tokenizer: Any = None, embedder: Embedder | None = None, choice: EmbedderChoice = "default"
) -> Embedder:
    """``embedder`` if given; else per ``choice``: ``"base"`` the base model's mean-pooled hidden states
    (`HiddenStateEmbedder`, which also embeds token ids directly), ``"minilm"`` all-MiniLM-L6-v2, and
    ``"default"`` MiniLM where installed (the ``embeddings`` extra), else the base model's hidden states; any
    other value is a sentence-transformers model's folder or hub id (`SentenceTransformerEmbedder`)."""
    if embedder is not None:
        return embedder
    from moerge.backbones import embedder as installed

    if choice == "base":
        return HiddenStateEmbedder(model, tokenizer)
    if choice == "minilm":
        return installed.MiniLMEmbedder()
    if choice == "default":
        return installed.default_embedder(model, tokenizer)
    return installed.SentenceTransformerEmbedder(choice)


class EmbeddingRouter(Router):
    """Example embeddings scored against per-expert centroids (cosine); DAM-style per-example weights (dense
    softmax) or top-k. ``granularity="task"`` averages the weights over the examples of each task in the call.
    ``weighting="sum"`` (Mo'LoRA) uses the cosines themselves, negatives set to 0, divided by their sum."""

    def __init__(
        self,
        embedder: Embedder,
        centroids: torch.Tensor,
        selection: SelectionConfig,
        granularity: Literal["example", "task"] = "example",
        weighting: Literal["softmax", "sum"] = "softmax",
        backend: Backend = "auto",
    ):
        self.embedder = embedder
        self.centroids = centroids.float()
        self.selection = selection
        self.granularity = granularity
        self.weighting = weighting
        # per-example top-k: a nearest-neighbour search of the unit centroids (`VectorIndex`: one exact matmul,
        # or faiss on a large bank where installed), the same experts and cosines as scoring every centroid
        k = selection.k
        self.index = (
            VectorIndex(torch.nn.functional.normalize(self.centroids, dim=-1), "ip", backend)
            if granularity == "example" and weighting == "softmax" and k is not None and k < len(centroids)
            else None
        )

    def begin_call(self, call: CallState) -> None:
        emb = call.embed(self.embedder)
        if self.index is not None:
            assert self.selection.k is not None
            top, ids = self.index.search(torch.nn.functional.normalize(emb.float(), dim=-1), self.selection.k)
            top = top.to(emb.device) / self.selection.temperature
            w = torch.softmax(top, dim=-1) if self.selection.normalize == "softmax" else top
            call.plan["selection"] = Selection(w, ids.to(emb.device), "example")
            return
        scores = prototype_scores(emb.float(), self.centroids.to(emb.device), "cos")
        if self.granularity == "task":
            scores = _average_by_task(scores, call.inputs.task_names)
        if self.weighting == "sum":
            call.plan["selection"] = Selection(cosine_shares(scores), None, "example")
            return
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


def call_texts(call: CallState) -> list[str]:
    """The call's examples as text: ``inputs.texts``, else the token ids decoded with the model's tokenizer."""
    if call.inputs.texts is not None:
        return list(call.inputs.texts)
    if call.input_ids is not None and call.tokenizer is not None:
        ids: Any = call.input_ids
        if call.attention_mask is not None:
            ids = [row[mask.bool()] for row, mask in zip(ids, call.attention_mask, strict=True)]
        return list(call.tokenizer.batch_decode(ids, skip_special_tokens=True))
    raise RoutingError(
        "this router embeds the examples' texts: pass routing=RoutingInputs(texts=[...]), or "
        "attach(..., tokenizer=) so token ids can be decoded"
    )


class TopKRetrievalRouter(Router):
    """LoraRetriever: each example's embedding of ``instruction + text`` retrieves its ``k`` nearest experts
    (cosine against each expert's mean embedding of a few instruction-prefixed samples); the retrieved
    experts are averaged uniformly (1/k), so every example of a batch has its own expert set."""

    granularity = "example"

    def __init__(self, embedder: Embedder, expert_embeddings: torch.Tensor, k: int, instruction: str = "",
                 backend: Backend = "auto"):  # fmt: skip
        self.embedder = embedder
        self.index = VectorIndex(
            torch.nn.functional.normalize(expert_embeddings.float(), dim=-1), "ip", backend
        )
        self.k = min(k, len(expert_embeddings))
        self.instruction = instruction

    def begin_call(self, call: CallState) -> None:
        texts = [self.instruction + t for t in call_texts(call)]
        emb = torch.nn.functional.normalize(self.embedder.embed_texts(texts).float(), dim=-1)
        scores, ids = self.index.search(emb, self.k)
        call.plan["scores"] = scores
        call.plan["selection"] = Selection(torch.full(ids.shape, 1.0 / self.k), ids, "example")

    def experts_per_token(self, num_experts: int) -> float:
        return float(min(self.k, num_experts))


class KNNDistanceRouter(Router):
    """Airoboros LMoE: per expert an L2 index of sample-instruction embeddings; each example goes (alone,
    weight 1) to the expert whose ``k`` nearest samples are closest on average (squared L2, as faiss's
    ``IndexFlatL2`` reports; ties: the lower expert index)."""

    granularity = "example"

    def __init__(self, embedder: Embedder, banks: list[torch.Tensor], k: int = 50, backend: Backend = "auto"):
        self.embedder = embedder
        self.indexes = [VectorIndex(b.float(), "l2", backend) for b in banks]
        self.k = k

    def mean_distances(self, emb: torch.Tensor) -> torch.Tensor:
        """``[B, E]``: each example's mean squared L2 distance to its k nearest samples of each expert."""
        return torch.stack([ix.search(emb, self.k)[0].mean(-1) for ix in self.indexes], dim=-1)

    def begin_call(self, call: CallState) -> None:
        dist = self.mean_distances(call.embed(self.embedder).float())
        call.plan["distances"] = dist
        call.plan["selection"] = one_hot(dist.argmin(-1), "example")

    def experts_per_token(self, num_experts: int) -> float:
        return 1.0


def cosine_shares(cos: torch.Tensor) -> torch.Tensor:
    """Mo'LoRA's weights: each row's cosines with negatives set to 0, divided by their sum (uniform if all ≤ 0)."""
    w = cos.clamp(min=0)
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w / total.clamp(min=1e-12), torch.full_like(w, 1.0 / w.shape[-1]))


def boosted_softmax(cos: torch.Tensor, temperature: float) -> torch.Tensor:
    """Token-Level Adaptation's weights (jb-01/LoRA-TLE ``moe.py``): the largest cosine of each row multiplied by
    ``temperature``, then a softmax over all experts."""
    boost = torch.ones_like(cos).scatter_(-1, cos.argmax(-1, keepdim=True), temperature)
    return torch.softmax(cos * boost, dim=-1)


class PrefixRouter(Router):
    """Token-Level Adaptation: the weights come from the embedding of the whole current text (prompt plus what
    has been generated), recomputed every ``every`` generated tokens (`on_forward` sees each step's tokens).
    ``recompute = True``: the routed model generates without a KV cache (as the official code, which reruns
    the whole text for every token), so every token is computed with the current weights.

    ``sqrt_weights`` hands the expert layers √w (for PEFT's ``linear`` weighted adapter, which scales both
    factors by √w: ΔW = (Σ√w_i B_i)(Σ√w_i s_i A_i), run as moerge's ``factor`` aggregation)."""

    granularity = "example"
    follows_forwards = True
    recompute = True

    def __init__(self, embedder: Embedder, centroids: torch.Tensor, every: int = 2, temperature: float = 4.0,
                 sqrt_weights: bool = True):  # fmt: skip
        self.embedder = embedder
        self.centroids = centroids.float()
        self.every = every
        self.temperature = temperature
        self.sqrt_weights = sqrt_weights

    def weights(self, emb: torch.Tensor) -> torch.Tensor:
        return boosted_softmax(
            prototype_scores(emb.float(), self.centroids.to(emb.device), "cos"), self.temperature
        )

    def _decide(self, call: CallState, emb: torch.Tensor) -> None:
        w = self.weights(emb)
        call.plan.setdefault("history", []).append(w)
        call.plan["selection"] = Selection(w.sqrt() if self.sqrt_weights else w, None, "example")

    def begin_call(self, call: CallState) -> None:
        self._decide(call, call.embed(self.embedder))

    def on_forward(
        self, call: CallState, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> None:
        ids = call.plan.get("ids")
        if ids is None:  # the first pass: the prompt itself, already embedded in begin_call
            mask = (
                attention_mask
                if attention_mask is not None and attention_mask.shape == input_ids.shape
                else None
            )
            call.plan["ids"], call.plan["mask"] = (
                input_ids,
                (mask if mask is not None else torch.ones_like(input_ids)),
            )
            call.plan["prompt_width"], call.plan["since"] = input_ids.shape[1], 0
            return
        # without a KV cache each pass gets the whole sequence; with one, only the new tokens
        seen = ids.shape[1]
        width = input_ids.shape[1] if input_ids.shape[1] > seen else seen + input_ids.shape[1]
        new = width - seen
        if new <= 0:
            return
        fresh = input_ids[:, -new:].to(ids.device)
        call.plan["ids"] = torch.cat([ids, fresh], 1)
        call.plan["mask"] = torch.cat([call.plan["mask"], torch.ones_like(fresh)], 1)
        call.plan["since"] += new
        if call.plan["since"] >= self.every:
            call.plan["since"] = 0
            self._decide(call, self._embed_prefixes(call))

    def _embed_prefixes(self, call: CallState) -> torch.Tensor:
        """Embed each example's text so far (prompt and generated tokens, padding left out)."""
        ids, mask = call.plan["ids"].cpu(), call.plan["mask"].cpu()
        prefix = [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)]
        if call.inputs.texts is None and hasattr(self.embedder, "embed_ids"):
            width = max(len(r) for r in prefix)
            dense = torch.zeros(len(prefix), width, dtype=torch.long)
            dense_mask = torch.zeros(len(prefix), width, dtype=torch.long)
            for i, r in enumerate(prefix):
                dense[i, : len(r)], dense_mask[i, : len(r)] = torch.tensor(r), 1
            return self.embedder.embed_ids(dense, dense_mask)
        if call.tokenizer is None:
            raise RoutingError("Token-Level Adaptation re-embeds the generated text: attach(..., tokenizer=)")
        if call.inputs.texts is not None:  # the caller's prompt text, then the generated tokens decoded
            w0 = call.plan["prompt_width"]
            return self.embedder.embed_texts([t + call.tokenizer.decode(r[w0:].tolist(), skip_special_tokens=True)
                                              for t, r in zip(call.inputs.texts, ids, strict=True)])  # fmt: skip
        return self.embedder.embed_texts(call.tokenizer.batch_decode(prefix, skip_special_tokens=True))


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
    "KNNDistanceRouter",
    "PrefixRouter",
    "RetrievalRouter",
    "TopKRetrievalRouter",
    "boosted_softmax",
    "cosine_shares",
    "call_texts",
    "default_embedder",
]
