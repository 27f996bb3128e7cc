"""Weight-ensembling recipes: model-building recipes (`BuiltModel`) over the experts' task vectors, LoRA experts
densified or dense experts as stored (`moerge.model.routed.weight_deltas`).

- **WEMoE** (Tang, Shen, Du, Luo, Tao, "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts",
  ICML 2024, arXiv:2402.00433; official code tanganke/weight-ensembling_MoE, and FusionBench's
  ``fusion_bench/models/we_moe.py`` + ``fusion_bench/method/we_moe/`` read, with
  ``config/method/wemoe/weight_ensembling_moe.yaml``): every parameter outside the MLPs is merged by task
  arithmetic θ₀ + λ Σ_t τ_t with λ = ``init_lambda`` (0.3 in the official config); each decoder layer's MLP
  becomes a `WeightEnsemblingMoE` over the pretrained MLP and the experts' MLP task vectors, with a 2-layer
  router (d→d ReLU →T, N(0, 0.01²), output bias λ) whose per-token outputs are averaged over the sequence — here
  over the prompt tokens (``routing_mask``) — into per-example weights (no softmax). Only the routers train, by
  test-time adaptation: Adam (lr 1e-4, batch 16, 1000 steps in the official config) minimising the entropy of the
  predictions on unlabelled target inputs. Adapted to a causal LM: the prediction is the next-token distribution
  at the last prompt token (the answer's first token — as FusionBench's Flan-T5 variant uses the first decoder
  token's logits). The unlabelled inputs are the target task's own inputs (``TargetData.texts``; labels are never
  read), so the benchmark builds one model per task in its ``full`` setting; the official run adapts on the eight
  tasks' test inputs together (the survey's "zero-shot*": unlabelled test inputs). Deviations: per-example
  merging (the official config sets ``batch_reduce: true``, one merge per batch, which would mix tasks in our
  mixed batches); the benchmark defaults train 60 steps at lr 1e-3 (``preset="paper"``: 1000 steps, 1e-4, batch 16).
- **PWE MoE** (Tang, Shen, Du, Luo, Tao, "Towards Efficient Pareto Set Approximation via Mixture of Experts Based
  Model Fusion", 2024, arXiv:2406.09770; FusionBench ``fusion_bench/method/pwe_moe/`` read: ``module.py``
  ``ParetoWeightEnsemblingModule``, ``clip_pwe_moe.py``, ``config/method/pwe_moe/pwe_moe_ls_for_clip.yaml``):
  the same task-arithmetic remainder (λ = 0.3) and weight-ensembling of the MLPs *and* attention blocks
  (``upscale_mlp``/``upscale_attn``), but each router maps the user's preference vector r over the tasks
  (T→2T ReLU →T, same initialisation) to the weights, so a fixed r folds into one dense model. Trained on the
  experts' own data (a library-scope artifact, as the routers of `moerge.recipes.learned`): each step samples
  r ~ Dirichlet(1) and minimises the linear scalarisation Σ_t r_t L_t, L_t the LM loss on a batch of task t's
  rows (Adam, cosine decay to 0.1·lr; official 8000 steps at 1e-5, batch 16). At inference the benchmark uses the
  ``preference`` option (uniform by default); benchmarks/pwe_moe_pareto.py traces the front.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from moerge.errors import RecipeNotApplicableError
from moerge.model.routed import weight_deltas
from moerge.model.weight_ensembling import (
    PreferenceEnsembling,
    WeightEnsemblingGate,
    WeightEnsemblingMoE,
    fold_preferences,
    routing_mask,
    set_preference,
)
from moerge.recipes.recipe import BuildContext, BuiltModel, Recipe, RecipeOptions, Signature, Taxonomy


def task_vectors(ctx: BuildContext) -> list[dict[str, torch.Tensor]]:
    """Each expert's update by parameter name (float32), in routing order."""
    return [{k: v.float() for k, v in weight_deltas(ctx.model, e).items()} for e in ctx.experts]


def ensembled_modules(model: Any, names: Sequence[str]) -> list[str]:
    """The modules of ``model`` whose last name component is one of ``names`` (``mlp``, ``self_attn`` …)."""
    return [n for n, _ in model.named_modules() if n and n.rpartition(".")[2] in names]


