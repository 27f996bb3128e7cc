"""Mo'LoRA ("Llama-2, Mo' LoRA", maxine/crumb, blog post, July 2023): a library built by k-means clustering
one instruction dataset (k = 4 there) and training one LoRA per cluster (``moerge train --cluster K``, which
also stores each cluster's centroid — the mean embedding of its rows — as the expert's embedding centroid);
each input is then routed by the cosine similarity of its embedding to each cluster centroid, and the experts
are merged in weight space per example (dense, parameter aggregation).

How the similarities become weights is [U] in our card (the post gives none precisely): by default the cosines
with negatives set to 0, divided by their sum (``weighting="sum"``); ``weighting="softmax"`` with
``temperature`` is the DAM-style alternative."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from moerge.recipes.embedding import EMBEDDING_CENTROIDS, EmbedderOptions
from moerge.recipes.recipe import BuildContext, Recipe, Routing, Taxonomy
from moerge.routing.embedding import EmbeddingRouter
from moerge.routing.selection import SelectionConfig


class MoLoraOptions(EmbedderOptions):
    weighting: Literal["sum", "softmax"] = "sum"
    temperature: float = Field(default=0.1, gt=0)  # for weighting="softmax"


def _build(ctx: BuildContext, o: MoLoraOptions) -> Routing:
    cents = torch.stack([r["centroid"].float() for r in ctx.load(EMBEDDING_CENTROIDS, o)])
    router = EmbeddingRouter(
        ctx.embedder_for(o.embedding_model), cents, SelectionConfig(temperature=o.temperature),
        weighting=o.weighting,
    )  # fmt: skip
    return Routing(router, "parameter")


MOLORA = Recipe(
    name="molora",
    summary="per example: cosine of the input embedding to each cluster centroid of a k-means-built library "
    "(moerge train --cluster K), as weights of a per-example weight-space merge",
    paper="Mo'LoRA: 'Llama-2, Mo' LoRA' (maxine/crumb, blog, 2023)",
    taxonomy=Taxonomy(
        training="custom",
        expert_data="private",
        routing_data="none",
        granularity="example",
        depth="model",
        selection="dense",
        aggregation="parameter",
        generalization="out-of-distribution",
        user_data="zero-shot",
    ),
    builder=_build,
    options=MoLoraOptions,
    signatures=(EMBEDDING_CENTROIDS,),
)

RECIPES = [MOLORA]
