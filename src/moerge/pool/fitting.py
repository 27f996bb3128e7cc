"""The small trained parts query routers share: a linear layer or one-hidden-layer MLP on the query embedding,
standardised with the routing split's statistics, trained full-batch with Adam for a fixed number of seeded
steps (a few hundred on CPU)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Standardise(nn.Module):
    """``(x − mean) / std`` with the training features' statistics (kept as buffers)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, features: torch.Tensor):
        super().__init__()
        x = features.float()
        self.register_buffer("mean", x.mean(0))
        self.register_buffer(
            "std", x.std(0, unbiased=False).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def head(features: torch.Tensor, out: int, hidden: int, *, seed: int) -> nn.Module:
    """Standardise, then a linear layer (``hidden`` 0) or Linear–GELU–Linear with ``hidden`` units."""
    torch.manual_seed(seed)  # the layers' initialisation
    d = features.shape[1]
    body: list[nn.Module] = (
        [nn.Linear(d, out)] if hidden == 0 else [nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, out)]
    )
    return nn.Sequential(Standardise(features), *body)


def train_full_batch(
    module: nn.Module, loss: Callable[[], torch.Tensor], *, steps: int, lr: float, weight_decay: float = 0.0
) -> list[float]:
    """``steps`` Adam steps on ``loss()`` (which runs ``module`` on the whole routing split); the losses."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = []
    module.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    module.eval()
    return losses
