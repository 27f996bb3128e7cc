"""Prototype routers: per-module expert vectors scored against each token's input to that module (Arrow
prototypes, PHATGOOSE gates, average-activation centroids)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from moerge.errors import RecipeNotApplicableError
from moerge.routing.router import Router, Score, prototype_scores
from moerge.routing.selection import Selection, SelectionConfig, select

if TYPE_CHECKING:
    from moerge.routing.call import CallState


class PrototypeRouter(Router):
    """Per-module prototypes ``[E, d_in]`` scored against each token's input to that module.

    ``granularity="example"`` averages each example's token scores (one decision per example and module, kept
    for the tokens generated after the prompt)."""

    def __init__(
        self,
        prototypes: dict[str, torch.Tensor],
        score: Score,
        selection: SelectionConfig,
        granularity: Literal["token", "example"] = "token",
    ):
        self.prototypes = {k: v.float() for k, v in prototypes.items()}
        self.score: Score = score
        self.selection = selection
        self.granularity = granularity
        # Prototypes cast to each (module, device, dtype) met; filled once, read-only afterwards (a race
        # between threads fills the same value twice, harmlessly).
        self._cast: dict[tuple, torch.Tensor] = {}

    def _protos(self, module: str, x: torch.Tensor) -> torch.Tensor:
        p = self.prototypes.get(module)
        if p is None:
            raise RecipeNotApplicableError(
                f"no routing prototypes for module {module}; recompute the recipe's signatures for these experts"
            )
        if p.device != x.device or p.dtype != x.dtype:
            key = (module, x.device, x.dtype)
            cast = self._cast.get(key)
            if cast is None:
                cast = self._cast[key] = p.to(device=x.device, dtype=x.dtype)
            p = cast
        return p

    @property
    def tokenwise(self) -> bool:
        return self.granularity == "token"

    def select(self, module: str, x: torch.Tensor, call: CallState) -> Selection | None:
        P = self._protos(module, x)
        if self.granularity == "token":
            return select(
                prototype_scores(x.reshape(-1, x.shape[-1]), P, self.score), self.selection, "token"
            )
        stored = call.plan.setdefault("per_module", {})
        if module in stored:  # decode steps after the prompt keep the prompt's decision
            return stored[module]
        x3 = x.reshape(call.batch_size, -1, x.shape[-1])
        s = prototype_scores(x3.reshape(-1, x.shape[-1]), P, self.score).view(x3.shape[0], x3.shape[1], -1)
        mask = call.token_mask(x3.shape[1], s.dtype, s.device)
        pooled = (s * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        stored[module] = select(pooled, self.selection, "example")
        return stored[module]

    def experts_per_token(self, num_experts: int) -> float:
        return float(min(self.selection.k or num_experts, num_experts))

    def routing_flops_per_token(self, dims: dict[str, tuple[int, int]]) -> float:
        return float(sum(2 * p.shape[0] * p.shape[1] for p in self.prototypes.values()))
