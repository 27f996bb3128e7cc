"""Branch-Train-MiX (Sukhbaatar et al. 2024, "Branch-Train-MiX: Mixing Expert LLMs into a Mixture-of-Experts
LLM", arXiv:2403.07816; no official code was published — the paper's §2 is followed).

The expert LLMs are the library's experts made dense (each the base plus its update, `weight_deltas`: a LoRA
densified, a dense task vector as stored). MiX, as the paper's §2.3 describes it:

- in every decoder layer each expert's FFN becomes one expert of a Mixtral MoE layer; the base's FFN is kept as
  one more expert (``include_base``, the paper's 4x7B keeps the seed model's Llama-2 FFN beside math, code and
  Wikipedia);
- every other parameter (attention, norms, embeddings, LM head) is averaged over those models (the base counted
  as one of them when its FFN is kept);
- a router per layer, g(x) = softmax(TopK(W_l x)), top-2 (``k``), per token (Mixtral's router: softmax, top-k,
  renormalised — the same weights);
- trained on the mixture of the experts' data (the union of their training rows) with the LM loss plus a
  Switch-style load-balancing loss, Mixtral's ``router_aux_loss_coef`` (``aux_loss_coef``, 0.01 here; the
  paper's value was not checked, the card marks the specifics [U]).

Deviation (said so in the report): the paper fine-tunes the whole MoE in the MiX stage; here only the routers
train and everything else stays frozen (the issue's other option, and what makes the result a pure routing
method over fixed experts: ``trainable_parameters`` = layers × experts × hidden). The routers start from
U(−1/√d, 1/√d) (``gate_init``, torch's ``nn.Linear`` default; mergekit's ``hidden``/``cheap_embed``/``random``
are offered by `moerge build-moe`). The trained routers are one library-scope artifact (``btx_router``, keyed like
the learned routers of `moerge.train.router`: options, expert set and digests, data hash), prepared from the
experts' data by ``moerge library prepare`` or the benchmark, so a second build trains nothing.

Taxonomy note: the survey records BTX's user data as "multiple"; here ``zero-shot`` (as MeteoRA and SMEAR: the
routers learn from the experts' own data, the user gives nothing), and ``expert_data="shared"``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from moerge.errors import RecipeNotApplicableError
from moerge.recipes.recipe import BuildContext, BuiltModel, Recipe, RecipeOptions, Signature, Taxonomy

BTX_ROUTER_KIND = "btx_router"


class BtxOptions(RecipeOptions):
    """The MoE's shape and the routers' training (the benchmark's small settings by default)."""

    k: int = Field(default=2, ge=1, description="experts per token (the paper: top-2)")
    include_base: bool = Field(default=True, description="keep the base's FFN as one more expert (the paper)")
    aux_loss_coef: float = Field(default=0.01, ge=0, description="weight of the load-balancing loss")
    gate_init: Literal["uniform_random", "random"] = "uniform_random"
    steps: int = Field(default=400, ge=1, description="router training steps on the experts' data")
    lr: float = Field(default=1e-2, gt=0)
    batch_size: int = Field(default=8, ge=1)
    seed: int = 0


def _states(ctx: BuildContext, o: BtxOptions) -> list[dict[str, Any]]:
    from moerge.model.moe import expert_state

    base = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
    return ([base] if o.include_base else []) + [expert_state(ctx.model, e) for e in ctx.experts]


def _moe(ctx: BuildContext, o: BtxOptions, gates: Any = None) -> Any:
    from moerge.model.moe import build_mixtral, check_llama_family, gate_vectors

    if ctx.model is None or getattr(ctx.model, "config", None) is None:
        raise RecipeNotApplicableError(
            "recipe 'btx' builds a new model from a transformers base: pass the model"
        )
    try:
        check_llama_family(ctx.model.config)
    except Exception as e:
        raise RecipeNotApplicableError(f"recipe 'btx': {e}") from None
    states = _states(ctx, o)
    if gates is None:
        gates = gate_vectors(o.gate_init, ctx.model, num_experts=len(states), seed=o.seed)
    k = min(o.k, len(states))
    device = ctx.device
    moe = build_mixtral(ctx.model, states, gates, experts_per_token=k, shared="average",
                        router_aux_loss_coef=o.aux_loss_coef)  # fmt: skip
    return moe.to(device)


def _config(o: BtxOptions, ctx: BuildContext) -> dict[str, Any]:
    from moerge.train.router import router_config

    modules = sorted({m for e in ctx.experts for m in e.lora} | {m for e in ctx.experts for m in e.dense})
    return router_config("btx", o.model_dump(), ctx.experts, ctx.library, modules, "experts' training data")


def _gates(moe: Any) -> dict[str, Any]:
    from moerge.train.moe_router import router_parameters

    return {n: p.detach().cpu().contiguous() for n, p in router_parameters(moe).items()}


def compute_btx_routers(ctx: BuildContext, o: BtxOptions, data: dict[str, list]) -> dict[str, dict]:
    """The MoE built and its routers trained on every expert's training rows, mixed; stored in the library."""
    from moerge.train.gates import training_rows
    from moerge.train.moe_router import train_moe_routers
    from moerge.train.router import RouterTrainConfig

    ctx.require_tokenizer()
    rows = [r for name in ctx.names for r in training_rows(data.get(name, []))]
    moe = _moe(ctx, o)
    cfg = RouterTrainConfig(
        steps=o.steps, lr=o.lr, batch_size=o.batch_size, seed=o.seed, aux_weight=o.aux_loss_coef
    )
    result = train_moe_routers(moe, ctx.tokenizer, rows, cfg, on_step=ctx.report_steps)
    state = _gates(moe)
    if ctx.library is not None:
        info = {
            "train_seconds": result.seconds, "rows": len(rows), "trainable_parameters": sum(t.numel() for t in state.values()),
            "first_loss": result.losses[0], "final_loss": result.losses[-1],
        }  # fmt: skip
        ctx.library.put_artifact(BTX_ROUTER_KIND, _config(o, ctx), None, state, info)
    return {"_library": state}


BTX_ROUTERS = Signature(
    kind=BTX_ROUTER_KIND,
    what="Branch-Train-MiX routers trained on the experts' data",
    compute=compute_btx_routers,
    config=lambda o, ctx: _config(o, ctx),
    scope="library",
    how="moerge.recipes.prepare_signatures('btx', model, tokenizer, library, {expert: rows})",
)


def build_btx(ctx: BuildContext, o: BtxOptions) -> BuiltModel:
    """The MoE with its trained routers (from the library's ``btx_router`` artifact)."""
    import torch

    from moerge.model.moe import moe_flops_per_token

    tensors, info = ctx.load_library(BTX_ROUTERS, o)
    moe = _moe(ctx, o)
    params = dict(moe.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in params or params[name].shape != value.shape:
                raise RecipeNotApplicableError(
                    f"recipe 'btx': the stored routers do not fit this MoE ({name}); prepare them again"
                )
            params[name].copy_(value)
    return BuiltModel(
        moe,
        train_seconds=float(info.get("train_seconds", 0.0)),
        trainable_parameters=sum(t.numel() for t in tensors.values()),
        flops_per_token=moe_flops_per_token(moe.config),
        info={
            "experts": (["base"] if o.include_base else []) + ctx.names,
            "final_loss": info.get("final_loss"),
        },
    )


BTX = Recipe(
    name="btx",
    summary="Branch-Train-MiX: the experts' FFNs (and the base's) as a Mixtral MoE per layer, other weights averaged; per-token top-2 routers trained on the experts' data with a load-balancing loss",
    paper="Sukhbaatar et al. 2024, Branch-Train-MiX: Mixing Expert LLMs into a Mixture-of-Experts LLM, arXiv:2403.07816",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="shared",
        routing_data="expert",
        granularity="step",
        depth="module",
        selection="sparse",
        aggregation="output",
        generalization="in-distribution",
        user_data="zero-shot",
    ),  # fmt: skip
    builder=None,
    model_builder=build_btx,
    options=BtxOptions,
    signatures=(BTX_ROUTERS,),
)

RECIPES = [BTX]
