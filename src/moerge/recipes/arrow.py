"""Arrow (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs",
arXiv:2405.11157; code: microsoft/mttl, ``ArrowTransform`` and ``per_token_selector.py``): per token and module,
|⟨x, v_e⟩|/T against each expert's top right-singular vector v_e of ΔW_e = B_e A_e; top-k, softmax over the
top-k. The prototypes come from the weights alone (no data) and are cached in the library."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from moerge.recipes.recipe import BuildContext, Recipe, RecipeOptions, Routing, Signature, Taxonomy
from moerge.routing.prototype import PrototypeRouter
from moerge.routing.selection import SelectionConfig
from moerge.transforms import arrow as prototypes


class ArrowOptions(RecipeOptions):
    k: int = Field(default=4, ge=1)  # mttl's eval example uses 4; examples/create_arrow_model.py uses 2
    temperature: float = Field(default=1.0, gt=0)
    aggregation: Literal["output", "factor"] = "output"  # output: PEFT; factor: mttl's default parameter mix
    granularity: Literal["token", "example"] = "token"
    scale: bool = False  # multiply prototypes by their singular value (mttl scale=True)


def _compute(ctx: BuildContext, options: Any, data: dict[str, list]) -> dict[str, dict]:
    by_name = {e.name: e for e in ctx.experts}
    out = {}
    for name in data:
        tensors = prototypes.expert_prototypes(by_name[name])
        if ctx.library is not None and name in ctx.library:
            ctx.library.put_artifact(
                prototypes.ARROW_KIND, prototypes.ARROW_CONFIG, name, tensors, {"expert": name}
            )
        out[name] = tensors
    return out


ARROW_PROTOTYPES = Signature(
    kind=prototypes.ARROW_KIND,
    what="Arrow prototypes",
    compute=_compute,
    config=lambda options, ctx: prototypes.ARROW_CONFIG,
    needs_data=False,
)


def _build(ctx: BuildContext, o: ArrowOptions) -> Routing:
    protos = prototypes.stack_prototypes(ctx.load(ARROW_PROTOTYPES, o), ctx.modules, scale=o.scale)
    router = PrototypeRouter(
        protos, "abs_dot", SelectionConfig(k=o.k, temperature=o.temperature), o.granularity
    )
    return Routing(router, o.aggregation)


ARROW = Recipe(
    name="arrow",
    summary="per token and module: |<x, v_e>|/T against each expert's top right-singular vector; top-k softmax",
    paper="Ostapenko et al. 2024, arXiv:2405.11157",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="private",
        routing_data="none",
        granularity="step",
        depth="module",
        selection="sparse",
        aggregation="parameter",
        generalization="out-of-distribution",
        user_data="zero-shot",
    ),
    builder=_build,
    options=ArrowOptions,
    signatures=(ARROW_PROTOTYPES,),
    option_axes={"granularity": "granularity", "aggregation": "aggregation"},
    variants=lambda: [{"granularity": "example"}],
    needs_lora="its prototypes are the top right-singular vectors of each expert's LoRA product",
)

RECIPES = [ARROW]
