"""PHATGOOSE gate training (contributor side): for one expert, a gate vector v per adapted module, initialised
at 0, scales the LoRA input per token by σ(vᵀx); only the gates train (base and LoRA frozen), ~100 steps on
the expert's own data. The gates are stored as the expert's ``phatgoose_gates`` artifact."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from moerge.experts.expert import Expert
from moerge.routing.router import Router
from moerge.routing.selection import Selection

GATES_KIND = "phatgoose_gates"
GATES_CONFIG: dict[str, Any] = {"gate": "sigmoid_input", "version": 1}


def gates_config(steps: int) -> dict[str, Any]:
    """The artifact config (cache key) of gates trained for ``steps`` steps with this module's method."""
    return {**GATES_CONFIG, "steps": steps}


class GateTrainConfig(BaseModel):
    """Gate training settings (the PHATGOOSE paper: 100 steps, lr 1e-3, batch 4)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=100, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=4, ge=1)
    max_length: int = Field(default=64, ge=2)
    seed: int = 0


class GateRouter(Router):
    """One expert, weighted per token by σ(⟨v, x⟩) — the gate being trained."""

    def __init__(self, gates: dict[str, torch.Tensor]):
        self.gates = gates

    def experts_per_token(self, num_experts: int) -> float:
        return 1.0

    def select(self, module: str, x: torch.Tensor, call) -> Selection:
        xs = x.reshape(-1, x.shape[-1])
        return Selection(torch.sigmoid(xs @ self.gates[module].to(xs.dtype))[:, None], None, "token")


def train_phatgoose_gates(
    model: torch.nn.Module,
    tokenizer: Any,
    expert: Expert,
    rows: list[Any],
    config: GateTrainConfig | None = None,
    library: Any = None,
    config_key: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Train ``expert``'s gate vectors on its training ``rows`` (``{"prompt", "completion"}`` or ``{"text"}``
    or plain strings) with the causal-LM loss; returns ``{module: v [d_in]}`` and stores them in ``library``
    (if given) under ``config_key`` (default `gates_config(steps)`). The model's parameters are left as they
    were."""
    texts = [
        r if isinstance(r, str) else r.get("text", r.get("prompt", "") + r.get("completion", ""))
        for r in rows
    ]
    from moerge.model.routed import MoErgedModel, detach, inject

    cfg = config or GateTrainConfig()
    gates = {m: torch.zeros(lm.d_in, requires_grad=True) for m, lm in expert.lora.items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    layers, owner = inject(model, [expert])
    routed = MoErgedModel(model, layers, [expert.name], GateRouter(gates), "output", owner)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.train()
        opt = torch.optim.AdamW(gates.values(), lr=cfg.lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(texts), generator=g).tolist()
        stream = itertools.cycle(order)
        loss_value = float("nan")
        for _ in range(cfg.steps):
            batch = [texts[next(stream)] for _ in range(cfg.batch_size)]
            enc = tokenizer(
                batch, return_tensors="pt", padding=True, truncation=True, max_length=cfg.max_length
            )
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            loss = routed(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels
            ).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
    finally:
        detach(routed)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    out = {m: v.detach().clone().contiguous() for m, v in gates.items()}
    if library is not None:
        library.put_artifact(
            GATES_KIND,
            config_key or gates_config(cfg.steps),
            expert.name,
            out,
            {**cfg.model_dump(), "final_loss": loss_value},
        )
    return out
