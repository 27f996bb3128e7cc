"""Token-level collaboration of two whole models (``composes="models"``): Co-LLM and CALM.

Their taxonomy records come from the survey's table (reference/moerging-methods.md); their options are the
`moerge.compose` configurations, validated here like any recipe's. They build no router over a library's
experts: run them with `moerge.compose` (docs/collaboration.md)."""

from __future__ import annotations

from pydantic import Field

from moerge.compose.calm import CALMConfig, CALMTrainConfig
from moerge.compose.colm import CoLLMTrainConfig
from moerge.recipes.recipe import Recipe, Taxonomy


class CoLLMOptions(CoLLMTrainConfig):
    """The deferral head's training, and the decoding threshold on P(defer)."""

    threshold: float = Field(0.5, ge=0.0, le=1.0)


class CALMOptions(CALMConfig, CALMTrainConfig):
    """The composed layer pairs and heads, and the bridges' training."""


CO_LLM = Recipe(
    name="co_llm",
    summary="per token, a linear head on the base model's last hidden state defers the next token to an "
    "assistant model (marginal likelihood over the latent choice; threshold on P(defer) while decoding)",
    paper="Shen et al. 2024, Learning to Decode Collaboratively with Multiple Language Models, ACL 2024, "
    "arXiv:2403.03870 (code clinicalml/co-llm)",
    taxonomy=Taxonomy(
        training="custom",
        expert_data="private",
        routing_data="target",
        granularity="step",
        depth="model",
        selection="sparse",
        aggregation="none",
        generalization="in-distribution",
        user_data="full",
    ),
    builder=None,
    options=CoLLMOptions,
    composes="models",
    entry="moerge.compose.CoLLM + train_deferral + co_decode",
)

CALM_RECIPE = Recipe(
    name="calm",
    summary="trainable cross-attention from an anchor model's layers to an augmenting model's layers (both "
    "frozen), added residually; trained on a composition task",
    paper="Bansal et al. 2024, LLM Augmented LLMs: Expanding Capabilities through Composition, ICLR 2024, "
    "arXiv:2401.02412",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="multiple",
        routing_data="multiple",
        granularity="task",
        depth="n/a",
        selection="none",
        aggregation="output",
        generalization="multiple",
        user_data="full",
    ),
    builder=None,
    options=CALMOptions,
    composes="models",
    entry="moerge.compose.CALM + train_calm",
)

RECIPES = [CO_LLM, CALM_RECIPE]
