"""CALM: composition of two frozen models through trainable cross-attention.

Bansal, Samanta, Dalmia et al., "LLM Augmented LLMs: Expanding Capabilities through Composition", ICLR 2024,
arXiv:2401.02412 (no official code was found; the paper's §3 was followed). For each chosen pair of layers
(anchor layer ``l_B``, augmenting layer ``l_A``):

    H_A' = H_A W_proj                                   (augmenting states projected to the anchor's width)
    H_B ← H_B + softmax(Q Kᵀ / √d_h) V W_O,   Q = H_B W_Q,  K = H_A' W_K,  V = H_A' W_V   (per head)

added to the output of anchor layer ``l_B`` before the next layer reads it. Only ``W_proj``, ``W_Q``,
``W_K``, ``W_V`` and ``W_O`` train. Choices of this module, where the paper leaves room: ``W_O`` starts at
zero, so the untrained composition *is* the anchor (training starts from the anchor's behaviour); the
cross-attention is causal (anchor position ``t`` reads augmenting positions ``≤ t``), so the composed model is
a proper left-to-right LM whose greedy decoding can be scored token by token; the augmenting model reads the
same token ids (the two models share a tokenizer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from moerge.errors import MalformedConfigError
from moerge.train.data import DataSource, load_examples, training_batches
from moerge.train.loop import causal_lm_loss
from moerge.train.prefix import decoder_layers, resolve_layers


class CALMConfig(BaseModel):
    """Which layers are composed (pairs in order: ``anchor_layers[i]`` reads ``augmenting_layers[i]``; ``-1`` is
    the top layer) and the cross-attention's heads. Empty lists pick every ``every``-th layer of each model,
    aligned from the top, as the paper does."""

    model_config = ConfigDict(extra="forbid")

    anchor_layers: list[int] = Field(default_factory=list)
    augmenting_layers: list[int] = Field(default_factory=list)
    every: int = Field(1, ge=1)
    num_heads: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _pairs(self) -> CALMConfig:
        if len(self.anchor_layers) != len(self.augmenting_layers):
            raise ValueError("anchor_layers and augmenting_layers must pair up (same length)")
        return self


class CrossAttentionBridge(nn.Module):
    """One composed layer pair: projection of the augmenting states, multi-head causal cross-attention from
    the anchor's states, output projection (zero at initialisation)."""

    def __init__(self, anchor_width: int, augmenting_width: int, num_heads: int) -> None:
        super().__init__()
        if anchor_width % num_heads:
            raise MalformedConfigError(
                f"CALM: {num_heads} heads do not divide the anchor width {anchor_width}"
            )
        self.num_heads = num_heads
        self.proj = nn.Linear(augmenting_width, anchor_width)
        self.q = nn.Linear(anchor_width, anchor_width, bias=False)
        self.k = nn.Linear(anchor_width, anchor_width, bias=False)
        self.v = nn.Linear(anchor_width, anchor_width, bias=False)
        self.o = nn.Linear(anchor_width, anchor_width, bias=False)
        nn.init.zeros_(self.o.weight)

    def forward(self, anchor: torch.Tensor, augmenting: torch.Tensor) -> torch.Tensor:
        """The residual update for ``anchor [B, T, D_B]`` from ``augmenting [B, T, D_A]``."""
        b, t, d = anchor.shape
        h = self.num_heads
        a = self.proj(augmenting.to(self.proj.weight.dtype))
        q = self.q(anchor.to(self.q.weight.dtype)).view(b, t, h, d // h).transpose(1, 2)
        k = self.k(a).view(b, a.shape[1], h, d // h).transpose(1, 2)
        v = self.v(a).view(b, a.shape[1], h, d // h).transpose(1, 2)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(mixed.transpose(1, 2).reshape(b, t, d)).to(anchor.dtype)


@dataclass
class _Pass:
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # anchor layer → augmenting states


class CALM(nn.Module):
    """An anchor model composed with an augmenting model (both frozen) through `CrossAttentionBridge`s.

    Calling it runs the augmenting model, then the anchor with each bridge's update added to its layer's
    output; ``logits`` are the anchor's. The anchor alone is unchanged outside a call (hooks live only
    inside `forward`)."""

    def __init__(self, anchor: nn.Module, augmenting: nn.Module, config: CALMConfig | None = None) -> None:
        super().__init__()
        config = config or CALMConfig()
        found_b, found_a = decoder_layers(anchor), decoder_layers(augmenting)
        if found_b is None or found_a is None:
            raise MalformedConfigError(
                "CALM: could not find the decoder layers of the anchor or augmenting model"
            )
        self.anchor, self.augmenting, self.config = anchor, augmenting, config
        self._anchor_layers = found_b[1]
        n_b, n_a = len(found_b[1]), len(found_a[1])
        if config.anchor_layers:
            lb = [resolve_layers([i], n_b)[0] for i in config.anchor_layers]
            la = [resolve_layers([i], n_a)[0] for i in config.augmenting_layers]
        else:  # every n-th layer from the top of each model, as many pairs as the shallower one has
            k = max(1, min(n_b, n_a) // config.every)
            lb = [n_b - 1 - i * config.every for i in range(k)][::-1]
            la = [n_a - 1 - i * config.every for i in range(k)][::-1]
        if len(set(lb)) != len(lb):
            raise MalformedConfigError(f"CALM: anchor layers {lb} repeat; compose each anchor layer once")
        self.pairs = list(zip(lb, la))
        self.bridges = nn.ModuleDict(
            {
                str(b): CrossAttentionBridge(
                    anchor.config.hidden_size, augmenting.config.hidden_size, config.num_heads
                )
                for b, _ in self.pairs
            }
        )
        for p in [*anchor.parameters(), *augmenting.parameters()]:
            p.requires_grad_(False)

    @contextlib.contextmanager
    def _hooks(self, run: _Pass) -> Iterator[None]:
        handles = []
        for b, _ in self.pairs:
            bridge = self.bridges[str(b)]

            def hook(
                module: nn.Module, args: Any, output: Any, b: int = b, bridge: nn.Module = bridge
            ) -> Any:
                hidden = output[0] if isinstance(output, tuple) else output
                hidden = hidden + bridge(hidden, run.states[b])
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            handles.append(self._anchor_layers[b].register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The composed model's logits ``[B, T, V]``."""
        with torch.no_grad():
            aug = self.augmenting(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
            )
        # hidden_states[j + 1] is the output of layer j (hidden_states[0] the embeddings); the top entry is the
        # final-normed output in transformers, the paper's "layer" representation either way
        run = _Pass({b: aug.hidden_states[a + 1] for b, a in self.pairs})
        with self._hooks(run):
            return self.anchor(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def generate_greedy(
        self, tokenizer: Any, prompts: str | Sequence[str], max_new_tokens: int = 32
    ) -> list[str]:
        """Greedy completions of each prompt (the whole prefix re-run each step: meant for small models)."""
        out = []
        for prompt in [prompts] if isinstance(prompts, str) else prompts:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if tokenizer.bos_token_id is not None:
                ids = [tokenizer.bos_token_id, *ids]
            x = torch.tensor([ids], dtype=torch.long, device=self.o_device)
            new: list[int] = []
            for _ in range(max_new_tokens):
                tok = int(self(x)[0, -1].argmax())
                if tok == tokenizer.eos_token_id:
                    break
                new.append(tok)
                x = torch.cat([x, x.new_tensor([[tok]])], dim=1)
            out.append(tokenizer.decode(new))
        return out

    @property
    def o_device(self) -> torch.device:
        return next(iter(self.bridges.values())).o.weight.device


class CALMTrainConfig(BaseModel):
    """How the bridges are trained (the two models stay frozen)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(300, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    seq_len: int = Field(64, ge=2)
    seed: int = 0


def train_calm(
    calm: CALM, tokenizer: Any, data: DataSource, config: CALMTrainConfig | None = None
) -> list[float]:
    """Train ``calm``'s bridges on the composition ``data`` (prompt/completion or text rows) by next-token
    cross-entropy on the targets; returns the loss of each step."""
    config = config or CALMTrainConfig()
    batches = training_batches(
        tokenizer, load_examples(data), config.seq_len, config.batch_size, config.steps, config.seed
    )
    calm.anchor.eval()
    calm.augmenting.eval()
    params = list(calm.bridges.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps, eta_min=config.lr * 0.1)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for x, y in batches:
            loss = causal_lm_loss(calm(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    return losses
