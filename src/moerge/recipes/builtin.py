"""The built-in recipes: one small block per method (taxonomy record from the survey table, options, parts)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from moerge.errors import MoergeError
from moerge.recipes.base import BuildContext, Recipe, Requirement, Taxonomy, register_recipe
from moerge.routing.embedding import EmbedderChoice
from moerge.routing.routers import (
    EmbeddingRouter,
    FixedRouter,
    PrototypeRouter,
    RetrievalRouter,
    TaskNameRouter,
)
from moerge.routing.selection import SelectionConfig


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _names(ctx: BuildContext) -> list[str]:
    return [e.name for e in ctx.experts]


def _embedder(ctx: BuildContext):
    from moerge.routing.embedding import default_embedder

    return default_embedder(ctx.model, ctx.tokenizer, ctx.embedder)


# ---------------------------------------------------------------------------------------------- Arrow
class ArrowOptions(_Options):
    k: int = Field(default=4, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    aggregation: Literal["output", "factor"] = "output"  # output: PEFT; factor: mttl's default param-mix
    granularity: Literal["token", "example"] = "token"
    scale: bool = False  # multiply prototypes by their singular value (mttl scale=True)


def _build_arrow(ctx: BuildContext, o: ArrowOptions) -> PrototypeRouter:
    from moerge.transforms.arrow import arrow_prototypes

    protos = arrow_prototypes(ctx.experts, ctx.modules, ctx.library, scale=o.scale)
    return PrototypeRouter(
        protos, "abs_dot", SelectionConfig(k=o.k, temperature=o.temperature), o.granularity
    )


ARROW = register_recipe(
    Recipe(
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
        builder=_build_arrow,
        options=ArrowOptions,
    )
)


# ---------------------------------------------------------------------------------------------- PHATGOOSE
class PhatgooseOptions(_Options):
    k: int = Field(default=2, ge=1)
    granularity: Literal["token", "example"] = "token"
    aggregation: Literal["output", "factor"] = "output"


def _build_phatgoose(ctx: BuildContext, o: PhatgooseOptions) -> PrototypeRouter:
    from moerge.transforms.centroids import load_per_expert, stack_modules
    from moerge.transforms.phatgoose import GATES_CONFIG, GATES_KIND

    gates = stack_modules(load_per_expert(ctx.library, GATES_KIND, GATES_CONFIG, _names(ctx)), ctx.modules)
    return PrototypeRouter(gates, "std_dot", SelectionConfig(k=o.k), o.granularity)


def _gates_config(_o, _e):
    from moerge.transforms.phatgoose import GATES_CONFIG

    return GATES_CONFIG


PHATGOOSE = register_recipe(
    Recipe(
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
        builder=_build_phatgoose,
        options=PhatgooseOptions,
        requires=(
            Requirement(
                "phatgoose_gates",
                _gates_config,
                "PHATGOOSE gate vectors",
                "moerge.transforms.phatgoose.train_phatgoose_gates(model, tokenizer, expert, texts, library=lib)",
            ),
        ),
    )
)


# ---------------------------------------------------------------------------------------------- average activation
class AverageActivationOptions(_Options):
    k: int = Field(default=2, ge=1)
    granularity: Literal["token", "example"] = "token"
    aggregation: Literal["output", "factor"] = "output"


def _hidden_config(_o, _e):
    from moerge.transforms.centroids import HIDDEN_CONFIG

    return HIDDEN_CONFIG


def _build_avg_act(ctx: BuildContext, o: AverageActivationOptions) -> PrototypeRouter:
    from moerge.transforms.centroids import HIDDEN_CONFIG, HIDDEN_KIND, load_per_expert, stack_modules

    cents = stack_modules(load_per_expert(ctx.library, HIDDEN_KIND, HIDDEN_CONFIG, _names(ctx)), ctx.modules)
    return PrototypeRouter(cents, "std_dot", SelectionConfig(k=o.k), o.granularity)


AVERAGE_ACTIVATION = register_recipe(
    Recipe(
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
        builder=_build_avg_act,
        options=AverageActivationOptions,
        requires=(
            Requirement(
                "hidden_centroids",
                _hidden_config,
                "hidden-state centroids of the experts' data",
                "moerge.transforms.centroids.compute_hidden_centroids(model, tokenizer, data, library=lib)",
            ),
        ),
    )
)


# ---------------------------------------------------------------------------------------------- embedding centroids
def _embed_config(_o, embedder_name):
    from moerge.transforms.centroids import embed_config

    return embed_config(embedder_name)


_EMBED_REQ = Requirement(
    "embedding_centroids",
    _embed_config,
    "embedding centroids of the experts' data",
    "moerge.transforms.centroids.compute_embedding_centroids(embedder, data, library=lib)",
)


class EmbedderOptions(_Options):
    # which sentence embedder: "default" = all-MiniLM-L6-v2 where installed, else the base model's hidden states
    embedding_model: EmbedderChoice = "default"


class CentroidOptions(EmbedderOptions):
    k: int | None = Field(default=None, ge=1)  # None: dense (DAM)
    temperature: float = Field(default=0.1, gt=0)
    granularity: Literal["example", "task"] = "example"
    aggregation: Literal["parameter", "output"] = "parameter"


def _build_centroids(ctx: BuildContext, o: CentroidOptions) -> EmbeddingRouter:
    from moerge.transforms.centroids import EMBED_KIND, embed_config, load_per_expert

    emb = _embedder(ctx)
    rows = load_per_expert(ctx.library, EMBED_KIND, embed_config(emb.name), _names(ctx))
    cents = torch.stack([r["centroid"].float() for r in rows])
    return EmbeddingRouter(emb, cents, SelectionConfig(k=o.k, temperature=o.temperature), o.granularity)


DAM = register_recipe(
    Recipe(
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
        requires=(_EMBED_REQ,),
    )
)


def _build_retrieval(ctx: BuildContext, o: EmbedderOptions) -> RetrievalRouter:
    from moerge.transforms.centroids import EMBED_KIND, embed_config, load_per_expert

    emb = _embedder(ctx)
    rows = load_per_expert(ctx.library, EMBED_KIND, embed_config(emb.name), _names(ctx))
    samples = torch.cat([r["samples"].float() for r in rows])
    owners = torch.cat([torch.full((len(r["samples"]),), i) for i, r in enumerate(rows)])
    return RetrievalRouter(emb, samples, owners)


RETRIEVAL = register_recipe(
    Recipe(
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
        requires=(_EMBED_REQ,),
    )
)


# ---------------------------------------------------------------------------------------------- baselines
BASE = register_recipe(
    Recipe(
        name="base",
        summary="the base model alone (no experts)",
        taxonomy=Taxonomy(
            training="standard",
            expert_data="private",
            routing_data="none",
            granularity="n/a",
            depth="n/a",
            selection="none",
            aggregation="none",
            generalization="multiple",
            user_data="zero-shot",
        ),
        builder=None,
    )
)


class SingleExpertOptions(_Options):
    expert: str


def _build_single(ctx: BuildContext, o: SingleExpertOptions) -> FixedRouter:
    names = _names(ctx)
    if o.expert not in names:
        raise MoergeError(f"expert {o.expert!r} is not among the attached experts ({', '.join(names)})")
    w = torch.zeros(len(names))
    w[names.index(o.expert)] = 1.0
    return FixedRouter(w)


SINGLE = register_recipe(
    Recipe(
        name="single_expert",
        summary="one named expert for every input",
        taxonomy=Taxonomy(
            training="standard",
            expert_data="private",
            routing_data="none",
            granularity="task",
            depth="model",
            selection="sparse",
            aggregation="none",
            generalization="multiple",
            user_data="zero-shot",
        ),
        builder=_build_single,
        options=SingleExpertOptions,
    )
)


class OracleOptions(_Options):
    fallback: Literal["error", "base"] = "error"


def _build_oracle(ctx: BuildContext, o: OracleOptions) -> TaskNameRouter:
    mapping: dict[str, int] = {}
    for i, e in enumerate(ctx.experts):
        for task in (e.metadata.task or e.name).split(","):
            mapping.setdefault(task.strip(), i)
        mapping.setdefault(e.name, i)
    return TaskNameRouter(mapping, o.fallback)


ORACLE = register_recipe(
    Recipe(
        name="oracle",
        summary="task-name oracle: each example goes to the expert of its task (RoutingInputs.task_names)",
        taxonomy=Taxonomy(
            training="standard",
            expert_data="private",
            routing_data="none",
            granularity="task",
            depth="model",
            selection="sparse",
            aggregation="none",
            generalization="in-distribution",
            user_data="zero-shot",
        ),
        builder=_build_oracle,
        options=OracleOptions,
        held_in_only=True,
        needs_inputs=("task_names",),
    )
)


class UniformOptions(_Options):
    aggregation: Literal["output", "parameter"] = "output"


UNIFORM = register_recipe(
    Recipe(
        name="uniform",
        summary="all experts with equal weights (the mu baseline; output or exact parameter mix)",
        taxonomy=Taxonomy(
            training="standard",
            expert_data="private",
            routing_data="none",
            granularity="task",
            depth="model",
            selection="dense",
            aggregation="multiple",
            generalization="multiple",
            user_data="zero-shot",
        ),
        builder=lambda ctx, o: FixedRouter(torch.full((len(ctx.experts),), 1.0 / len(ctx.experts))),
        options=UniformOptions,
    )
)
