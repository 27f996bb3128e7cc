"""Embedders for embedding-based routers: anything with ``name: str`` and
``embed_texts(texts: list[str]) -> Tensor [N, d]`` (`Embedder`). The default (`default_embedder`) is
all-MiniLM-L6-v2 where installed, else the base model's mean-pooled hidden states; both live in
`moerge.models.embedder`. The name keys cached centroids, so centroids computed with one embedder are never
used with another."""

from __future__ import annotations

from typing import Any, Literal

from moerge.models.embedder import HiddenStateEmbedder
from moerge.models.embedder import SentenceEmbedder as Embedder

# What an embedding recipe's ``embedder`` option may name.
EmbedderChoice = Literal["default", "minilm", "base"]


def default_embedder(
    model: Any, tokenizer: Any = None, embedder: Embedder | None = None, choice: EmbedderChoice = "default"
) -> Embedder:
    """``embedder`` if given; else per ``choice``: ``"base"`` the base model's mean-pooled hidden states
    (`HiddenStateEmbedder`, which also embeds token ids directly), ``"minilm"`` all-MiniLM-L6-v2, and
    ``"default"`` MiniLM where installed (the ``embeddings`` extra), else the base model's hidden states."""
    if embedder is not None:
        return embedder
    from moerge.models import embedder as installed

    if choice == "base":
        return HiddenStateEmbedder(model, tokenizer)
    if choice == "minilm":
        return installed.MiniLMEmbedder()
    return installed.default_embedder(model, tokenizer)


__all__ = ["Embedder", "EmbedderChoice", "HiddenStateEmbedder", "default_embedder"]
