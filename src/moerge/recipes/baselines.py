"""Recipes that are baselines rather than methods: the base model alone, one named expert, the task-name
oracle, and the uniform mix of every expert."""

from __future__ import annotations

from typing import Literal

import torch

from moerge.errors import MoergeError
from moerge.recipes.recipe import BuildContext, Recipe, RecipeOptions, Routing, Taxonomy
from moerge.routing.fixed import FixedRouter, TaskNameRouter


def _taxonomy(**axes: str) -> Taxonomy:
    base = dict(training="standard", expert_data="private", routing_data="none", granularity="task",
                depth="model", selection="sparse", aggregation="none", generalization="multiple",
                user_data="zero-shot")  # fmt: skip
    return Taxonomy(**{**base, **axes})


BASE = Recipe(
    name="base",
    summary="the base model alone (no experts)",
    taxonomy=_taxonomy(granularity="n/a", depth="n/a", selection="none"),
    builder=None,
)


class SingleExpertOptions(RecipeOptions):
    expert: str


def _build_single(ctx: BuildContext, o: SingleExpertOptions) -> FixedRouter:
    names = ctx.names
    if o.expert not in names:
        raise MoergeError(f"expert {o.expert!r} is not among the attached experts ({', '.join(names)})")
    w = torch.zeros(len(names))
    w[names.index(o.expert)] = 1.0
    return FixedRouter(w)


SINGLE_EXPERT = Recipe(
    name="single_expert",
    summary="one named expert for every input",
    taxonomy=_taxonomy(),
    builder=_build_single,
    options=SingleExpertOptions,
)


class OracleOptions(RecipeOptions):
    fallback: Literal["error", "base"] = "error"


def _build_oracle(ctx: BuildContext, o: OracleOptions) -> TaskNameRouter:
    mapping: dict[str, int] = {}
    for i, e in enumerate(ctx.experts):
        for task in (e.metadata.task or e.name).split(","):
            mapping.setdefault(task.strip(), i)
        mapping.setdefault(e.name, i)
    return TaskNameRouter(mapping, o.fallback)


ORACLE = Recipe(
    name="oracle",
    summary="task-name oracle: each example goes to the expert of its task (RoutingInputs.task_names)",
    taxonomy=_taxonomy(generalization="in-distribution"),
    builder=_build_oracle,
    options=OracleOptions,
    held_in_only=True,
    needs_inputs=("task_names",),
)


class UniformOptions(RecipeOptions):
    aggregation: Literal["output", "parameter"] = "output"


def _build_uniform(ctx: BuildContext, o: UniformOptions) -> Routing:
    return Routing(FixedRouter(torch.full((len(ctx.experts),), 1.0 / len(ctx.experts))), o.aggregation)


UNIFORM = Recipe(
    name="uniform",
    summary="all experts with equal weights (the mu baseline; output or exact parameter mix)",
    taxonomy=_taxonomy(selection="dense", aggregation="multiple"),
    builder=_build_uniform,
    options=UniformOptions,
)

RECIPES = [BASE, SINGLE_EXPERT, ORACLE, UNIFORM]
