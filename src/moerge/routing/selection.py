"""`Selection`: which experts each token (or example) uses and with what weights — the one thing a router
hands to the expert layers. Routers produce scores; `select` turns scores into a `Selection`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

Per = Literal["token", "example"]


@dataclass
class Selection:
    """Expert weights for ``M`` rows: tokens (``per="token"``, M = tokens of the call) or examples (``per="example"``,
    M = batch size, the same weights for every token of the example).

    ``indices`` is ``[M, k]`` (sparse: row m uses experts ``indices[m]``) or ``None`` (dense: ``weights`` is
    ``[M, E]`` and column e is expert e). ``weights`` is ``[M, k]`` float.
    """

    weights: torch.Tensor
    indices: torch.Tensor | None
    per: Per = "token"

    @property
    def rows(self) -> int:
        return self.weights.shape[0]

    @property
    def k(self) -> int:
        return self.weights.shape[1]

    def dense(self, num_experts: int) -> torch.Tensor:
        """Weights as a dense ``[M, E]`` matrix (zeros for unselected experts)."""
        if self.indices is None:
            return self.weights
        out = self.weights.new_zeros(self.rows, num_experts)
        return out.scatter_add_(1, self.indices, self.weights)

    def to(self, device: torch.device) -> Selection:
        """This selection on ``device`` (itself when already there): the one place selections are moved."""
        if self.weights.device == device and (self.indices is None or self.indices.device == device):
            return self
        idx = None if self.indices is None else self.indices.to(device)
        return Selection(self.weights.to(device), idx, self.per)

    def repeat_rows(self, times: int) -> Selection:
        """Each row repeated ``times`` times (beam search / num_return_sequences expand the batch)."""
        idx = None if self.indices is None else self.indices.repeat_interleave(times, 0)
        return Selection(self.weights.repeat_interleave(times, 0), idx, self.per)


class SelectionConfig(BaseModel):
    """Scores → weights. ``k=None`` (or k ≥ E): dense softmax over all experts; otherwise top-k with a softmax
    over the top-k scores only (equal to a softmax over all, then renormalised over the top-k, as PHATGOOSE
    does). ``temperature`` divides the scores first. ``normalize="none"`` keeps the raw top-k scores."""

    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    normalize: Literal["softmax", "none"] = "softmax"


def select(scores: torch.Tensor, config: SelectionConfig, per: Per = "token") -> Selection:
    """Turn ``[M, E]`` scores into a `Selection` (top-k sparse, or dense when k is None or ≥ E)."""
    E = scores.shape[-1]
    s = scores if config.temperature == 1.0 else scores / config.temperature
    if config.k is None or config.k >= E:
        w = torch.softmax(s, dim=-1) if config.normalize == "softmax" else s
        return Selection(w, None, per)
    top, idx = torch.topk(s, config.k, dim=-1)
    w = torch.softmax(top, dim=-1) if config.normalize == "softmax" else top
    return Selection(w, idx, per)


def one_hot(indices: torch.Tensor, per: Per = "example") -> Selection:
    """Each row uses exactly one expert (``indices`` ``[M]``) with weight 1; ``-1`` means no expert (weight 0)."""
    w = (indices >= 0).to(torch.float32)[:, None]
    return Selection(w, indices.clamp(min=0)[:, None], per)


def uniform(rows: int, num_experts: int, per: Per = "example") -> Selection:
    return Selection(torch.full((rows, num_experts), 1.0 / num_experts), None, per)


def entropy(weights: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Entropy (nats) of each row of a dense weight matrix ``[..., E]``."""
    p = weights.clamp(min=0)
    p = p / p.sum(-1, keepdim=True).clamp(min=eps)
    return -(p * (p + eps).log()).sum(-1)
