"""What the Weight?! (Holtermann, Frohmann, Rekabsaz, Lauscher, EACL Findings 2024, "What the Weight?! A
Unified Framework for Zero-Shot Knowledge Composition", arXiv:2401.12756): one recipe whose options span the
paper's grid — a *scoring* method × a *combination* method.

Scoring (per example, each expert's score, then the top-k, weighted by their normalised scores):

- ``uniform``: every expert alike;
- ``sentsim``: cosine of the input's sentence embedding to each expert's data centroid (negatives as 0);
- ``tfidf``: cosine of TF-IDF vectors of the input and of the expert's document (a sample of up to 100 of its
  data rows joined, as the official code), the idf fitted on that pair (`moerge.transforms.tfidf`; English
  stop words removed, ``tfidf_stop_words=none`` keeps them; no stemming);
- ``prior``: the posterior over experts given the input, p(e | x) ∝ p_e(x) (a uniform prior; p_e(x) is the
  likelihood of the input's tokens under the base model with expert e alone, as BTM's domain posterior);
- ``entropy``: softmax over minus each expert's mean next-token entropy on the input (a confident expert
  weighs more; how the paper turns entropies into weights is [U] in our card).

``topk_uniform`` weighs the selected top-k alike (the paper's "-topk-uniform" runs) instead of by score.

Combination: ``parameter`` (a per-example weighted average of the selected experts' ΔW), ``output`` (the
weighted average of their outputs, per adapted module — moerge's output aggregation; the paper ensembles the
models' predictive distributions, which needs one forward per expert: a deviation, stated here), or ``top1``
(the best-scored expert alone).

``prior`` and ``entropy`` run the model once per expert on the input (one batched forward of B·E rows, each
row with its own expert) before the routed forward.

The grid the paper evaluates (its released results, ``data/experimental_results.xlsx`` of CaroHolt/wtw): both
combinations (average, ensemble) × the five scorings (uniform, SentSim, TF-IDF, prior, entropy), at top-k for
k = 1…10 and all 21 adapters, each also with uniform top-k weights except uniform scoring (run with all adapters
only). All of these cells are options here (``combination=top1`` is k = 1). Deviations, stated: the paper
scores once per evaluation *domain* from 100 of its sequences (SentSim: the mean pairwise cosine of 100 target
and 100 adapter sequences; TF-IDF: the two 100-sequence documents; prior: a BTM posterior smoothed over the
sequences), moerge once per *example* from its own text; and entropy's weights there are ∝ Σu − u_e over the
selected adapters' entropies u, here a softmax over −u."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from pydantic import Field

from moerge.errors import RoutingError
from moerge.recipes.embedding import EMBEDDING_CENTROIDS, EmbedderOptions
from moerge.recipes.recipe import BuildContext, Recipe, Routing, Signature, Taxonomy
from moerge.routing.call import CallState, activate
from moerge.routing.embedding import call_texts
from moerge.routing.inputs import RoutingInputs
from moerge.routing.router import Router, prototype_scores
from moerge.routing.selection import Selection
from moerge.transforms import centroids as data_text
from moerge.transforms import tfidf

Scoring = Literal["uniform", "sentsim", "tfidf", "prior", "entropy"]


class WhatTheWeightOptions(EmbedderOptions):
    scoring: Scoring = "sentsim"
    combination: Literal["parameter", "output", "top1"] = "output"
    k: int | None = Field(default=None, ge=1)  # None: every expert
    topk_uniform: bool = False  # the selected top-k weighed alike (1/k), not by score
    tfidf_stop_words: Literal["english", "none"] = "english"


def normalised_topk(scores: torch.Tensor, k: int | None, uniform: bool = False) -> Selection:
    """The top-k of non-negative ``scores [B, E]``, weighted by their share of the top-k's sum (uniform over
    the top-k where all are zero, or with ``uniform``)."""
    E = scores.shape[-1]
    k = E if k is None else min(k, E)
    top, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    top, idx = top[:, :k], idx[:, :k]
    total = top.sum(-1, keepdim=True)
    w = torch.where(total > 0, top / total.clamp(min=1e-12), torch.full_like(top, 1.0 / k))
    if uniform:
        w = torch.full_like(top, 1.0 / k)
    return Selection(w, idx, "example")


def _compute_terms(ctx: BuildContext, o: WhatTheWeightOptions, data: dict[str, list]) -> dict[str, dict]:
    out = {}
    for name, rows in data.items():
        out[name] = tfidf.term_counts(data_text.row_text(r) for r in rows)
        if ctx.library is not None:
            ctx.library.put_artifact(tfidf.KIND, tfidf.CONFIG, name, out[name], {"num_texts": len(rows)})
    return out


TFIDF_TERMS = Signature(
    kind=tfidf.KIND,
    what="term counts of a sample of the experts' data (What the Weight?!'s TF-IDF documents)",
    compute=_compute_terms,
    config=lambda o, ctx: dict(tfidf.CONFIG),
    max_rows=100,  # the official code's 100 sequences per adapter
    how="moerge library prepare LIB --recipe what_the_weight -o scoring=tfidf --data EXPERT=FILE.jsonl",
    needed=lambda o: o.scoring == "tfidf",
)
SENTSIM_CENTROIDS = dataclasses.replace(EMBEDDING_CENTROIDS, needed=lambda o: o.scoring == "sentsim")


def expert_probe(model: Any, owner: Any, num_experts: int, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(log-likelihood [B, E], mean next-token entropy [B, E])`` of each input under each expert alone: one
    forward of ``B·E`` rows (row b·E + e: input b with expert e), in a call of its own."""
    B, T = input_ids.shape
    E = num_experts
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    ids = input_ids.repeat_interleave(E, 0)
    m = mask.repeat_interleave(E, 0)
    onehot = torch.eye(E).repeat(B, 1)  # moved to each layer's device by the call
    probe = CallState(_NoRouter(), RoutingInputs(weights=onehot), num_experts=E, batch_size=B * E)
    with activate(owner, probe), torch.no_grad():
        given = m if attention_mask is not None else None
        logits = model(input_ids=ids, attention_mask=given).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    nxt = ids[:, 1:]
    valid = (m[:, 1:] * m[:, :-1]).to(logp.dtype)
    ll = (logp.gather(-1, nxt[..., None]).squeeze(-1) * valid).sum(-1)
    ent = -(logp.exp() * logp).sum(-1)
    ent = (ent * valid).sum(-1) / valid.sum(-1).clamp(min=1)
    return ll.view(B, E), ent.view(B, E)


