"""Pool recipes: query routers that pick one whole model of a pool per query (`moerge.pool`). Each is a
`Recipe` with ``query_router`` (options → an unfitted `moerge.pool.query.QueryRouter`); the pool benchmark fits
it on the routing split and routes the evaluation queries. The methods, their papers and what was followed are
in the modules' docstrings: `moerge.pool.zooter`, `moerge.pool.routoo`, `moerge.pool.benchmark_knn`,
`moerge.pool.description`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moerge.pool.benchmark_knn import BenchmarkKNNRouter
from moerge.pool.description import DescriptionRouter
from moerge.pool.routoo import RoutooRouter
from moerge.pool.zooter import ZooterRouter
from moerge.recipes.recipe import Recipe, RecipeOptions, Taxonomy


class TrainedHeadOptions(RecipeOptions):
    hidden: int = Field(default=64, ge=0)  # 0: a linear layer on the query embedding
    steps: int = Field(default=300, ge=1)
    lr: float = Field(default=1e-2, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    seed: int = 0


class ZooterOptions(TrainedHeadOptions):
    hidden: int = Field(default=0, ge=0)  # a linear router on the frozen query embedding by default
    temperature: float = Field(default=0.1, gt=0)  # softmax temperature of the reward distribution
    tag_weight: float = Field(default=0.3, ge=0, le=1)  # tag-based label enhancement; 0 turns it off


class RoutooOptions(TrainedHeadOptions):
    budget: float | None = Field(
        default=None, gt=0
    )  # mean cost per query (the pool's cost units); None: no cap
    member_dim: int = Field(default=16, ge=1)


class BenchmarkKNNOptions(RecipeOptions):
    k: int = Field(default=5, ge=1)
    granularity: Literal["example", "task"] = "example"
    score: Literal["s1", "s2", "s3"] = "s3"  # the task-level score (granularity=task)
    correct_at: float = Field(default=0.5, ge=0, le=1)  # a graded quality at least this counts as correct


class DescriptionOptions(RecipeOptions):
    scorer: Literal["embedding", "likelihood"] = "embedding"
    embedding_model: str = "default"  # all-MiniLM-L6-v2, or a sentence-transformers folder / hub id
    llm: str | None = None  # scorer=likelihood: a causal LM (transformers folder, hub id or GGUF)


def _zooter(o: ZooterOptions) -> ZooterRouter:
    return ZooterRouter(temperature=o.temperature, tag_weight=o.tag_weight, hidden=o.hidden, steps=o.steps,
                        lr=o.lr, weight_decay=o.weight_decay, seed=o.seed)  # fmt: skip


def _routoo(o: RoutooOptions) -> RoutooRouter:
    return RoutooRouter(budget=o.budget, hidden=o.hidden, member_dim=o.member_dim, steps=o.steps, lr=o.lr,
                        weight_decay=o.weight_decay, seed=o.seed)  # fmt: skip


ZOOTER = Recipe(
    name="zooter",
    summary="per query: a small router distilled (KL) from the pool's tag-smoothed reward distribution; argmax member",
    paper="Lu et al. 2023, arXiv:2311.08692 (NAACL 2024)",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="private",
        routing_data="general",
        granularity="example",
        depth="model",
        selection="sparse",
        aggregation="none",
        generalization="out-of-distribution",
        user_data="zero-shot",
    ),  # fmt: skip
    builder=None,
    options=ZooterOptions,
    query_router=_zooter,
)

ROUTOO = Recipe(
    name="routoo",
    summary="per query: a per-member performance predictor, then the best predicted member under a mean cost budget",
    paper="Mohammadshahi et al. 2024, arXiv:2401.13979",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="private",
        routing_data="multiple",
        granularity="example",
        depth="model",
        selection="sparse",
        aggregation="none",
        generalization="out-of-distribution",
        user_data="few-shot",
    ),  # fmt: skip
    builder=None,
    options=RoutooOptions,
    query_router=_routoo,
)

BENCHMARK_KNN = Recipe(
    name="benchmark_knn",
    summary="kNN correctness predictor per member on benchmark inputs; per query (or per task: S1/S2/S3) the best",
    paper="Shnitzer et al. 2023, arXiv:2309.15789",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="private",
        routing_data="general",
        granularity="example",
        depth="model",
        selection="sparse",
        aggregation="none",
        generalization="out-of-distribution",
        user_data="zero-shot",
    ),  # fmt: skip
    builder=None,
    options=BenchmarkKNNOptions,
    option_axes={"granularity": "granularity"},
    query_router=lambda o: BenchmarkKNNRouter(
        k=o.k, granularity=o.granularity, score=o.score, correct_at=o.correct_at
    ),
)

DESCRIPTION_ROUTER = Recipe(
    name="description_router",
    summary="per query: the member whose description fits it best (embedding cosine, or an LLM's likelihood)",
    paper="Airoboros (jondurbin/airoboros) / LlamaIndex RouterQueryEngine (systems, no paper)",
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
    ),  # fmt: skip
    builder=None,
    options=DescriptionOptions,
    query_router=lambda o: DescriptionRouter(scorer=o.scorer, embedding_model=o.embedding_model, llm=o.llm),
)

RECIPES = [ZOOTER, ROUTOO, BENCHMARK_KNN, DESCRIPTION_ROUTER]
