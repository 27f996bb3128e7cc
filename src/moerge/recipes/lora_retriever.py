"""LoraRetriever (Zhao et al., ACL Findings 2024, "LoraRetriever: Input-Aware LoRA Retrieval and Composition
for Mixed Tasks in the Wild", arXiv:2402.09997).

Each expert is represented by the mean embedding of a few of its training inputs, each prefixed with a fixed
instruction (the paper: ~20 samples and an instruction-tuned retriever; [U] in our card — we embed the first
``max_rows=20`` rows the runner hands over, and use the installed embedder as the retriever, not the paper's
contrastively fine-tuned Instructor, so the recipe needs no target data). Each example embeds
``instruction + input``, retrieves its top-k experts by cosine, and composes them:

- ``composition="mixture"``: the average of the k experts' outputs, y = Wx + (1/k) Σ B_i A_i x (per module);
- ``composition="fusion"``: the average of their parameters, one LoRA per example: the paper's Θ = (1/k) Σ Θ_i
  averages the factors, ΔW = ((1/k) Σ B_i)((1/k) Σ s_i A_i) (``fusion_of="factors"``, the default, moerge's
  ``factor`` aggregation); ``fusion_of="delta"`` averages the updates, ΔW = (1/k) Σ B_i A_i (``parameter``
  aggregation) — for LoRA experts that equals the mixture, since each module's update is linear in x.

Every example of a batch has its own expert set, served in one forward (the expert layers gather per example).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from moerge.recipes.embedding import EmbedderOptions
from moerge.recipes.recipe import BuildContext, Recipe, Routing, Signature, Taxonomy
from moerge.routing.embedding import TopKRetrievalRouter
from moerge.routing.index import Backend
from moerge.transforms.centroids import row_prompt

KIND = "instruction_embeddings"
DEFAULT_INSTRUCTION = "Represent the sentence for similar task retrieval: "


class LoraRetrieverOptions(EmbedderOptions):
    k: int = Field(default=3, ge=1)
    instruction: str = DEFAULT_INSTRUCTION
    composition: Literal["mixture", "fusion"] = "mixture"
    fusion_of: Literal["factors", "delta"] = "factors"
    index: Backend = "auto"


def _config(o: LoraRetrieverOptions, ctx: BuildContext) -> dict[str, Any]:
    return {"embedder": ctx.embedder_for(o.embedding_model).name, "instruction": o.instruction, "version": 1}


def _compute(ctx: BuildContext, o: LoraRetrieverOptions, data: dict[str, list]) -> dict[str, dict]:
    embedder = ctx.embedder_for(o.embedding_model)
    out = {}
    for name, rows in data.items():
        emb = embedder.embed_texts([o.instruction + row_prompt(r) for r in rows]).float()
        tensors = {"mean": emb.mean(0).contiguous()}
        if ctx.library is not None:
            ctx.library.put_artifact(KIND, _config(o, ctx), name, tensors, {"num_texts": len(rows)})
        out[name] = tensors
    return out


INSTRUCTION_EMBEDDINGS = Signature(
    kind=KIND,
    what="mean instruction-prefixed embeddings of a few of each expert's inputs",
    compute=_compute,
    max_rows=20,
    config=_config,
    how="moerge.recipes.prepare_signatures('lora_retriever', model, tokenizer, library, data)",
)


def _build(ctx: BuildContext, o: LoraRetrieverOptions) -> Routing:
    means = torch.stack([r["mean"].float() for r in ctx.load(INSTRUCTION_EMBEDDINGS, o)])
    router = TopKRetrievalRouter(ctx.embedder_for(o.embedding_model), means, o.k, o.instruction, o.index)
    if o.composition == "mixture":
        return Routing(router, "output")
    return Routing(router, "parameter" if o.fusion_of == "delta" else "factor")


LORA_RETRIEVER = Recipe(
    name="lora_retriever",
    summary="per example: top-k experts by cosine of the instruction-prefixed input embedding to each expert's "
    "mean sample embedding; mixture (output average) or fusion (parameter average)",
    paper="Zhao et al. 2024, LoraRetriever (ACL Findings), arXiv:2402.09997",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="shared",
        routing_data="expert",
        granularity="example",
        depth="model",
        selection="sparse",
        aggregation="multiple",
        generalization="multiple",
        user_data="zero-shot",  # the survey says full: the paper trains its retriever; this one is off the shelf
    ),
    builder=_build,
    options=LoraRetrieverOptions,
    signatures=(INSTRUCTION_EMBEDDINGS,),
    variants=lambda: [{"composition": "fusion"}],
)

RECIPES = [LORA_RETRIEVER]
