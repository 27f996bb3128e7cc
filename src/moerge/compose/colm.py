"""Co-LLM: a learned per-token deferral between a base model and an assistant model that share a tokenizer.

Shen, Lang, Sontag et al., "Learning to Decode Collaboratively with Multiple Language Models", ACL 2024,
arXiv:2403.03870 (official code clinicalml/co-llm, not read for this module: the paper's equations were
followed). A latent ``Z_t ∈ {base, assistant}`` picks the model that writes token ``t``:

    P(X) = Π_t [ (1 − π_t) · P_base(X_t | X_<t) + π_t · P_asst(X_t | X_<t) ],   π_t = σ(wᵀh_t + b)

with ``h_t`` the base model's last hidden state. The paper fine-tunes the base model together with the head;
here both models stay frozen and only the head trains (so one base can serve many assistants and the head is
cheap to learn), maximising that marginal likelihood on target data. Optionally the head is first fitted to
the paper's pseudo-labels (``Z_t = assistant`` where the assistant gives the true token more probability than
the base) with a binary cross-entropy (``init_steps``).

Decoding (greedy): at each step the next token is the assistant's greedy token iff ``π_t > η`` (the deferral
threshold), else the base's; ``η = 0`` always defers, ``η = 1`` never does (the comparison is made on the
logit, ``wᵀh_t + b > logit(η)``, so both ends are exact). `co_decode` reports the deferral rate.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from moerge.errors import MalformedConfigError
from moerge.train.data import IGNORE_INDEX, DataSource, load_examples, training_batches


class CoLLM(nn.Module):
    """A frozen base model, a frozen assistant and the trainable deferral head on the base's last hidden
    state. Both models must share the tokenizer (same vocabulary size)."""

    def __init__(self, base: nn.Module, assistant: nn.Module) -> None:
        super().__init__()
        vb, va = _vocab(base), _vocab(assistant)
        if vb != va:
            raise MalformedConfigError(
                f"Co-LLM needs two models with one tokenizer: the base's vocabulary has {vb} entries and the "
                f"assistant's {va}; pick an assistant trained with the base's tokenizer"
            )
        self.base = base
        self.assistant = assistant
        self.head = nn.Linear(base.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        for p in [*base.parameters(), *assistant.parameters()]:
            p.requires_grad_(False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(base_logits [B, T, V], assistant_logits [B, T, V], deferral_logits [B, T])``; position ``t``
        scores token ``t + 1``."""
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        asst = self.assistant(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits, asst.logits, self.head(out.hidden_states[-1]).squeeze(-1)


def _vocab(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])  # type: ignore[operator]


