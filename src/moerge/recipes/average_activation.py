"""Average activation (the baseline of Muqeeth et al. 2024, PHATGOOSE, and of Ostapenko et al. 2024): each
expert's routing vector per module is the mean input to that module over the expert's data; tokens are routed
by the standardised dot product, top-k. Needs the experts' data (``expert_data = shared``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moerge.recipes.recipe import BuildContext, Recipe, RecipeOptions, Routing, Signature, Taxonomy
from moerge.routing.prototype import PrototypeRouter
from moerge.routing.selection import SelectionConfig
from moerge.transforms import centroids


class AverageActivationOptions(RecipeOptions):
    k: int = Field(default=2, ge=1)
    granularity: Literal["token", "example"] = "token"
    aggregation: Literal["output", "factor"] = "output"


def _compute(ctx: BuildContext, options: AverageActivationOptions, data: dict[str, list]) -> dict[str, dict]:
    texts = {name: [centroids.row_text(r) for r in rows] for name, rows in data.items()}
    return centroids.compute_hidden_centroids(
        ctx.model, ctx.tokenizer, texts, library=ctx.library, experts=ctx.experts
    )


HIDDEN_CENTROIDS = Signature(
    kind=centroids.HIDDEN_KIND,
    what="hidden-state centroids of the experts' data",
    compute=_compute,
    max_rows=256,  # a sample of the expert's data suffices for a mean
    config=lambda options, ctx: centroids.HIDDEN_CONFIG,
    how="moerge.transforms.centroids.compute_hidden_centroids(model, tokenizer, data, library=lib)",
)


def _build(ctx: BuildContext, o: AverageActivationOptions) -> Routing:
    cents = centroids.stack_modules(ctx.load(HIDDEN_CENTROIDS, o), ctx.modules)
    return Routing(PrototypeRouter(cents, "std_dot", SelectionConfig(k=o.k), o.granularity), o.aggregation)


AVERAGE_ACTIVATION = Recipe(
    name="average_activation",
    summary="per token and module: standardised dot product with the mean module input over each expert's data; top-k",
    paper="baseline in Muqeeth et al. 2024 (PHATGOOSE) and Ostapenko et al. 2024",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="shared",
        routing_data="none",
        granularity="step",
        depth="module",
        selection="sparse",
        aggregation="output",
        generalization="out-of-distribution",
        user_data="zero-shot",
    ),
    builder=_build,
    options=AverageActivationOptions,
    signatures=(HIDDEN_CENTROIDS,),
    option_axes={"granularity": "granularity", "aggregation": "aggregation"},
    variants=lambda: [{"granularity": "example"}],
)

RECIPES = [AVERAGE_ACTIVATION]
