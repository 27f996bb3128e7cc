"""Embedding-based recipes: an embedding of each input compared with embeddings of each expert's data.

- ``embedding_centroids`` — DAM-style (Cheng et al. 2024, Dynamic Adapter Merging): cosine of the input's
  embedding to each expert's data centroid, softmax/T, merged per example;
- ``retrieval_of_experts`` — Jang et al. 2023 (ICML): each input retrieves its nearest stored sample of an
  expert's data; the expert retrieved most often serves the whole task alone.

The embedder is an option (``embedding_model``): MiniLM where installed, or the base model's hidden states;
the centroids are keyed by the embedder's name."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from moerge.recipes.recipe import BuildContext, Recipe, RecipeOptions, Routing, Signature, Taxonomy
from moerge.routing.embedding import EmbedderChoice, EmbeddingRouter, RetrievalRouter
from moerge.routing.selection import SelectionConfig
from moerge.transforms import centroids


class EmbedderOptions(RecipeOptions):
    # which sentence embedder: "default" = all-MiniLM-L6-v2 where installed, else the base model's hidden states
    embedding_model: EmbedderChoice = "default"


class CentroidOptions(EmbedderOptions):
    k: int | None = Field(default=None, ge=1)  # None: dense (DAM)
    temperature: float = Field(default=0.1, gt=0)
    granularity: Literal["example", "task"] = "example"
    aggregation: Literal["parameter", "output"] = "parameter"


def _config(o: EmbedderOptions, ctx: BuildContext) -> dict[str, Any]:
    return centroids.embed_config(ctx.embedder_for(o.embedding_model).name)


def _compute(ctx: BuildContext, o: EmbedderOptions, data: dict[str, list]) -> dict[str, dict]:
    texts = {name: [centroids.row_prompt(r) for r in rows] for name, rows in data.items()}
    return centroids.compute_embedding_centroids(
        ctx.embedder_for(o.embedding_model), texts, library=ctx.library
    )


EMBEDDING_CENTROIDS = Signature(
    kind=centroids.EMBED_KIND,
    what="embedding centroids of the experts' data",
    compute=_compute,
    max_rows=256,  # a sample of the expert's data suffices for a mean
    config=_config,
    how="moerge.transforms.centroids.compute_embedding_centroids(embedder, data, library=lib)",
)


def _minilm_variants() -> list[dict[str, Any]]:
    """Where MiniLM is the default embedder, also run on the base model's hidden states."""
    from moerge.backbones.embedder import minilm_available

    return [{"embedding_model": "base"}] if minilm_available() else []


def _build_centroids(ctx: BuildContext, o: CentroidOptions) -> Routing:
    rows = ctx.load(EMBEDDING_CENTROIDS, o)
    cents = torch.stack([r["centroid"].float() for r in rows])
    router = EmbeddingRouter(
        ctx.embedder_for(o.embedding_model),
        cents,
        SelectionConfig(k=o.k, temperature=o.temperature),
        o.granularity,
    )
    return Routing(router, o.aggregation)


def _build_retrieval(ctx: BuildContext, o: EmbedderOptions) -> Routing:
    rows = ctx.load(EMBEDDING_CENTROIDS, o)
    samples = torch.cat([r["samples"].float() for r in rows])
    owners = torch.cat([torch.full((len(r["samples"]),), i) for i, r in enumerate(rows)])
    return Routing(RetrievalRouter(ctx.embedder_for(o.embedding_model), samples, owners))


EMBEDDING_CENTROIDS_RECIPE = Recipe(
    name="embedding_centroids",
    summary="per example: cosine of the input embedding to each expert's data centroid, softmax/T; merge per example (DAM)",
    paper="Cheng et al. 2024, Dynamic Adapter Merging (DAM)",
    taxonomy=Taxonomy(
        training="custom",
        expert_data="private",
        routing_data="none",
        granularity="example",
        depth="model",
        selection="dense",
        aggregation="parameter",
        generalization="in-distribution",
        user_data="zero-shot",
    ),
    builder=_build_centroids,
    options=CentroidOptions,
    signatures=(EMBEDDING_CENTROIDS,),
    option_axes={"granularity": "granularity", "aggregation": "aggregation"},
    variants=_minilm_variants,
)

RETRIEVAL_OF_EXPERTS = Recipe(
    name="retrieval_of_experts",
    summary="per task: each input retrieves its nearest stored expert sample; the majority expert serves the task alone",
    paper="Jang et al. 2023, Retrieval of Experts (ICML)",
    taxonomy=Taxonomy(
        training="custom",
        expert_data="private",
        routing_data="none",
        granularity="task",
        depth="model",
        selection="sparse",
        aggregation="none",
        generalization="out-of-distribution",
        user_data="zero-shot",
    ),
    builder=_build_retrieval,
    options=EmbedderOptions,
    signatures=(EMBEDDING_CENTROIDS,),
    variants=_minilm_variants,
)

RECIPES = [EMBEDDING_CENTROIDS_RECIPE, RETRIEVAL_OF_EXPERTS]
