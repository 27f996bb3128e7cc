"""Routers that need no signal from the input: fixed weights (uniform, one expert) and the task-name oracle."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from moerge.errors import RoutingError
from moerge.routing.router import Router
from moerge.routing.selection import Selection, one_hot

if TYPE_CHECKING:
    from moerge.routing.call import CallState


class FixedRouter(Router):
    """The same weights for every example: uniform over all experts, or one named expert."""

    granularity = "task"

    def __init__(self, weights: torch.Tensor):
        self.weights = weights.float()
        self.indices = (self.weights != 0).nonzero().flatten()
        self.sparse = len(self.indices) < len(self.weights)

    def begin_call(self, call: CallState) -> None:
        B = call.batch_size
        if self.sparse:
            sel = Selection(self.weights[self.indices].expand(B, -1), self.indices.expand(B, -1), "example")
        else:
            sel = Selection(self.weights.expand(B, -1), None, "example")
        call.plan["selection"] = sel

    def experts_per_token(self, num_experts: int) -> float:
        return float(len(self.indices))


class TaskNameRouter(Router):
    """Task-name oracle: each example goes to the expert(s) trained on its task (mixed batches allowed)."""

    granularity = "task"
    needs = ("task_names",)

    def __init__(self, task_to_expert: dict[str, int], fallback: Literal["error", "base"] = "error"):
        self.task_to_expert = dict(task_to_expert)
        self.fallback = fallback

    def begin_call(self, call: CallState) -> None:
        super().begin_call(call)
        idx = []
        for t in call.inputs.task_names or []:
            if t not in self.task_to_expert:
                if self.fallback == "error":
                    known = ", ".join(sorted(self.task_to_expert)) or "none"
                    raise RoutingError(
                        f"no expert for task {t!r} (known tasks: {known}); pass fallback='base'"
                    )
                idx.append(-1)
            else:
                idx.append(self.task_to_expert[t])
        call.plan["selection"] = one_hot(torch.tensor(idx, dtype=torch.long), "example")

    def experts_per_token(self, num_experts: int) -> float:
        return 1.0
