"""The lean training loop shared by LoRA experts and full-model pretraining.

Batches are pre-built tensors; each step is one forward, one backward and one AdamW step. Loss values are
collected as tensors and read once at the end, so a step does nothing beyond the work itself (the progress
bar refreshes on its own timer).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moerge.train.data import IGNORE_INDEX


@dataclass
class LoopResult:
    steps: int
    seconds: float
    tokens: int
    losses: list[float] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else float("nan")

    @property
    def final_loss(self) -> float:
        """Mean of the last 10% of step losses (at least one), a less noisy end point than the last step."""
        if not self.losses:
            return float("nan")
        k = max(1, len(self.losses) // 10)
        return sum(self.losses[-k:]) / k


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts ``labels[t + 1]``; ``-100`` is ignored."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def lr_lambda(schedule: str, steps: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _progress(description: str, total: int, enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from moerge.progress import stderr_console

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),  # stdout stays the command's output
        transient=True,
        refresh_per_second=4,
    )


LOOP_SETTINGS = ("lr", "weight_decay", "warmup_steps", "schedule", "grad_clip", "progress")


def loop_settings(config: Any) -> dict[str, Any]:
    """`run_loop`'s keyword settings read off a training config (`TrainConfig`, `PretrainConfig`)."""
    return {name: getattr(config, name) for name in LOOP_SETTINGS}


def run_loop(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    grad_clip: float | None = 1.0,
    progress: bool = True,
    description: str = "training",
    on_step: Callable[[int, int], None] | None = None,
) -> LoopResult:
    """Train ``params`` of ``model`` on the pre-built ``(input_ids, labels)`` batches. A batch whose first tensor
    is floating point holds ``inputs_embeds`` (hidden states entering the first layer the model runs:
    `moerge.train.prefix`)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(schedule, len(batches), warmup_steps))
    model.train()
    losses: list[torch.Tensor] = []
    tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)  # target tokens seen
    start = time.perf_counter()
    with _progress(description, len(batches), progress) as bar:
        task = bar.add_task(description, total=len(batches)) if bar is not None else None
        for inputs, labels in batches:
            key = "inputs_embeds" if inputs.is_floating_point() else "input_ids"
            logits = model(**{key: inputs}, use_cache=False).logits
            loss = causal_lm_loss(logits, labels)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if bar is not None:
                bar.advance(task)
            if on_step is not None:
                on_step(len(losses), len(batches))
    model.eval()
    seconds = time.perf_counter() - start
    return LoopResult(
        steps=len(batches),
        seconds=seconds,
        tokens=tokens,
        losses=torch.stack(losses).tolist() if losses else [],
    )