def deferral_nll(
    base_logits: torch.Tensor,
    assistant_logits: torch.Tensor,
    deferral_logits: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Mean negative log marginal likelihood per target token: ``−log[(1−π)·p_base + π·p_asst]`` of each
    ``labels[t + 1]`` (``-100`` ignored), computed in log space."""
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    safe = target.clamp(min=0).unsqueeze(-1)
    lp_b = F.log_softmax(base_logits[:, :-1].float(), -1).gather(-1, safe).squeeze(-1)
    lp_a = F.log_softmax(assistant_logits[:, :-1].float(), -1).gather(-1, safe).squeeze(-1)
    return _marginal_nll(lp_b, lp_a, deferral_logits[:, :-1].float(), mask)


def _marginal_nll(
    lp_b: torch.Tensor, lp_a: torch.Tensor, s: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    ll = torch.logaddexp(F.logsigmoid(-s) + lp_b, F.logsigmoid(s) + lp_a)
    return -(ll * mask).sum() / mask.sum().clamp(min=1)


class CoLLMTrainConfig(BaseModel):
    """How the deferral head is trained (the models stay frozen)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(200, ge=1)
    lr: float = Field(1e-2, gt=0)
    batch_size: int = Field(16, ge=1)
    seq_len: int = Field(64, ge=2)
    init_steps: int = Field(0, ge=0, description="steps of the paper's pseudo-label initialisation first")
    seed: int = 0


@dataclass
class DeferralTrainResult:
    """Losses per step (the marginal NLL; the pseudo-label steps' BCE are in ``init_losses``)."""

    losses: list[float] = field(default_factory=list)
    init_losses: list[float] = field(default_factory=list)


@torch.no_grad()
def _frozen_states(colm: CoLLM, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the frozen models contribute to one batch: the base's last hidden states, each model's log-prob of
    every target token, and the target mask — the loss then depends on the head alone."""
    out = colm.base(input_ids=x, output_hidden_states=True)
    asst = colm.assistant(input_ids=x)
    target = y[:, 1:]
    safe = target.clamp(min=0).unsqueeze(-1)
    lp_b = F.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, safe).squeeze(-1)
    lp_a = F.log_softmax(asst.logits[:, :-1].float(), -1).gather(-1, safe).squeeze(-1)
    return out.hidden_states[-1][:, :-1].float(), lp_b, lp_a, target != IGNORE_INDEX


def train_deferral(
    colm: CoLLM, tokenizer: Any, data: DataSource, config: CoLLMTrainConfig | None = None
) -> DeferralTrainResult:
    """Fit ``colm.head`` on ``data`` (prompt/completion or text rows, as `moerge train` reads them) by the
    marginal likelihood; the frozen models' per-token quantities are computed once per distinct batch."""
    config = config or CoLLMTrainConfig()
    total = config.steps + config.init_steps
    batches = training_batches(
        tokenizer, load_examples(data), config.seq_len, config.batch_size, total, config.seed
    )
    colm.base.eval()
    colm.assistant.eval()
    cache: dict[int, tuple[torch.Tensor, ...]] = {}
    opt = torch.optim.Adam(colm.head.parameters(), lr=config.lr)
    result = DeferralTrainResult()
    for step, (x, y) in enumerate(batches):
        key = hash((tuple(x.flatten().tolist()), x.shape))
        if key not in cache:
            cache[key] = _frozen_states(colm, x, y)
        h, lp_b, lp_a, mask = cache[key]
        s = colm.head(h).squeeze(-1)
        if step < config.init_steps:  # pseudo-labels: defer where the assistant is likelier on the true token
            z = (lp_a > lp_b).float()
            loss = (F.binary_cross_entropy_with_logits(s, z, reduction="none") * mask).sum() / mask.sum()
            result.init_losses.append(loss.item())
        else:
            loss = _marginal_nll(lp_b, lp_a, s, mask)
            result.losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return result


@dataclass
class CoDecoded:
    """One co-decoded completion: its text and tokens, which tokens the assistant wrote, the deferral rate."""

    text: str
    tokens: list[int]
    deferred: list[bool]

    @property
    def deferral_rate(self) -> float:
        return sum(self.deferred) / len(self.deferred) if self.deferred else 0.0


def _logit(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


def _cache_arg(model: nn.Module) -> str:
    """transformers 5.x names the KV-cache argument ``cache`` (``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def co_decode(
    colm: CoLLM,
    tokenizer: Any,
    prompts: str | Sequence[str],
    *,
    threshold: float = 0.5,
    max_new_tokens: int = 32,
    stop_at_eos: bool = True,
) -> list[CoDecoded]:
    """Greedy collaborative decoding of each prompt: the next token is the assistant's greedy token where the
    deferral probability exceeds ``threshold`` (0 = always the assistant, 1 = always the base), else the
    base's. Both models keep a KV cache and read every token, whichever model wrote it."""
    if not 0.0 <= threshold <= 1.0:
        raise MalformedConfigError(f"Co-LLM deferral threshold {threshold} is not within [0, 1]")
    cut = _logit(threshold)
    arg_b, arg_a = _cache_arg(colm.base), _cache_arg(colm.assistant)
    eos = tokenizer.eos_token_id
    out = []
    for prompt in [prompts] if isinstance(prompts, str) else prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        x = torch.tensor([ids], dtype=torch.long, device=colm.head.weight.device)
        past_b = past_a = None
        tokens: list[int] = []
        deferred: list[bool] = []
        for _ in range(max_new_tokens):
            ob = colm.base(input_ids=x, **{arg_b: past_b}, use_cache=True, output_hidden_states=True)
            oa = colm.assistant(input_ids=x, **{arg_a: past_a}, use_cache=True)
            past_b, past_a = _cache_of(ob), _cache_of(oa)
            s = float(colm.head(ob.hidden_states[-1][0, -1].float()))
            defer = s > cut
            tok = int((oa.logits if defer else ob.logits)[0, -1].argmax())
            if stop_at_eos and tok == eos:
                break
            tokens.append(tok)
            deferred.append(defer)
            x = torch.tensor([[tok]], dtype=torch.long, device=x.device)
        out.append(CoDecoded(tokenizer.decode(tokens), tokens, deferred))
    return out
