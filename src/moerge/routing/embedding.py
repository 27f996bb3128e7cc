"""Embedders for embedding-based routers: anything with ``name: str`` and
``embed_texts(texts: list[str]) -> Tensor [N, d]`` (a sentence embedder such as moerge.models.embedder's
MiniLM fits). The default is the base model's mean-pooled last hidden state (`BaseModelEmbedder`), which can
also embed token ids directly (``embed_ids``), so a routed call needs no raw text."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from moerge.errors import MoergeError


@runtime_checkable
class Embedder(Protocol):
    name: str

    def embed_texts(self, texts: list[str]) -> torch.Tensor: ...


class BaseModelEmbedder:
    """Mean-pooled hidden states of a transformers model (without experts): ``name = "base:mean"``.

    ``layer`` picks the hidden state (-1: the last). Called on a routed model's inner model, the experts are
    off, since only calls of the routed model are routed.
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, layer: int = -1, max_length: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer
        self.max_length = max_length
        self.name = "base:mean" if layer == -1 else f"base:mean:{layer}"

    @torch.no_grad()
    def embed_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        h = out.hidden_states[self.layer].float()
        m = attention_mask.to(h.dtype)[..., None]
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 16) -> torch.Tensor:
        if self.tokenizer is None:
            raise MoergeError(
                "the base-model embedder needs the model's tokenizer to embed texts; pass tokenizer="
            )
        chunks = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            chunks.append(self.embed_ids(enc["input_ids"], enc["attention_mask"]))
        return torch.cat(chunks)


def default_embedder(model: torch.nn.Module, tokenizer=None, embedder: Embedder | None = None) -> Embedder:
    return embedder if embedder is not None else BaseModelEmbedder(model, tokenizer)
