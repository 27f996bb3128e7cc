"""PHATGOOSE (Muqeeth, Liu, Liu, Raffel, ICML 2024, "Learning to Route Among Specialized Experts for Zero-Shot
Generalization"; code: r-three/phatgoose, ``src/models/addons/moe.py``): each contributor trains a sigmoid gate
vector per LoRA module on its own data (experts frozen, `moerge.train.gates`); the aggregator routes each token
and module by ⟨LN(x), LN(g_e)⟩/√d, softmax over all experts, top-2 renormalised."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from moerge.recipes.recipe import BuildContext, Recipe, RecipeOptions, Routing, Signature, Taxonomy
from moerge.routing.prototype import PrototypeRouter
from moerge.routing.selection import SelectionConfig
from moerge.transforms.centroids import stack_modules


class PhatgooseOptions(RecipeOptions):
    k: int = Field(default=2, ge=1)
    granularity: Literal["token", "example"] = "token"
    aggregation: Literal["output", "factor"] = "output"
    gate_steps: int = Field(
        default=100, ge=1, description="gate-training steps per expert (the authors': 100, train_gate.sh)"
    )


def _config(o: PhatgooseOptions, ctx: BuildContext) -> dict[str, Any]:
    from moerge.train.gates import gates_config

    return gates_config(o.gate_steps)


def _compute(ctx: BuildContext, o: PhatgooseOptions, data: dict[str, list]) -> dict[str, dict]:
    from moerge.train.gates import GateTrainConfig, train_phatgoose_gates

    by_name = {e.name: e for e in ctx.experts}
    out = {}
    for name, rows in data.items():
        out[name] = train_phatgoose_gates(
            ctx.model, ctx.tokenizer, by_name[name], rows, GateTrainConfig(steps=o.gate_steps),
            library=ctx.library, on_step=ctx.report_steps,
        )  # fmt: skip
    return out


PHATGOOSE_GATES = Signature(
    kind="phatgoose_gates",
    what="PHATGOOSE gate vectors",
    compute=_compute,
    config=_config,
    how="moerge.train.gates.train_phatgoose_gates(model, tokenizer, expert, rows, library=lib) per expert",
)


def _build(ctx: BuildContext, o: PhatgooseOptions) -> Routing:
    gates = stack_modules(ctx.load(PHATGOOSE_GATES, o), ctx.modules)
    return Routing(PrototypeRouter(gates, "std_dot", SelectionConfig(k=o.k), o.granularity), o.aggregation)


PHATGOOSE = Recipe(
    name="phatgoose",
    summary="per token and module: <LN(x), LN(gate_e)>/sqrt(d), softmax, top-2 renormalised; gates trained by contributors",
    paper="Muqeeth et al. 2024, Learning to Route Among Specialized Experts (ICML)",
    taxonomy=Taxonomy(
        training="custom",
        expert_data="private",
        routing_data="none",
        granularity="step",
        depth="module",
        selection="sparse",
        aggregation="output",
        generalization="out-of-distribution",
        user_data="zero-shot",
    ),
    builder=_build,
    options=PhatgooseOptions,
    signatures=(PHATGOOSE_GATES,),
    option_axes={"granularity": "granularity", "aggregation": "aggregation"},
    variants=lambda: [{"granularity": "example"}],
)

RECIPES = [PHATGOOSE]