def upscaled_copy(
    ctx: BuildContext, tvs: list[dict[str, torch.Tensor]], modules: list[str], scale: float
) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
    """A copy of the base with every parameter outside ``modules`` merged by task arithmetic (θ₀ + λ Σ τ_t), and
    each module's stacked task vectors ``{module: {local param: [T, *shape]}}`` (zeros where an expert leaves a
    parameter alone; modules no expert touches are left out)."""
    model = copy.deepcopy(ctx.model).requires_grad_(False)
    params = dict(model.named_parameters())
    stacked: dict[str, dict[str, torch.Tensor]] = {}
    inside = {m: [k for k in params if k.startswith(m + ".")] for m in modules}
    owned = {k: m for m, ks in inside.items() for k in ks}
    with torch.no_grad():
        for key, p in params.items():
            deltas = [tv.get(key) for tv in tvs]
            if all(d is None for d in deltas):
                continue
            full = torch.stack([d if d is not None else torch.zeros(p.shape) for d in deltas])
            if key in owned:
                m = owned[key]
                stacked.setdefault(m, {})[key[len(m) + 1 :]] = full.to(p.dtype)
            else:
                p.add_(scale * full.sum(0).to(p.dtype))
    return model, stacked


def _set(model: Any, name: str, module: Any) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _trainable(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------- WEMoE
class WemoeOptions(RecipeOptions):
    PAPER: ClassVar[dict[str, Any]] = {"steps": 1000, "lr": 1e-4, "batch_size": 16}

    init_lambda: float = Field(
        default=0.3, description="task-arithmetic λ of the non-MLP parameters and the routers' initial bias"
    )
    steps: int = Field(default=60, ge=0, description="test-time adaptation steps (official: 1000)")
    lr: float = Field(default=1e-3, gt=0, description="Adam learning rate (official: 1e-4)")
    batch_size: int = Field(default=16, ge=1)
    seq_len: int = Field(default=64, ge=2)
    modules: list[str] = Field(default=["mlp"], description="module names made weight-ensembling")
    seed: int = 0
    preset: Literal["paper"] | None = Field(
        default=None, description="paper: the official steps, lr and batch size"
    )

    def model_post_init(self, _: Any) -> None:
        if self.preset == "paper":
            for k, v in self.PAPER.items():
                if k not in self.model_fields_set:
                    setattr(self, k, v)


def prompt_batch(tokenizer: Any, texts: Sequence[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of ``<bos> + text``, truncated to ``seq_len``."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [(bos + list(tokenizer(t, add_special_tokens=False)["input_ids"]))[:seq_len] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def next_token_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the next-token distribution at each row's last visible token."""
    last = mask.sum(1).clamp(min=1) - 1
    z = logits[torch.arange(logits.shape[0]), last].float()
    p = z.softmax(-1)
    return -(p * z.log_softmax(-1)).sum(-1).mean()


def build_wemoe_model(ctx: BuildContext, o: WemoeOptions) -> Any:
    """The WEMoE model before adaptation: task-arithmetic remainder, a `WeightEnsemblingMoE` per MLP."""
    tvs = task_vectors(ctx)
    modules = ensembled_modules(ctx.model, o.modules)
    model, stacked = upscaled_copy(ctx, tvs, modules, o.init_lambda)
    hidden = int(model.config.hidden_size)
    g = torch.Generator().manual_seed(o.seed)
    for name in modules:
        if name not in stacked:
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            gate = WeightEnsemblingGate(hidden, hidden, len(tvs), o.init_lambda)
        _set(model, name, WeightEnsemblingMoE(ctx.model.get_submodule(name), stacked[name], gate))
    return model.to(ctx.device)


def adapt_by_entropy(model: Any, ids: torch.Tensor, mask: torch.Tensor, o: WemoeOptions) -> list[float]:
    """Test-time adaptation: Adam on the routers only, minimising `next_token_entropy` on shuffled batches."""
    params = _trainable(model)
    if not params or o.steps == 0:
        return []
    opt = torch.optim.Adam(params, lr=o.lr)
    g = torch.Generator().manual_seed(o.seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(o.steps):
        while len(order) < o.batch_size:
            order += torch.randperm(len(ids), generator=g).tolist()
        idx, order = order[: o.batch_size], order[o.batch_size :]
        b_ids, b_mask = ids[idx].to(params[0].device), mask[idx].to(params[0].device)
        with routing_mask(b_mask):
            logits = model(input_ids=b_ids, attention_mask=b_mask).logits
        loss = next_token_entropy(logits, b_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _forward(model: Any) -> Any:
    def run(input_ids: Any, attention_mask: Any = None, routing: Any = None) -> Any:
        with routing_mask(routing if routing is not None else attention_mask):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits

    return run


def _build_wemoe(ctx: BuildContext, o: WemoeOptions) -> BuiltModel:
    """Build, then adapt the routers on the target inputs — or load routers adapted before on the same inputs,
    experts and options (cached in the library like the learned routers: `moerge.train.router.ROUTER_KIND`)."""
    from moerge.train.router import ROUTER_KIND, data_hash, router_config

    target = ctx.require_target()
    ctx.require_tokenizer()
    start = time.perf_counter()
    model = build_wemoe_model(ctx, o)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    config = router_config(
        "wemoe", o.model_dump(), ctx.experts, ctx.library, sorted(trained), data_hash(target.texts)
    )
    got = ctx.library.get_artifact(ROUTER_KIND, config, None) if ctx.library is not None else None
    if got is not None:
        tensors, info = got
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(tensors[n].to(p.device, p.dtype))
        model.eval()
        seconds, losses = float(info.get("train_seconds", 0.0)), info.get("entropy", [])
    else:
        ids, mask = prompt_batch(ctx.tokenizer, target.texts, o.seq_len)  # inputs only: labels are never read
        losses = adapt_by_entropy(model, ids, mask, o)
        seconds = time.perf_counter() - start
        if ctx.library is not None:
            state = {n: p.detach().cpu().contiguous() for n, p in trained.items()}
            ctx.library.put_artifact(
                ROUTER_KIND, config, None, state, {"train_seconds": seconds, "entropy": losses}
            )
    return BuiltModel(
        model, forward=_forward(model), train_seconds=seconds,
        trainable_parameters=sum(p.numel() for p in _trainable(model)),
        info={"entropy_first": losses[:1], "entropy_last": losses[-1:]},
    )  # fmt: skip


WEMOE = Recipe(
    name="wemoe",
    summary="non-MLP weights merged by task arithmetic; each MLP a weight-ensembling module whose 2-layer router maps the prompt's token states to per-example task-vector weights, trained by entropy minimisation on unlabelled target inputs",
    paper="Tang et al. 2024, Merging Multi-Task Models via Weight-Ensembling Mixture of Experts (ICML), arXiv:2402.00433; code tanganke/fusion_bench (models/we_moe.py)",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="private",
        routing_data="target",
        granularity="example",
        depth="module",
        selection="dense",
        aggregation="parameter",
        generalization="multiple",
        user_data="full",
    ),  # fmt: skip
    builder=None,
    model_builder=_build_wemoe,
    options=WemoeOptions,
)


# ---------------------------------------------------------------------------------------------------- PWE MoE
class PweMoeOptions(RecipeOptions):
    PAPER: ClassVar[dict[str, Any]] = {"steps": 8000, "lr": 1e-5, "batch_size": 16}

    init_lambda: float = Field(default=0.3, description="task-arithmetic λ of the rest and the routers' bias")
    steps: int = Field(default=200, ge=1, description="training steps (official: 8000)")
    lr: float = Field(default=1e-2, gt=0, description="Adam learning rate (official: 1e-5)")
    batch_size: int = Field(default=8, ge=1, description="rows per task per step")
    seq_len: int = Field(default=64, ge=2)
    alpha: float = Field(default=1.0, gt=0, description="Dirichlet concentration of the sampled preferences")
    modules: list[str] = Field(default=["mlp", "self_attn", "attn"], description="modules made ensembling")
    preference: list[float] | None = Field(default=None, description="the preference at inference (uniform)")
    seed: int = 0


def build_pwe_model(ctx: BuildContext, o: PweMoeOptions) -> Any:
    """The PWE MoE model before training: task-arithmetic remainder, a `PreferenceEnsembling` per module."""
    tvs = task_vectors(ctx)
    modules = ensembled_modules(ctx.model, o.modules)
    model, stacked = upscaled_copy(ctx, tvs, modules, o.init_lambda)
    T = len(tvs)
    torch.manual_seed(o.seed)
    for name in modules:
        if name in stacked:
            gate = WeightEnsemblingGate(T, 2 * T, T, o.init_lambda)
            _set(model, name, PreferenceEnsembling(ctx.model.get_submodule(name), stacked[name], gate))
    return model.to(ctx.device)


def _pwe_config(o: PweMoeOptions, ctx: BuildContext) -> dict[str, Any]:
    from moerge.train.router import router_config

    opts = o.model_dump(exclude={"preference"})
    return router_config("pwe_moe", opts, ctx.experts, ctx.library, o.modules, "experts' training data")


def train_pwe(
    model: Any, tokenizer: Any, rows: list[list[Any]], o: PweMoeOptions, on_step: Any = None
) -> list[float]:
    """Sample r ~ Dirichlet(alpha) per step, minimise Σ_t r_t L_t (each L_t on a batch of task t's rows)."""
    from moerge.train.loop import causal_lm_loss
    from moerge.train.router import router_batches

    T = len(rows)
    batches = [
        router_batches(tokenizer, r, o.batch_size, o.steps, o.seed + t, o.seq_len) for t, r in enumerate(rows)
    ]
    params = _trainable(model)
    opt = torch.optim.Adam(params, lr=o.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o.steps, eta_min=0.1 * o.lr)
    dirichlet = torch.distributions.Dirichlet(torch.full((T,), o.alpha))
    torch.manual_seed(o.seed)
    device = params[0].device
    losses = []
    model.train()
    for step in range(o.steps):
        r = dirichlet.sample()
        set_preference(model, r)
        loss = sum(
            r[t]
            * causal_lm_loss(
                model(input_ids=b[0].to(device), attention_mask=b[2].to(device)).logits, b[1].to(device)
            )
            for t, b in ((t, batches[t][step]) for t in range(T))
        )
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, o.steps)
    model.eval()
    return losses


def _gate_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".gate." in k}


def _pwe_compute(ctx: BuildContext, o: PweMoeOptions, data: dict[str, list]) -> dict[str, dict]:
    from moerge.train.gates import training_rows
    from moerge.train.router import ROUTER_KIND

    ctx.require_tokenizer()
    start = time.perf_counter()
    model = build_pwe_model(ctx, o)
    rows = [training_rows(data.get(n, [])) for n in ctx.names]
    if any(not r for r in rows):
        missing = [n for n, r in zip(ctx.names, rows, strict=True) if not r]
        raise RecipeNotApplicableError(f"recipe 'pwe_moe' trains on every expert's data; none for {missing}")
    losses = train_pwe(model, ctx.tokenizer, rows, o, ctx.report_steps)
    state = _gate_state(model)
    if ctx.library is not None:
        info = {"train_seconds": time.perf_counter() - start, "first_loss": losses[0], "final_loss": losses[-1],
                "trainable_parameters": sum(v.numel() for v in state.values())}  # fmt: skip
        ctx.library.put_artifact(ROUTER_KIND, _pwe_config(o, ctx), None, state, info)
    return {"_library": state}


PWE_ROUTER = Signature(
    kind="learned_router",
    what="PWE MoE preference routers trained on the experts' data",
    compute=_pwe_compute,
    config=lambda o, ctx: _pwe_config(o, ctx),
    scope="library",
    how="moerge.recipes.prepare_signatures('pwe_moe', model, tokenizer, library, {expert: rows})",
)


def preference_vector(o: PweMoeOptions, T: int) -> torch.Tensor:
    if o.preference is None:
        return torch.full((T,), 1.0 / T)
    if len(o.preference) != T or any(v < 0 for v in o.preference) or sum(o.preference) <= 0:
        raise RecipeNotApplicableError(f"pwe_moe: preference needs {T} non-negative weights, one per expert")
    r = torch.tensor(o.preference, dtype=torch.float32)
    return r / r.sum()


def _build_pwe(ctx: BuildContext, o: PweMoeOptions) -> BuiltModel:
    model = build_pwe_model(ctx, o)
    tensors, info = ctx.load_library(PWE_ROUTER, o)
    model.load_state_dict({k: v.to(ctx.device) for k, v in tensors.items()}, strict=False)
    set_preference(model, preference_vector(o, len(ctx.experts)))
    dense = fold_preferences(model)  # a fixed preference is one dense model: no inference overhead
    return BuiltModel(
        dense, train_seconds=float(info.get("train_seconds", 0.0)),
        trainable_parameters=sum(v.numel() for v in tensors.values()),
    )  # fmt: skip


PWE_MOE = Recipe(
    name="pwe_moe",
    summary="weight-ensembling MLPs and attention whose routers map a user preference over the tasks to task-vector weights, trained on the experts' data with sampled preferences; a fixed preference folds into one dense model",
    paper="Tang et al. 2024, Towards Efficient Pareto Set Approximation via Mixture of Experts Based Model Fusion, arXiv:2406.09770; code tanganke/fusion_bench (method/pwe_moe)",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="shared",
        routing_data="expert",
        granularity="n/a",
        depth="module",
        selection="dense",
        aggregation="parameter",
        generalization="in-distribution",
        user_data="zero-shot",
    ),  # fmt: skip
    builder=None,
    model_builder=_build_pwe,
    options=PweMoeOptions,
    signatures=(PWE_ROUTER,),
)


RECIPES = [WEMOE, PWE_MOE]
