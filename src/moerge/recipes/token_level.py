"""Token-Level Adaptation of LoRA Adapters (Belofsky 2023, "Token-Level Adaptation of LoRA Adapters for
Downstream Task Generalization", arXiv:2311.10847; code jb-01/LoRA-TLE ``moe.py``, read for this recipe).

Each expert is represented by the mean all-MiniLM-L6-v2 embedding of its training data (moerge's embedding
centroids). While generating, the *whole current text* (prompt and the tokens generated so far) is embedded
again every ``every`` generated tokens (the paper found every other token best, the default here); its
cosine to each centroid, with the largest multiplied by ``temperature`` = 4, goes through a softmax; the
experts are combined with those weights in parameter space for the next tokens. The official code combines
them with PEFT's ``add_weighted_adapter(..., combination_type="linear")``, which scales both factors by √w
(ΔW = (Σ√w_i B_i)(Σ√w_i s_i A_i)): ``combination="linear"`` (default). ``combination="delta"`` is the exact
weighted sum Σ w_i ΔW_i.

Works through ``routed.generate(...)`` / `moerge.model.generation.complete`: the router follows each forward
pass of the generation (`Router.on_forward`). Outside generation (a scoring forward), the prompt's weights."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from moerge.recipes.embedding import EMBEDDING_CENTROIDS, EmbedderOptions
from moerge.recipes.recipe import BuildContext, Recipe, Routing, Taxonomy
from moerge.routing.embedding import PrefixRouter


class TokenLevelOptions(EmbedderOptions):
    every: int = Field(default=2, ge=1)
    temperature: float = Field(default=4.0, gt=0)
    combination: Literal["linear", "delta"] = "linear"


def _build(ctx: BuildContext, o: TokenLevelOptions) -> Routing:
    cents = torch.stack([r["centroid"].float() for r in ctx.load(EMBEDDING_CENTROIDS, o)])
    linear = o.combination == "linear"
    router = PrefixRouter(
        ctx.embedder_for(o.embedding_model), cents, o.every, o.temperature, sqrt_weights=linear
    )
    return Routing(router, "factor" if linear else "parameter")


TOKEN_LEVEL = Recipe(
    name="token_level_adaptation",
    summary="while generating: re-embed the whole prefix every n tokens; softmax over cosines to the experts' "
    "centroids (largest ×4); linear parameter mix for the next tokens",
    paper="Belofsky 2023, Token-Level Adaptation of LoRA Adapters, arXiv:2311.10847 (code jb-01/LoRA-TLE)",
    taxonomy=Taxonomy(
        training="custom",
        expert_data="private",
        routing_data="none",
        granularity="step",
        depth="model",
        selection="dense",
        aggregation="parameter",
        generalization="in-distribution",
        user_data="zero-shot",
    ),
    builder=_build,
    options=TokenLevelOptions,
    signatures=(EMBEDDING_CENTROIDS,),
)

RECIPES = [TOKEN_LEVEL]
