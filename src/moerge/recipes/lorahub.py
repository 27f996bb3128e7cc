"""LoraHub: a gradient-free search of one weight per expert on the target task's few examples, then one LoRA.

Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition"
(arXiv:2307.13269); official code sail-sg/lorahub @ df73afe, ``lorahub/algorithm.py``, which this recipe follows:

- **compose** (``get_score`` / ``get_final_weights``): the PEFT state dicts are summed with the weights, so A and
  B are mixed *separately*: the merged update is ΔW = s·(Σᵢ wᵢ Bᵢ)(Σᵢ wᵢ Aᵢ), with the cross terms wᵢwⱼBᵢAⱼ.
  Here that is the expert layer's ``"factor"`` aggregation with fixed weights (scaling folded into A, so
  experts of equal scaling — LoraHub requires identical adapter configs — give exactly the official update;
  experts of smaller rank are zero-padded, which the official code refuses);
- **adapt**: ``ng.p.Array(init=[0]*n, lower=-1.5, upper=1.5)``, ``ng.optimizers.NGOpt(budget=max_inference_step)``
  (default 40), minimising the few-shot loss plus ``0.05·mean|w|`` (``default_l1_regularization``), with
  ``random.seed(42)`` and ``numpy.random.seed(42)`` first (here inside a saved and restored global state);
- **loss** (``default_get_loss``): the model's mean cross-entropy per batch (all examples in one batch unless
  ``batch_size``), summed over batches and divided by the number of examples, as the official code does. The
  official code is seq2seq-only (issue #25); for causal LMs the loss is on the completion tokens of
  ``<bos> prompt completion <eos>`` (`moerge.train.data.encode_example`, as experts are trained).

``optimizer="cma"`` uses nevergrad's CMA-ES instead of NGOpt (the paper: "CMA-ES"; the code: NGOpt). The result
routes every input with the found weights (a task-level router); `merged_lora` gives the one LoRA it amounts to.
The candidates are the routed experts (the paper samples 20 of its 196 modules; ``--experts`` picks a subset);
the taxonomy record is the survey's (selection sparse: a subset of the library).
Cost: one rank-R LoRA per token (the merged one; the routed evaluation computes the same mix from the stacked
factors). Needs ``nevergrad`` (``pip install 'moerge[learned]'``).
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from moerge.errors import RecipeNotApplicableError
from moerge.experts.expert import LoraModule
from moerge.recipes.recipe import BuildContext, Recipe, RecipeOptions, Routing, Taxonomy
from moerge.routing.router import Router
from moerge.routing.selection import Selection


class LoraHubOptions(RecipeOptions):
    budget: int = Field(40, ge=1, description="objective evaluations (the official max_inference_step)")
    bound: float = Field(1.5, gt=0, description="each weight is searched in [-bound, bound]")
    l1: float = Field(0.05, ge=0, description="L1 penalty: l1 · mean |w|")
    optimizer: Literal["ngopt", "cma"] = "ngopt"
    seed: int = 42
    batch_size: int | None = Field(None, ge=1, description="examples per loss batch (None: all in one)")


class LoraHubRouter(Router):
    """The same weights for every input, mixing A and B separately (use with ``"factor"`` aggregation)."""

    granularity = "task"

    def __init__(self, weights: torch.Tensor):
        self.weights = weights.float()

    def begin_call(self, call: Any) -> None:
        call.plan["selection"] = Selection(self.weights.expand(call.batch_size, -1), None, "example")

    def state(self) -> dict[str, torch.Tensor]:  # what `moerge.train.router.trained_router` stores and loads
        return {"weights": self.weights.clone()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.weights = tensors["weights"].float()

    def experts_per_token(self, num_experts: int) -> float:
        return 1.0  # the mix is one LoRA of the experts' largest rank (`merged_lora`)


def merged_lora(experts: Sequence[Any], weights: Sequence[float]) -> dict[str, LoraModule]:
    """The one LoRA the weights amount to: per module A = Σ wᵢ sᵢ Aᵢ, B = Σ wᵢ Bᵢ (scaling sᵢ folded into A,
    ranks zero-padded), with scaling 1 (``alpha = rank``). ΔW = (Σ wᵢ Bᵢ)(Σ wᵢ sᵢ Aᵢ)."""
    modules = sorted({m for e in experts for m in e.lora})
    out = {}
    for m in modules:
        mods = [(w, e.lora[m]) for w, e in zip(weights, experts) if m in e.lora]
        r = max(lm.rank for _, lm in mods)
        first = mods[0][1]
        A = torch.zeros(r, first.d_in)
        B = torch.zeros(first.d_out, r)
        for w, lm in mods:
            A[: lm.rank] += float(w) * lm.scaling * lm.A.float()
            B[:, : lm.rank] += float(w) * lm.B.float()
        out[m] = LoraModule(A=A, B=B, alpha=float(r), fan_in_fan_out=first.fan_in_fan_out,
                            embedding=first.embedding)  # fmt: skip
    return out


def example_batches(tokenizer: Any, rows: Sequence[dict[str, str]], batch_size: int | None) -> list[tuple]:
    """``(input_ids, attention_mask, labels)`` batches of the target rows, in order (the official DataLoader
    without shuffling)."""
    from moerge.train.data import encode_example, pad_batch

    encoded = [encode_example(tokenizer, r) for r in rows]
    size = batch_size or len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(encoded), size):
        chunk = encoded[i : i + size]
        ids, labels = pad_batch([c[0] for c in chunk], [c[1] for c in chunk], pad)
        mask = torch.zeros_like(ids)
        for j, c in enumerate(chunk):
            mask[j, : len(c[0])] = 1
        out.append((ids, mask, labels))
    return out


def few_shot_loss(forward: Callable[[Any, Any], Any], batches: list[tuple], n_examples: int) -> float:
    """The official ``default_get_loss``: Σ over batches of the mean token cross-entropy, ÷ examples."""
    from moerge.train.loop import causal_lm_loss

    total = 0.0
    with torch.no_grad():
        for ids, mask, labels in batches:
            logits = forward(ids, mask)
            total += float(causal_lm_loss(logits.float(), labels.to(logits.device)))
    return total / n_examples


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """``random.seed(seed)`` and ``numpy.random.seed(seed)`` as the official code calls them, restoring both
    global states afterwards."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def search_weights(objective: Callable[[Any], float], n: int, options: LoraHubOptions) -> list[float]:
    """The official search: an ``ng.p.Array`` from 0 in [-bound, bound]ⁿ minimised by NGOpt (or CMA) within the
    budget; the recommendation's value."""
    try:
        import nevergrad as ng
    except ImportError as e:
        raise RecipeNotApplicableError(
            "recipe 'lorahub' searches its weights with nevergrad, which is not installed: "
            "pip install 'moerge[learned]' (or pip install nevergrad)"
        ) from e
    with seeded(options.seed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")  # scipy, inside NGOpt's portfolio
        instrum = ng.p.Array(init=[0.0] * n, upper=[options.bound] * n, lower=[-options.bound] * n)
        opt_cls = ng.optimizers.NGOpt if options.optimizer == "ngopt" else ng.optimizers.CMA
        optimizer = opt_cls(parametrization=instrum, budget=options.budget)
        recommendation = optimizer.minimize(objective)
    return [float(v) for v in recommendation.value]


def build_lorahub(ctx: BuildContext, options: LoraHubOptions) -> Routing:
    from moerge.model.routed import MoErgedModel
    from moerge.train.router import RouterTrainResult, data_hash, router_config, trained_router

    target = ctx.require_target()
    if not target.rows:
        raise RecipeNotApplicableError(f"recipe 'lorahub': the target data of task {target.task!r} is empty")
    ctx.require_tokenizer()
    E = len(ctx.experts)
    router = LoraHubRouter(torch.zeros(E))
    layers = {name: ctx.model.get_submodule(name) for name in ctx.modules}
    owner = next(iter(layers.values())).owner
    routed = MoErgedModel(ctx.model, layers, ctx.names, router, "factor", owner)
    device = ctx.device
    batches = [
        tuple(t.to(device) for t in b)
        for b in example_batches(ctx.tokenizer, target.rows, options.batch_size)
    ]

    def forward(ids: Any, mask: Any) -> Any:
        with routed.call(input_ids=ids, attention_mask=mask):
            return ctx.model(input_ids=ids, attention_mask=mask).logits

    calls = [0]

    def objective(w: Any) -> float:
        router.weights = torch.as_tensor(w, dtype=torch.float32)
        calls[0] += 1
        ctx.report_steps(min(calls[0], options.budget), options.budget)
        loss = few_shot_loss(forward, batches, len(target.rows))
        return loss + options.l1 * sum(abs(float(x)) for x in w) / len(w)

    router.trainable_parameters = E

    def search() -> RouterTrainResult:
        ctx.describe(f"lorahub: searching {E} weights on {len(target.rows)} examples of {target.task}")
        t0 = time.perf_counter()
        router.weights = torch.tensor(search_weights(objective, E, options), dtype=torch.float32)
        router.train_seconds = time.perf_counter() - t0
        return RouterTrainResult(steps=options.budget, seconds=router.train_seconds)

    # the found weights are cached like a trained router (keyed by options, expert set, modules and data)
    config = router_config("lorahub", options.model_dump(), ctx.experts, ctx.library, ctx.modules,
                           data_hash(target.rows))  # fmt: skip
    trained_router(ctx.library, config, router, search)  # type: ignore[arg-type]
    return Routing(router, "factor")


LORAHUB = Recipe(
    name="lorahub",
    summary="per task: one weight per expert found by a gradient-free search (nevergrad NGOpt) on the few "
    "examples, A and B mixed separately into one LoRA",
    paper="Huang et al. 2023, arXiv:2307.13269 (code: sail-sg/lorahub)",
    taxonomy=Taxonomy(
        training="standard",
        expert_data="private",
        routing_data="target",
        granularity="task",
        depth="model",
        selection="sparse",
        aggregation="parameter",
        generalization="out-of-distribution",
        user_data="few-shot",
    ),  # fmt: skip
    builder=build_lorahub,
    options=LoraHubOptions,
    needs_lora="it mixes the experts' A and B factors separately",
)

RECIPES = [LORAHUB]
