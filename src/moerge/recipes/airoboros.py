"""Airoboros LMoE's embedding router (jondurbin/airoboros, ``airoboros/lmoe/router.py``, read for this
recipe): per expert, up to 500 randomly sampled instructions are embedded (``thenlper/gte-small`` there; the
``embedding_model`` option here) into a faiss ``IndexFlatL2``; a request is embedded, each expert's index is
searched for its k = 50 nearest samples, and the request goes, alone, to the expert with the smallest mean
(squared L2, as faiss reports) distance. No aggregation: one expert per example."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from moerge.recipes.embedding import EmbedderOptions
from moerge.recipes.recipe import BuildContext, Recipe, Routing, Signature, Taxonomy
from moerge.routing.embedding import KNNDistanceRouter
from moerge.routing.index import Backend
from moerge.transforms.centroids import row_prompt

KIND = "instruction_bank"


class AiroborosOptions(EmbedderOptions):
    k: int = Field(default=50, ge=1)
    index: Backend = "auto"


def _config(o: AiroborosOptions, ctx: BuildContext) -> dict[str, Any]:
    return {"embedder": ctx.embedder_for(o.embedding_model).name, "version": 1}


def _compute(ctx: BuildContext, o: AiroborosOptions, data: dict[str, list]) -> dict[str, dict]:
    embedder = ctx.embedder_for(o.embedding_model)
    out = {}
    for name, rows in data.items():
        tensors = {"bank": embedder.embed_texts([row_prompt(r) for r in rows]).float().contiguous()}
        if ctx.library is not None:
            ctx.library.put_artifact(KIND, _config(o, ctx), name, tensors, {"num_texts": len(rows)})
        out[name] = tensors
    return out


INSTRUCTION_BANK = Signature(
    kind=KIND,
    what="a bank of embedded sample instructions per expert",
    compute=_compute,
    max_rows=500,
    config=_config,
    how="moerge.recipes.prepare_signatures('airoboros_knn', model, tokenizer, library, data)",
)


def _build(ctx: BuildContext, o: AiroborosOptions) -> Routing:
    banks = [r["bank"].float() for r in ctx.load(INSTRUCTION_BANK, o)]
    return Routing(KNNDistanceRouter(ctx.embedder_for(o.embedding_model), banks, o.k, o.index), "output")


AIROBOROS_KNN = Recipe(
    name="airoboros_knn",
    summary="per example: the expert whose k nearest sample instructions are closest on average (L2), alone",
    paper="Airoboros LMoE router (jondurbin/airoboros, airoboros/lmoe/router.py)",
    taxonomy=Taxonomy(
        training="multiple",
        expert_data="private",
        routing_data="none",
        granularity="example",
        depth="model",
        selection="sparse",
        aggregation="none",
        generalization="multiple",
        user_data="zero-shot",
    ),
    builder=_build,
    options=AiroborosOptions,
    signatures=(INSTRUCTION_BANK,),
)

RECIPES = [AIROBOROS_KNN]