class _NoRouter(Router):
    """The probe call's router: never asked (the probe's weights are explicit)."""


class WhatTheWeightRouter(Router):
    granularity = "example"

    def __init__(self, scoring: Scoring, k: int | None, embedder: Any = None, centroids: Any = None,
                 model: Any = None, owner: Any = None, tfidf_scorer: tfidf.TfidfScorer | None = None,
                 uniform: bool = False):  # fmt: skip
        self.scoring, self.k, self.uniform = scoring, k, uniform
        self.embedder, self.centroids = embedder, centroids
        self.model, self.owner = model, owner
        self.tfidf = tfidf_scorer

    def scores(self, call: CallState) -> torch.Tensor:
        E = call.num_experts
        if self.scoring == "uniform":
            return torch.ones(call.batch_size, E)
        if self.scoring == "sentsim":
            emb = call.embed(self.embedder).float()
            return prototype_scores(emb, self.centroids.to(emb.device), "cos").clamp(min=0)
        if self.scoring == "tfidf":
            assert self.tfidf is not None
            return self.tfidf.scores(call_texts(call))
        if call.input_ids is None:
            raise RoutingError(
                f"scoring={self.scoring!r} scores the input's tokens: call the model with input_ids"
            )
        ll, ent = expert_probe(self.model, self.owner, E, call.input_ids, call.attention_mask)
        return torch.softmax(ll if self.scoring == "prior" else -ent, -1)  # on the model's device

    def begin_call(self, call: CallState) -> None:
        s = self.scores(call)
        call.plan["scores"] = s
        call.plan["selection"] = normalised_topk(s, self.k, self.uniform)

    def experts_per_token(self, num_experts: int) -> float:
        return float(min(self.k or num_experts, num_experts))


def _build(ctx: BuildContext, o: WhatTheWeightOptions) -> Routing:
    k = 1 if o.combination == "top1" else o.k
    embedder = centroids = model = owner = scorer = None
    if o.scoring == "sentsim":
        embedder = ctx.embedder_for(o.embedding_model)
        centroids = torch.stack([r["centroid"].float() for r in ctx.load(SENTSIM_CENTROIDS, o)])
    if o.scoring == "tfidf":
        stop = tfidf.english_stop_ids() if o.tfidf_stop_words == "english" else frozenset()
        scorer = tfidf.TfidfScorer(ctx.load(TFIDF_TERMS, o), stop)
    if o.scoring in ("prior", "entropy"):
        model, owner = ctx.model, ctx.model.get_submodule(ctx.modules[0]).owner
    router = WhatTheWeightRouter(o.scoring, k, embedder, centroids, model, owner, scorer, o.topk_uniform)
    return Routing(router, "parameter" if o.combination == "parameter" else "output")


WHAT_THE_WEIGHT = Recipe(
    name="what_the_weight",
    summary="per example: a scoring method (uniform, sentence similarity, TF-IDF, likelihood prior, entropy) x a "
    "combination (parameter average, output ensemble, top-1) over the top-k experts",
    paper="Holtermann et al. 2024, What the Weight?! (EACL Findings), arXiv:2401.12756",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="multiple",
        routing_data="multiple",
        granularity="example",
        depth="module",
        selection="sparse",
        aggregation="multiple",
        generalization="out-of-distribution",
        user_data="zero-shot",
    ),
    builder=_build,
    options=WhatTheWeightOptions,
    signatures=(SENTSIM_CENTROIDS, TFIDF_TERMS),
    option_axes={"combination": "aggregation"},
    variants=lambda: [
        {"scoring": "tfidf"},
        {"scoring": "prior"},
        {"scoring": "entropy"},
        {"combination": "parameter"},
    ],
)

RECIPES = [WHAT_THE_WEIGHT]
