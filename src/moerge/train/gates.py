"""PHATGOOSE gate training (contributor side), as the authors do it.

For one expert, a gate vector g per adapted module, initialised at 0, scales the module's input to the LoRA per
token by σ(gᵀx); base and LoRA stay frozen and only the gates train, on the expert's own training objective:
next-token cross-entropy on the expert's *target* tokens, over the same examples, encoded and batched as the
expert was (``<bos> prompt completion <eos>``, loss on the completion; `moerge.train.data`). The gates are stored
as the expert's ``phatgoose_gates`` artifact; the router scores ⟨LN(x), LN(g)⟩/√d (`moerge.recipes`).

Where each choice comes from (Muqeeth, Liu, Liu, Raffel, ICML 2024, arXiv:2402.05859, §3: the gate is trained
after the expert, with the expert's parameters frozen, on the same data and objective; the authors' code is
github.com/r-three/phatgoose at commit 4fd5790):

- gate: ``expert_input_gate = nn.Parameter(torch.zeros(d_in))`` and ``hidden_states * sigmoid(⟨h, g⟩)``
  before the expert (``learn_input_gate="only_sigmoid"``): src/models/addons/moe.py lines 608–610, 795–801, 842;
- only the gates train, 100 steps: colm/experiments/bash_scripts/train_gate.sh line 74
  (``Model.trainable_params=".*gate.*"``, ``Trainer.num_steps=100``);
- AdamW, lr 5e-3, weight decay 0, constant schedule with 6% warmup: colm/experiments/train.gin lines 29–38
  (warmup steps ``int(num_steps * warmup_ratio)``: src/procedures/utils/optimizer_scheduler.py line 132);
- gradient clipping at 1.0: src/procedures/trainer.py line 47;
- batch: the gate command runs the expert's own single-task batcher and batch size (train_gate.sh line 74 loads
  train_single_task.gin and the dataset's .gin: P3 batch 32 × gradient accumulation 32 = 1024 examples, the
  same effective batch as the expert's training, README "Train the Corresponding Gate"). Here, by default, the
  gate uses the expert's recorded training batch size, sequence length and data seed, so its 100 batches are
  the first 100 batches the expert itself was trained on.

The paper's own text was not available offline to check these numbers against; they are the code's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from moerge.experts.expert import Expert
from moerge.routing.router import Router
from moerge.routing.selection import Selection

GATES_KIND = "phatgoose_gates"
# version 2: trained on the expert's target tokens and batches (version 1 trained on every token of whole texts)
GATES_CONFIG: dict[str, Any] = {"gate": "sigmoid_input", "objective": "expert_targets", "version": 2}


def gates_config(steps: int) -> dict[str, Any]:
    """The artifact config (cache key) of gates trained for ``steps`` steps with this module's method."""
    return {**GATES_CONFIG, "steps": steps}


