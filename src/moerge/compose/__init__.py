"""Token-level collaboration of whole models that share a tokenizer (docs/collaboration.md):

- `colm`: Co-LLM (Shen et al., ACL 2024) — a per-token deferral head on the base model picks which of two
  models writes the next token;
- `calm`: CALM (Bansal et al., ICLR 2024) — trainable cross-attention from an anchor model's layers to an
  augmenting model's layers.

Both keep the two models frozen and train only the small composing part. The layer sits between ``train/``
(its data helpers) and ``recipes/`` (whose ``co_llm`` and ``calm`` records point here)."""

from __future__ import annotations

from moerge.compose.calm import CALM, CALMConfig, CALMTrainConfig, CrossAttentionBridge, train_calm
from moerge.compose.colm import (
    CoDecoded,
    CoLLM,
    CoLLMTrainConfig,
    co_decode,
    deferral_nll,
    train_deferral,
)

__all__ = [
    "CALM",
    "CALMConfig",
    "CALMTrainConfig",
    "CoDecoded",
    "CoLLM",
    "CoLLMTrainConfig",
    "CrossAttentionBridge",
    "co_decode",
    "deferral_nll",
    "train_calm",
    "train_deferral",
]
