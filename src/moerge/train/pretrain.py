"""Full-model training of a (tiny) base model, e.g. the synthetic suite's general model of its little world."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from moerge.train.data import DataSource, build_batches, encode_examples, load_examples
from moerge.train.loop import LoopResult, loop_settings, run_loop


class PretrainConfig(BaseModel):
    """How to train every parameter of a base model."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(300, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    seq_len: int = Field(64, ge=2)
    weight_decay: float = 0.0
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    seed: int = 0
    progress: bool = True


def pretrain_model(
    model: torch.nn.Module, tokenizer: Any, data: DataSource, config: PretrainConfig
) -> LoopResult:
    """Train all parameters of ``model`` in place on ``data`` (same data format as `train_expert`)."""
    encoded = encode_examples(tokenizer, load_examples(data), config.seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = build_batches(encoded, config.batch_size, config.steps, config.seed, pad_id)
    for p in model.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return run_loop(
            model,
            params,
            batches,
            **loop_settings(config),
            description="pretraining base",
        )