class GateTrainConfig(BaseModel):
    """Gate training settings; the defaults are the authors' (see the module docstring for file and line)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=100, ge=1, description="train_gate.sh: Trainer.num_steps=100")
    lr: float = Field(default=5e-3, gt=0, description="train.gin: AdamW learning_rate = 5e-3")
    weight_decay: float = Field(default=0.0, ge=0, description="train.gin: weight_decay = 0.0")
    warmup_ratio: float = Field(
        default=0.06, ge=0, lt=1, description="train.gin: constant_with_warmup, warmup_ratio = 0.06"
    )
    grad_clip: float | None = Field(default=1.0, description="trainer.py: gradient_clipping = 1.0")
    batch_size: int | None = Field(
        default=None, ge=1, description="None: the expert's own training batch size (as the authors do)"
    )
    seq_len: int | None = Field(default=None, ge=2, description="None: the expert's own training seq_len")
    seed: int | None = Field(default=None, description="None: the expert's data seed (the same batches)")
    cache_prefix: bool = Field(
        default=True,
        description="when the expert adapts only upper decoder layers, compute the frozen layers below once per "
        "example instead of at every step (the same loss and gradients: moerge.train.prefix)",
    )
    progress: bool = False


class GateRouter(Router):
    """One expert, weighted per token by σ(⟨g, x⟩) — the gate being trained."""

    def __init__(self, gates: dict[str, torch.Tensor]):
        self.gates = gates

    def select(self, module: str, x: torch.Tensor, call) -> Selection:
        xs = x.reshape(-1, x.shape[-1])
        return Selection(torch.sigmoid(xs @ self.gates[module].to(xs.dtype))[:, None], None, "token")

    def experts_per_token(self, num_experts: int) -> float:
        return 1.0


def training_rows(examples: Iterable[Any]) -> list[Any]:
    """Rows in `moerge.train.data` form: ``{"prompt", "completion"}`` / ``{"text"}`` dicts or strings pass
    through; objects with ``as_training_row()`` (a suite's `Example`) become the row the expert was trained on."""
    return [ex.as_training_row() if hasattr(ex, "as_training_row") else ex for ex in examples]


def _expert_setting(expert: Expert, key: str, default: int) -> int:
    value = (expert.metadata.training or {}).get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def resolved_settings(expert: Expert, config: GateTrainConfig) -> dict[str, int]:
    """Batch size, sequence length and seed the gates train with (the expert's own where not set)."""
    return {
        "batch_size": config.batch_size or _expert_setting(expert, "batch_size", 8),
        "seq_len": config.seq_len or _expert_setting(expert, "seq_len", 64),
        "seed": config.seed if config.seed is not None else _expert_setting(expert, "seed", 0),
    }


def _truncated(model: torch.nn.Module, start: int):
    from contextlib import nullcontext

    from moerge.train.prefix import truncated

    return truncated(model, start) if start else nullcontext()


def train_phatgoose_gates(
    model: torch.nn.Module,
    tokenizer: Any,
    expert: Expert,
    examples: Iterable[Any],
    config: GateTrainConfig | None = None,
    library: Any = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Train ``expert``'s gate vectors on ``examples`` — the expert's training examples: ``{"prompt",
    "completion"}`` rows (loss on the completion), ``{"text"}`` rows or strings (loss on every token), or suite
    `Example` objects — with the expert's objective; returns ``{module: g [d_in]}`` and stores them in
    ``library`` (if given) under `gates_config(steps)`. The model's parameters are left exactly as they were.
    ``on_step(done, total)`` is called after each training step."""
    from moerge.model.routed import MoErgedModel, detach, inject
    from moerge.train.data import build_batches, encode_examples, load_examples
    from moerge.train.loop import run_loop

    cfg = config or GateTrainConfig()
    settings = resolved_settings(expert, cfg)
    encoded = encode_examples(tokenizer, load_examples(training_rows(examples)), settings["seq_len"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = build_batches(encoded, settings["batch_size"], cfg.steps, settings["seed"], pad_id)

    from moerge.model.expert_layer import module_dims
    from moerge.model.routed import adapted_modules

    adapted = adapted_modules(model, [expert])  # a dense expert's linear modules too
    gates = {m: torch.zeros(module_dims(model.get_submodule(m))[0], requires_grad=True) for m in adapted}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    layers, owner = inject(model, [expert])
    routed = MoErgedModel(model, layers, [expert.name], GateRouter(gates), "output", owner)
    start = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.cache_prefix:
            from moerge.train.prefix import first_layer, frozen_prefix_plan

            start = first_layer(model, adapted) or 0
            cached = frozen_prefix_plan(routed, start, batches)
            batches, start = (cached, start) if cached is not None else (batches, 0)
        with _truncated(routed, start):
            result = run_loop(
                routed,
                list(gates.values()),
                batches,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                warmup_steps=math.floor(cfg.steps * cfg.warmup_ratio),  # as get_scheduler: int(steps × ratio)
                schedule="constant",
                grad_clip=cfg.grad_clip,
                progress=cfg.progress,
                description=f"gates of {expert.name}",
                on_step=on_step,
            )
    finally:
        detach(routed)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    out = {m: v.detach().clone().contiguous() for m, v in gates.items()}
    if library is not None:
        meta = {
            **cfg.model_dump(exclude={"progress"}),
            **settings,
            "examples": len(encoded),
            "frozen_prefix_layers": start,
            "first_loss": result.first_loss,
            "final_loss": result.final_loss,
        }
        library.put_artifact(GATES_KIND, gates_config(cfg.steps), expert.name, out, meta)
    return out
