"""Twin-Merging (Lu, Fan, Xu, Chen, Cheng, "Twin-Merging: Dynamic Integration of Modular Expertise in Model
Merging", NeurIPS 2024, arXiv:2406.15479; official code LZY-the-boys/Twin-Merging read: discriminative/router.py,
discriminative/twin_merge.py, generative/eval_twin.py, generative/sparsify.py and the configs).

1. Shared expert θ* = task arithmetic of the experts, θ₀ + λ Σ_t τ_t (``second_merge_method: task_arithmetic``,
   λ = 0.3 in generative/config/twin_merge.yml; 0.29 for the discriminative runs).
2. Exclusive knowledge v_t = θ_t − θ* for each linear weight, sparsified by magnitude (keep the top
   ``density``; the discriminative runs' ``mask_rate``) and compressed by truncated SVD to rank ``rank``
   (generative/eval_twin.py ``extract_twin_vector``: ``sparsify.svd(..., new_rank=8)``). Each v_t is kept as a
   LoRA-shaped expert (B = U_r S_r, A = V_rᵀ) in the shared model's `ExpertLayer`s.
3. Router: the official ``SimpleMLP`` (d → 2d → 2d → T, BatchNorm, LeakyReLU, dropout 0.5) on the mean of the
   shared model's last hidden states, trained with cross-entropy to name the source task on the tasks' training
   data (AdamW, lr 5e-4, batch 1024, 50 epochs). A library-scope artifact trained once per expert set.
4. Per example: w = softmax(router logits); the forward runs θ* x + Σ_t w_t v_t x in every linear layer — for
   a linear layer the same as running θ* + Σ_t w_t v_t (the official per-example ``functional_call``), in one
   batched forward.

Deviations: the router pools over the prompt tokens (the official pools over every token of the input, which is
the prompt there too); parameters other than linear weights (norms, embeddings, biases) get no exclusive part
(the official keeps 1-D tensors whole), so with dense experts they enter only through the shared merge; the
shared merge is task arithmetic only (TIES lives in ``moerge.merging``, a layer above the recipes).

Taxonomy note: the survey records Twin-Merging's routing data as target and its user data as full because the
paper's target tasks are the experts' own; here the router learns from the experts' data and the user gives
nothing (``zero-shot``), as for MeteoRA and SMEAR.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from moerge.errors import RecipeNotApplicableError
from moerge.experts.expert import Expert, LoraModule
from moerge.experts.metadata import ExpertMetadata
from moerge.model.routed import MoErgedModel, inject
from moerge.recipes.recipe import BuildContext, BuiltModel, Recipe, RecipeOptions, Signature, Taxonomy
from moerge.recipes.weight_ensembling import prompt_batch, task_vectors
from moerge.routing.fixed import FixedRouter
from moerge.routing.inputs import RoutingInputs


class TwinOptions(RecipeOptions):
    scale: float = Field(default=0.3, description="task-arithmetic λ of the shared expert (official: 0.3)")
    rank: int = Field(default=8, ge=1, description="SVD rank of each exclusive update (official: 8)")
    density: float = Field(default=1.0, gt=0, le=1, description="magnitude fraction kept before the SVD")
    epochs: int = Field(default=50, ge=1, description="router training epochs (official: 50)")
    lr: float = Field(default=5e-4, gt=0)
    batch_size: int = Field(default=1024, ge=2)
    seq_len: int = Field(default=64, ge=2)
    seed: int = 0


class TwinRouter(nn.Module):
    """The official ``SimpleMLP``: fc1 → BN → LeakyReLU → dropout → fc3 → BN → LeakyReLU → dropout → fc4."""

    def __init__(self, d: int, num_tasks: int):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(d, 2 * d), nn.BatchNorm1d(2 * d)
        self.fc3, self.bn3 = nn.Linear(2 * d, 2 * d), nn.BatchNorm1d(2 * d)
        self.fc4 = nn.Linear(2 * d, num_tasks)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.leaky_relu(self.bn1(self.fc1(x.float()))))
        x = self.dropout(F.leaky_relu(self.bn3(self.fc3(x))))
        return self.fc4(x)


def shared_model(ctx: BuildContext, tvs: list[dict[str, torch.Tensor]], scale: float) -> Any:
    """θ* = θ₀ + λ Σ_t τ_t (a copy; ``ctx.model`` is left alone)."""
    model = copy.deepcopy(ctx.model).requires_grad_(False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in sorted(set().union(*tvs)):
            p = params[key]
            p.add_(scale * sum(tv[key] for tv in tvs if key in tv).to(device=p.device, dtype=p.dtype))
    return model


def sparsify_svd(delta: torch.Tensor, density: float, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top-``density`` magnitudes, then the best rank-``rank`` approximation ``B @ A`` (B = U S)."""
    if density < 1:
        k = max(1, int(density * delta.numel()))
        thr = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
        delta = torch.where(delta.abs() >= thr, delta, 0.0)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, S.numel())
    return U[:, :r] * S[:r], Vh[:r]


