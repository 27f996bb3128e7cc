"""The one training path of learned routers: the base model and the experts frozen, only the router's
parameters train, on the rows a recipe is given (the target task's few-shot or full set, or the experts' own
data), with the language-model loss on the completions (plus the router's auxiliary loss, e.g. MoLE's
gating balance).

The loop follows `moerge.train.loop`'s conventions: pre-built seeded batches (``build_batches``' epoch-by-epoch
permutations), AdamW with warmup, gradient clipping, progress through ``on_step(done, total)`` (the recipes
pass `BuildContext.report_steps`), and, with validation rows, early stopping: the validation loss every
``eval_every`` steps, the best router kept, training stopped after ``patience`` evaluations without
improvement. ``gradient_checkpointing`` turns on transformers' non-reentrant activation checkpointing (routed
calls recompute with the same routing: `moerge.routing.call.checkpoint_context_fn`).

A trained router is an artifact of the library (``expert=None``: it belongs to the expert set, not to one
expert) keyed by `router_config` — recipe, options, the experts (names and file digests, in routing order),
the adapted modules and a hash of the data — so a second build loads it and trains nothing
(`trained_router`); its training seconds are recorded with it and reported again on a load.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from moerge.model.routed import (
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    supports_activation_checkpointing,
)
from moerge.routing.learned import LearnedRouter
from moerge.train.data import IGNORE_INDEX, encode_example, encode_examples, load_examples, pad_batch
from moerge.train.loop import causal_lm_loss, lr_lambda

ROUTER_KIND = "learned_router"
ROUTER_VERSION = 2  # 2: routers see the prompt only while training; MoLE's τ, SMEAR's normalised router


class RouterTrainConfig(BaseModel):
    """Router training settings (small by default, so the synthetic benchmark stays fast; recipes carry their
    papers' settings as options)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=40, ge=1)
    lr: float = Field(default=1e-2, gt=0)
    batch_size: int = Field(default=8, ge=1)
    seq_len: int = Field(default=64, ge=2)
    seed: int = 0
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    grad_clip: float | None = 1.0
    aux_weight: float = Field(default=0.0, ge=0, description="weight of the router's auxiliary loss")
    eval_every: int = Field(default=10, ge=1, description="steps between validation losses")
    patience: int | None = Field(
        default=2, ge=1, description="evaluations without improvement before stopping (None: never stop)"
    )
    gradient_checkpointing: bool = False
    progress: bool = False


@dataclass
class RouterTrainResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)  # one per evaluation
    best_step: int | None = None  # the step whose router was kept (None: the last)

    @property
    def stopped_early(self) -> bool:
        return len(self.losses) < self.steps


Batch = tuple[torch.Tensor, ...]  # input_ids, labels, attention_mask (, row labels)


def router_batches(
    tokenizer: Any, rows: Sequence[Any], batch_size: int, steps: int, seed: int, seq_len: int,
    row_labels: Sequence[int] | None = None,
) -> list[Batch]:  # fmt: skip
    """``steps`` batches of ``(input_ids, labels, attention_mask)`` (and each row's label, with ``row_labels``),
    drawn epoch by epoch from seeded permutations (as `moerge.train.data.build_batches`), right-padded."""
    examples = load_examples(list(rows))
    if row_labels is not None:  # encode one by one, so that the labels follow the rows that are kept
        if len(row_labels) != len(examples):
            raise ValueError(f"{len(row_labels)} row labels for {len(examples)} rows")
        kept = [
            (ex, lab)
            for ex, lab in zip(examples, row_labels, strict=True)
            if any(t != IGNORE_INDEX for t in encode_example(tokenizer, ex)[1][:seq_len][1:])
        ]
        examples, row_labels = [ex for ex, _ in kept], [lab for _, lab in kept]
    data = encode_examples(tokenizer, examples, seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(len(data), generator=g).tolist())
    out = []
    for s in range(steps):
        idx = order[s * batch_size : (s + 1) * batch_size]
        batch = _batch(data, idx, pad_id)
        if row_labels is not None:
            batch = (*batch, torch.tensor([row_labels[i] for i in idx]))
        out.append(batch)
    return out


