"""Embedders for embedding-based routers: anything with ``name: str`` and
``embed_texts(texts: list[str]) -> Tensor [N, d]`` (`Embedder`). The default (`default_embedder`) is
all-MiniLM-L6-v2 where installed, else the base model's mean-pooled hidden states; both live in
`moerge.models.embedder`. The name keys cached centroids, so centroids computed with one embedder are never
used with another."""

from __future__ import annotations

from typing import Any

from moerge.models.embedder import HiddenStateEmbedder
from moerge.models.embedder import SentenceEmbedder as Embedder


def default_embedder(model: Any, tokenizer: Any = None, embedder: Embedder | None = None) -> Embedder:
    """``embedder`` if given; else all-MiniLM-L6-v2 where installed (the ``embeddings`` extra), else the base
    model's mean-pooled hidden states (`HiddenStateEmbedder`, which also embeds token ids directly)."""
    if embedder is not None:
        return embedder
    from moerge.models.embedder import default_embedder as installed_default

    return installed_default(model, tokenizer)


__all__ = ["Embedder", "HiddenStateEmbedder", "default_embedder"]