def exclusive_experts(ctx: BuildContext, tvs: list[dict[str, torch.Tensor]], o: TwinOptions) -> list[Expert]:
    """v_t = θ_t − θ* on each linear weight, sparsified and SVD-compressed, as LoRA-shaped experts."""
    out = []
    for t, expert in enumerate(ctx.experts):
        lora = {}
        for key in sorted(set().union(*tvs)):
            module_name, _, leaf = key.rpartition(".")
            if leaf != "weight":
                continue
            module = ctx.model.get_submodule(module_name)
            conv1d = type(module).__name__ == "Conv1D"
            if not (isinstance(module, nn.Linear) or conv1d):
                continue
            shared = o.scale * sum(tv[key] for tv in tvs if key in tv)
            v = tvs[t].get(key, torch.zeros_like(shared)) - shared
            B, A = sparsify_svd(v.T if conv1d else v, o.density, o.rank)
            lora[module_name] = LoraModule(A=A.contiguous(), B=B.contiguous(), alpha=float(A.shape[0]))
        meta = ExpertMetadata(name=f"twin-{t}", kind="lora", task=expert.metadata.task)
        out.append(Expert(metadata=meta, lora=lora))
    return out


def pooled_states(model: Any, ids: torch.Tensor, mask: torch.Tensor, routing: Any = None) -> torch.Tensor:
    """Mean of the last hidden states over the masked tokens, per example ``[B, d]``."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, routing=routing) if routing is not None \
        else model(input_ids=ids, attention_mask=mask, output_hidden_states=True)  # fmt: skip
    h = out.hidden_states[-1].float()
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def _config(o: TwinOptions, ctx: BuildContext) -> dict[str, Any]:
    from moerge.train.router import router_config

    return router_config(
        "twin_merging", o.model_dump(), ctx.experts, ctx.library, [], "experts' training data"
    )


def _features(model: Any, tokenizer: Any, texts: list[str], seq_len: int, device: Any) -> torch.Tensor:
    feats = []
    with torch.no_grad():
        for s in range(0, len(texts), 64):
            ids, mask = prompt_batch(tokenizer, texts[s : s + 64], seq_len)
            feats.append(pooled_states(model, ids.to(device), mask.to(device)).cpu())
    return torch.cat(feats)


def train_twin_router(
    x: torch.Tensor, y: torch.Tensor, T: int, o: TwinOptions
) -> tuple[TwinRouter, list[float]]:
    """The official recipe: cross-entropy, AdamW, ``epochs`` passes over shuffled batches; returns per-epoch losses."""
    torch.manual_seed(o.seed)
    router = TwinRouter(x.shape[1], T)
    opt = torch.optim.AdamW(router.parameters(), lr=o.lr)
    losses = []
    router.train()
    for _ in range(o.epochs):
        perm = torch.randperm(len(x))
        total = 0.0
        for s in range(0, len(x), o.batch_size):
            idx = perm[s : s + o.batch_size]
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            loss = F.cross_entropy(router(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x))
    router.eval()
    return router, losses


def _compute(ctx: BuildContext, o: TwinOptions, data: dict[str, list]) -> dict[str, dict]:
    from moerge.train.gates import training_rows
    from moerge.train.router import ROUTER_KIND

    ctx.require_tokenizer()
    start = time.perf_counter()
    model = shared_model(ctx, task_vectors(ctx), o.scale)
    texts, labels = [], []
    for t, name in enumerate(ctx.names):
        for r in training_rows(data.get(name, [])):
            texts.append(r.get("prompt", r.get("text", "")) if isinstance(r, dict) else str(r))
            labels.append(t)
    if not texts:
        raise RecipeNotApplicableError(
            "recipe 'twin_merging' trains its router on the experts' data; none given"
        )
    x = _features(model, ctx.tokenizer, texts, o.seq_len, next(model.parameters()).device)
    router, losses = train_twin_router(x, torch.tensor(labels), len(ctx.names), o)
    state = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
    if ctx.library is not None:
        info = {
            "train_seconds": time.perf_counter() - start,
            "first_loss": losses[0],
            "final_loss": losses[-1],
        }
        ctx.library.put_artifact(ROUTER_KIND, _config(o, ctx), None, state, info)
    return {"_library": state}


TWIN_ROUTER = Signature(
    kind="learned_router",
    what="a Twin-Merging router trained on the experts' data",
    compute=_compute,
    config=lambda o, ctx: _config(o, ctx),
    scope="library",
    how="moerge.recipes.prepare_signatures('twin_merging', model, tokenizer, library, {expert: rows})",
)


class TwinMerged:
    """The shared model with the exclusive experts injected, and the router; ``logits`` routes per example."""

    def __init__(self, routed: MoErgedModel, router: TwinRouter):
        self.routed, self.router = routed, router
        self.last_weights: torch.Tensor | None = None

    @torch.no_grad()
    def weights(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        zeros = RoutingInputs(weights=torch.zeros(input_ids.shape[0], self.routed.num_experts))
        feats = pooled_states(self.routed, input_ids, mask, routing=zeros)  # θ*'s own states (no exclusive)
        return self.router.to(feats.device)(feats).softmax(-1)

    def logits(self, input_ids: Any, attention_mask: Any = None, routing_mask: Any = None) -> Any:
        mask = routing_mask if routing_mask is not None else attention_mask
        if mask is None:
            mask = torch.ones_like(input_ids)
        w = self.weights(input_ids, mask)
        self.last_weights = w
        return self.routed(
            input_ids=input_ids, attention_mask=attention_mask, routing=RoutingInputs(weights=w)
        ).logits


def build_twin(ctx: BuildContext, o: TwinOptions, state: dict[str, torch.Tensor] | None = None) -> TwinMerged:
    """The Twin-Merging model from the experts and a trained router's state (``None``: untrained)."""
    tvs = task_vectors(ctx)
    model = shared_model(ctx, tvs, o.scale)
    experts = exclusive_experts(ctx, tvs, o)
    layers, owner = inject(model, experts)
    uniform = FixedRouter(torch.full((len(experts),), 1.0 / len(experts)))  # always overridden per call
    routed = MoErgedModel(model, layers, [e.name for e in experts], uniform, "output", owner)
    router = TwinRouter(int(model.config.hidden_size), len(experts))
    if state is not None:
        router.load_state_dict(state)
    router.eval()
    return TwinMerged(routed, router)