def _batch(data: Any, idx: list[int], pad_id: int) -> Batch:
    ids, labels = pad_batch([data.ids[i] for i in idx], [data.labels[i] for i in idx], pad_id)
    mask = torch.zeros_like(ids)
    for j, i in enumerate(idx):
        mask[j, : len(data.ids[i])] = 1
    return ids, labels, mask


def _eval_batches(tokenizer: Any, rows: Sequence[Any], batch_size: int, seq_len: int) -> list[Batch]:
    data = encode_examples(tokenizer, load_examples(list(rows)), seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [
        _batch(data, list(range(s, min(s + batch_size, len(data)))), pad_id)
        for s in range(0, len(data), batch_size)
    ]


def _routed(model: torch.nn.Module, experts: list[Any], router: LearnedRouter, aggregation: str):
    """The routed model over ``model``'s expert layers (injected here, and detached after, if it has none)."""
    from moerge.model.expert_layer import ExpertLayer
    from moerge.model.routed import MoErgedModel, inject

    layers = {n: m for n, m in model.named_modules() if isinstance(m, ExpertLayer)}
    injected = not layers
    if injected:
        layers, owner = inject(model, experts)
    else:
        owner = next(iter(layers.values())).owner
    names = [e.name for e in experts]
    return MoErgedModel(model, layers, names, router, aggregation, owner), injected  # type: ignore[arg-type]


def router_view(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The tokens a router may see while training: each row's prompt (its unlabelled real tokens), as the
    benchmark and generation show it at inference; a row with no prompt (``{"text"}`` rows) shows all of it."""
    prompt = mask * (labels == IGNORE_INDEX).to(mask.dtype)
    return torch.where(prompt.sum(1, keepdim=True) > 0, prompt, mask)


def _loss(routed: Any, router: LearnedRouter, batch: Batch, aux_weight: float) -> torch.Tensor:
    ids, labels, mask = batch[:3]
    with routed.call(input_ids=ids, attention_mask=router_view(labels, mask)) as call:
        call.plan["train_mask"] = mask
        if len(batch) > 3:
            call.plan["row_labels"] = batch[3]
        logits = routed.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    loss = causal_lm_loss(logits, labels)
    if aux_weight:
        aux = router.aux_loss(call)
        if aux is not None:
            loss = loss + aux_weight * aux
    return loss


def train_router(
    model: torch.nn.Module,
    tokenizer: Any,
    experts: list[Any],
    router: LearnedRouter,
    rows: Sequence[Any],
    config: RouterTrainConfig | None = None,
    *,
    validation: Sequence[Any] = (),
    aggregation: str = "output",
    on_step: Callable[[int, int], None] | None = None,
    row_labels: Sequence[int] | None = None,
) -> RouterTrainResult:
    """Train ``router``'s parameters on ``rows`` (``{"prompt", "completion"}``: loss on the completion, or
    ``{"text"}``) with ``model`` and ``experts`` frozen; the model's parameters and flags are left as they
    were. With ``validation`` rows, the router with the lowest validation loss is kept (early stopping).
    ``row_labels`` (one per row: its source expert's index) reach the router as ``call.plan["row_labels"]``
    (MeteoRA's supervised gate loss). The router sees each row's prompt (`router_view`), the model the whole
    row. Sets ``router.train_seconds``; returns the losses."""
    cfg = config or RouterTrainConfig()
    torch.manual_seed(cfg.seed)
    batches = router_batches(
        tokenizer, rows, cfg.batch_size, cfg.steps, cfg.seed, cfg.seq_len, row_labels=row_labels
    )
    val = _eval_batches(tokenizer, validation, cfg.batch_size, cfg.seq_len) if validation else []
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    device = next(model.parameters()).device
    router.to(device)
    params = router.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = math.floor(cfg.steps * cfg.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("constant", cfg.steps, warmup))
    checkpointing = cfg.gradient_checkpointing and supports_activation_checkpointing(model)
    routed, injected = _routed(model, experts, router, aggregation)
    losses: list[torch.Tensor] = []
    val_losses: list[float] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    bad = 0
    start = time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if checkpointing:
            enable_activation_checkpointing(model, use_reentrant=False)
        for step, batch in enumerate(batches, 1):
            model.train()
            loss = _loss(routed, router, tuple(t.to(device) for t in batch), cfg.aux_weight)  # type: ignore[arg-type]
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if on_step is not None:
                on_step(step, len(batches))
            if val and (step % cfg.eval_every == 0 or step == len(batches)):
                v = _validation_loss(routed, router, val, device)
                val_losses.append(v)
                if best is None or v < best[0]:
                    best, bad = (v, step, router.state()), 0
                else:
                    bad += 1
                    if cfg.patience is not None and bad >= cfg.patience:
                        break
    finally:
        if checkpointing:
            disable_activation_checkpointing(model)
        if injected:
            from moerge.model.routed import detach

            detach(routed)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
        for p in params:
            p.requires_grad_(False)
    if best is not None:
        router.load_state(best[2])
        router.to(device)
    seconds = time.perf_counter() - start
    router.train_seconds = seconds
    return RouterTrainResult(
        steps=cfg.steps,
        seconds=seconds,
        losses=torch.stack(losses).tolist() if losses else [],
        val_losses=val_losses,
        best_step=best[1] if best is not None else None,
    )


@torch.no_grad()
def _validation_loss(routed: Any, router: LearnedRouter, batches: list[Batch], device: Any) -> float:
    routed.model.eval()
    total, count = 0.0, 0
    for ids, labels, mask in batches:
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with routed.call(input_ids=ids, attention_mask=router_view(labels, mask)):
            logits = routed.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total += float(causal_lm_loss(logits, labels)) * n
        count += n
    return total / max(count, 1)


def data_hash(*row_sets: Sequence[Any]) -> str:
    """A digest of the training (and validation) rows: a changed example changes the router's cache key."""
    h = hashlib.sha256()
    for rows in row_sets:
        h.update(
            json.dumps([r if isinstance(r, (dict, str)) else str(r) for r in rows], sort_keys=True).encode()
        )
        h.update(b"\x00")
    return h.hexdigest()[:32]


def router_config(
    recipe: str, options: dict[str, Any], experts: list[Any], library: Any, modules: Sequence[str], data: str
) -> dict[str, Any]:
    """The cache key of a trained router: recipe, options, expert set (names and file digests, in routing
    order), adapted modules and the data hash."""
    digest = getattr(library, "expert_digest", None)
    names = [e.name for e in experts]
    return {
        "recipe": recipe,
        "version": ROUTER_VERSION,
        "options": options,
        "experts": names,
        "expert_digests": [digest(n) if digest is not None and n in library else None for n in names],
        "modules": hashlib.sha256("\n".join(modules).encode()).hexdigest()[:16],
        "data": data,
    }


def trained_router(
    library: Any,
    config: dict[str, Any],
    router: LearnedRouter,
    train: Callable[[], RouterTrainResult],
) -> tuple[LearnedRouter, bool]:
    """``router`` with the parameters stored under ``config`` in ``library`` (and its recorded training
    seconds), or trained by ``train()`` and stored. Returns ``(router, loaded)``."""
    if library is not None:
        got = library.get_artifact(ROUTER_KIND, config, None)
        if got is not None:
            tensors, info = got
            router.load_state(tensors)
            router.train_seconds = float(info.get("train_seconds", 0.0))
            return router, True
    result = train()
    if library is not None:
        info = {
            "train_seconds": result.seconds,
            "trainable_parameters": router.trainable_parameters,
            "steps_run": len(result.losses),
            "first_loss": result.losses[0] if result.losses else None,
            "final_loss": result.losses[-1] if result.losses else None,
            "val_losses": result.val_losses,
            "best_step": result.best_step,
        }
        library.put_artifact(ROUTER_KIND, config, None, router.state(), info)
    return router, False
