"""Training the routers of a transformers MoE (Mixtral layout, `moerge.model.moe`) on text rows: every parameter
frozen except each layer's ``mlp.gate.weight``; the loss is the language-model loss on the completions plus
``aux_weight`` × the Switch-style load-balancing loss transformers computes for Mixtral
(``output_router_logits=True``: ``load_balancing_loss_func`` over every layer's router logits, padding masked).

Batches, optimiser, warmup and clipping follow `moerge.train.router` (``router_batches``, AdamW, ``lr_lambda``);
no validation early stop (Branch-Train-MiX trains on the mixture of the experts' data for a fixed budget).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moerge.train.loop import causal_lm_loss, lr_lambda
from moerge.train.router import RouterTrainConfig, RouterTrainResult, router_batches


def router_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Each MoE layer's router weight, by parameter name."""
    return {n: p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}


def moe_loss(model: torch.nn.Module, batch: Sequence[torch.Tensor], aux_weight: float) -> torch.Tensor:
    """LM loss on the labelled tokens plus ``aux_weight`` × the load-balancing loss of the routers."""
    ids, labels, mask = batch[:3]
    out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_router_logits=aux_weight > 0)
    loss = causal_lm_loss(out.logits, labels)
    if aux_weight > 0 and out.aux_loss is not None:
        loss = loss + aux_weight * out.aux_loss.to(loss.dtype)
    return loss


def train_moe_routers(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Any],
    config: RouterTrainConfig | None = None,
    *,
    on_step: Callable[[int, int], None] | None = None,
) -> RouterTrainResult:
    """Train ``model``'s routers on ``rows`` (``{"prompt", "completion"}`` or ``{"text"}``), everything else
    frozen (left as it was found: flags and train/eval mode restored). Returns the per-step losses."""
    cfg = config or RouterTrainConfig()
    torch.manual_seed(cfg.seed)
    batches = router_batches(tokenizer, rows, cfg.batch_size, cfg.steps, cfg.seed, cfg.seq_len)
    params = router_parameters(model)
    if not params:
        raise ValueError("the model has no MoE routers (mlp.gate.weight)")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    device = next(model.parameters()).device
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = math.floor(cfg.steps * cfg.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("constant", cfg.steps, warmup))
    losses: list[torch.Tensor] = []
    start = time.perf_counter()
    try:
        model.train()
        for step, batch in enumerate(batches, 1):
            loss = moe_loss(model, [t.to(device) for t in batch], cfg.aux_weight)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if on_step is not None:
                on_step(step, len(batches))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    seconds = time.perf_counter() - start
    return RouterTrainResult(
        steps=cfg.steps, seconds=seconds, losses=torch.stack(losses).tolist() if losses else []
    )