def _build(ctx: BuildContext, o: TwinOptions) -> BuiltModel:
    tensors, info = ctx.load_library(TWIN_ROUTER, o)
    built = build_twin(ctx, o, tensors)
    layers = built.routed.expert_layers.values()
    return BuiltModel(
        built.routed, forward=built.logits, train_seconds=float(info.get("train_seconds", 0.0)),
        trainable_parameters=sum(v.numel() for v in tensors.values() if v.is_floating_point()),
        # every exclusive expert runs in every linear layer: r·(d_in + d_out) multiply-adds each
        flops_per_token=float(sum(len(built.routed.expert_names) * o.rank * (e.d_in + e.d_out) for e in layers)),
    )  # fmt: skip


TWIN_MERGING = Recipe(
    name="twin_merging",
    summary="shared expert = task-arithmetic merge; exclusive knowledge = sparsified, SVD-compressed differences per task; an MLP router on the shared model's pooled hidden state (trained on the tasks' data) weights them per example, in one forward",
    paper="Lu et al. 2024, Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging (NeurIPS), arXiv:2406.15479; code LZY-the-boys/Twin-Merging",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="shared",
        routing_data="expert",
        granularity="example",
        depth="model",
        selection="dense",
        aggregation="parameter",
        generalization="in-distribution",
        user_data="zero-shot",
    ),  # fmt: skip
    builder=None,
    model_builder=_build,
    options=TwinOptions,
    signatures=(TWIN_ROUTER,),
)

RECIPES = [TWIN_MERGING]
