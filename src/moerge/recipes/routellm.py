"""RouteLLM's routers as pool recipes (Ong et al. 2024, "RouteLLM: Learning to Route LLMs with Preference
Data", arXiv:2406.18665; official code lm-sys/RouteLLM ``routellm/routers/``): similarity-weighted ranking,
matrix factorisation and an embedding classifier in the BERT router's role, each routing every query to the
strong or the weak member of a pool with a threshold calibrated to a share of strong calls. The routers and
what was followed are in `moerge.pool.routellm`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from moerge.pool.routellm import ClassifierRouter, MatrixFactorizationRouter, SWRankingRouter
from moerge.recipes.recipe import Recipe, RecipeOptions, Taxonomy

PAPER = "Ong et al. 2024, arXiv:2406.18665 (lm-sys/RouteLLM)"

# RouteLLM: standard training, private expert data, routing data from preferences (Arena + augmentation:
# multiple), per example, model-level, one model per query, no aggregation, zero-shot use.
TAXONOMY = Taxonomy(
    training="standard", expert_data="private", routing_data="multiple", granularity="example", depth="model",
    selection="sparse", aggregation="none", generalization="multiple", user_data="zero-shot",
)  # fmt: skip


class RouteLLMOptions(RecipeOptions):
    strong: str | None = Field(None, description="the strong member (default: the best on the routing split)")
    weak: str | None = Field(None, description="the weak member (default: the cheapest, then the best)")
    strong_share: float = Field(
        0.5, ge=0, le=1, description="share of strong calls the threshold is calibrated to"
    )
    policy: Literal["pair", "pool"] = Field(
        "pair", description="pair: RouteLLM's strong/weak threshold; pool: score every member (sw, mf only)"
    )


class MFOptions(RouteLLMOptions):
    dim: int = Field(128, ge=1)
    epochs: int = Field(100, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    alpha: float = Field(0.1, ge=0, description="noise on the prompt embedding while training")
    batch_size: int = Field(64, ge=1)
    seed: int = 42


class ClassifierOptions(RouteLLMOptions):
    hidden: int = Field(256, ge=1)
    epochs: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0


def _pair_kw(o: RouteLLMOptions) -> dict[str, Any]:
    return {"strong": o.strong, "weak": o.weak, "strong_share": o.strong_share, "policy": o.policy}


def _classifier(o: ClassifierOptions) -> ClassifierRouter:
    if o.policy != "pair":
        from moerge.errors import RecipeNotApplicableError

        raise RecipeNotApplicableError("routellm_bert classifies a strong/weak pair only: use policy=pair")
    return ClassifierRouter(hidden=o.hidden, epochs=o.epochs, lr=o.lr, seed=o.seed, **_pair_kw(o))


ROUTELLM_SW = Recipe(
    name="routellm_sw",
    summary="RouteLLM SW-ranking: Bradley–Terry ratings fitted per query on preference battles weighted by "
    "prompt similarity; strong iff its win rate ≥ a threshold calibrated to a share of strong calls",
    taxonomy=TAXONOMY, builder=None, options=RouteLLMOptions, paper=PAPER,
    query_router=lambda o: SWRankingRouter(**_pair_kw(o)),
    variants=lambda: [{"policy": "pool"}],
)  # fmt: skip

ROUTELLM_MF = Recipe(
    name="routellm_mf",
    summary="RouteLLM matrix factorisation: a bilinear score of member and query embedding trained on pairwise "
    "preferences; strong iff σ(δ_strong − δ_weak) ≥ a calibrated threshold",
    taxonomy=TAXONOMY, builder=None, options=MFOptions, paper=PAPER,
    query_router=lambda o: MatrixFactorizationRouter(
        dim=o.dim, epochs=o.epochs, lr=o.lr, weight_decay=o.weight_decay, alpha=o.alpha, batch_size=o.batch_size,
        seed=o.seed, **_pair_kw(o),
    ),
    variants=lambda: [{"policy": "pool"}],
)  # fmt: skip

ROUTELLM_BERT = Recipe(
    name="routellm_bert",
    summary="RouteLLM's BERT router's role: a 3-way (strong wins / tie / weak wins) classifier on the query's "
    "sentence embedding; strong iff 1 − P(tie or weak wins) ≥ a calibrated threshold",
    taxonomy=TAXONOMY, builder=None, options=ClassifierOptions, paper=PAPER, query_router=_classifier,
)  # fmt: skip

RECIPES = [ROUTELLM_SW, ROUTELLM_MF, ROUTELLM_BERT]
