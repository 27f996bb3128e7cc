"""AdapterSoup (Chronopoulou, Peters, Fraser, Dodge, EACL Findings 2023, "AdapterSoup: Weight Averaging to
Improve Generalization of Pretrained Language Models", arXiv:2302.07027).

For a new task, a handful of its unlabelled texts (`TargetData.texts`) choose k experts, whose weights are
then averaged uniformly (one ΔW = (1/k) Σ B_i A_i for every input: no routing at inference). Two selections,
as in the paper (details [U] in our card; the paper's own description followed where we could read it):

- ``selection="similarity"``: the k experts whose data centroid (mean sentence embedding of their training
  inputs) has the highest mean cosine to the target texts' embeddings;
- ``selection="clustering"`` (the paper's best): k-means over the experts' sample embeddings
  (``clusters`` clusters, default one per expert); the target texts fall into clusters; each expert scores
  the share of its samples lying in the target's clusters (weighted by how many target texts each holds),
  and the k best with a non-zero share are averaged (fewer when fewer share a cluster with the target).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from moerge.recipes.embedding import EMBEDDING_CENTROIDS, EmbedderOptions
from moerge.recipes.recipe import BuildContext, Recipe, Routing, Taxonomy
from moerge.routing.fixed import FixedRouter
from moerge.transforms.kmeans import kmeans


class AdapterSoupOptions(EmbedderOptions):
    k: int = Field(default=3, ge=1)
    selection: Literal["similarity", "clustering"] = "clustering"
    clusters: int | None = Field(default=None, ge=1)  # None: one per expert
    seed: int = 0


def soup_scores(
    target: torch.Tensor, centroids: torch.Tensor, samples: list[torch.Tensor], o: AdapterSoupOptions
) -> torch.Tensor:
    """Each expert's score ``[E]`` for the target texts' embeddings ``[N, d]`` (higher is better)."""
    norm = torch.nn.functional.normalize
    if o.selection == "similarity":
        return (norm(target, dim=-1) @ norm(centroids, dim=-1).T).mean(0)
    bank = torch.cat(samples)
    owner = torch.cat([torch.full((len(s),), e) for e, s in enumerate(samples)])
    C = min(o.clusters or len(samples), len(bank))
    fit = kmeans(bank, C, seed=o.seed)
    target_share = torch.bincount(torch.cdist(target.double(), fit.centroids.double()).argmin(1), minlength=C)
    target_share = target_share.double() / len(target)  # [C]
    per_expert = torch.zeros(len(samples), C, dtype=torch.float64)
    per_expert.index_put_((owner, fit.labels), torch.ones(len(bank), dtype=torch.float64), accumulate=True)
    per_expert /= per_expert.sum(1, keepdim=True)  # each expert's share of its samples per cluster
    return (per_expert @ target_share).float()


def _build(ctx: BuildContext, o: AdapterSoupOptions) -> Routing:
    target = ctx.require_target()
    rows = ctx.load(EMBEDDING_CENTROIDS, o)
    emb = ctx.embedder_for(o.embedding_model).embed_texts(target.texts).float()
    scores = soup_scores(emb, torch.stack([r["centroid"].float() for r in rows]),
                         [r["samples"].float() for r in rows], o)  # fmt: skip
    order = torch.sort(scores, descending=True, stable=True).indices[: min(o.k, len(rows))]
    if o.selection == "clustering":
        order = order[scores[order] > 0] if (scores[order] > 0).any() else order[:1]
    w = torch.zeros(len(rows))
    w[order] = 1.0 / len(order)
    ctx.describe(f"AdapterSoup for {target.task}: {', '.join(ctx.names[i] for i in order.tolist())}")
    return Routing(FixedRouter(w), "parameter")


ADAPTER_SOUP = Recipe(
    name="adapter_soup",
    summary="per task: k experts chosen from a few unlabelled target texts (embedding similarity or clustering), "
    "uniformly weight-averaged",
    paper="Chronopoulou et al. 2023, AdapterSoup (EACL Findings), arXiv:2302.07027",
    taxonomy=Taxonomy(
        training="custom",
        expert_data="private",
        routing_data="none",
        granularity="task",
        depth="model",
        selection="sparse",
        aggregation="parameter",
        generalization="out-of-distribution",
        user_data="few-shot",
    ),
    builder=_build,
    options=AdapterSoupOptions,
    signatures=(EMBEDDING_CENTROIDS,),
    variants=lambda: [{"selection": "similarity"}],
)

RECIPES = [ADAPTER_SOUP]
