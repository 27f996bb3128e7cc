"""Contributor-side data statistics for data-aware merges: diagonal Fisher (Fisher merging) and the Gram
matrices of each linear layer's inputs (RegMean). Both are computed on the contributor's own data and shared
instead of the data; both are keyed by parameter name (``<module>.weight``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

Batch = dict[str, torch.Tensor]


def _as_batch(batch: Batch | torch.Tensor) -> Batch:
    return batch if isinstance(batch, dict) else {"input_ids": batch}


def fisher_diagonal(
    model: torch.nn.Module,
    batches: Iterable[Batch | torch.Tensor],
    *,
    labels: Literal["sampled", "empirical"] = "sampled",
    params: list[str] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of a causal LM: the mean over examples of (∇θ log p(y|x))², y sampled from the model
    (``sampled``, the true Fisher) or the data's next tokens (``empirical``). One backward pass per example."""
    named = {n: p for n, p in model.named_parameters() if params is None or n in params}
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named.items()}
    gen = torch.Generator().manual_seed(seed)
    count = 0
    was_training = model.training
    model.eval()
    for batch in batches:
        batch = _as_batch(batch)
        for i in range(batch["input_ids"].shape[0]):
            ex = {k: v[i : i + 1] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            model.zero_grad(set_to_none=True)
            logits = model(**ex).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            if labels == "sampled":
                y = torch.multinomial(
                    logp.detach().exp().reshape(-1, logp.shape[-1]), 1, generator=gen
                ).reshape(logp.shape[:-1])
            else:
                y = ex["input_ids"][:, 1:]
            mask = ex.get("attention_mask", torch.ones_like(ex["input_ids"]))[:, 1:].float()
            ll = (logp.gather(-1, y[..., None]).squeeze(-1) * mask).sum()
            ll.backward()
            for n, p in named.items():
                if p.grad is not None:
                    acc[n] += p.grad.detach().float() ** 2
            count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: a / max(count, 1) for n, a in acc.items()}


def _linear_modules(model: torch.nn.Module, modules: list[str] | None):
    out = {}
    for name, mod in model.named_modules():
        if modules is not None and name not in modules:
            continue
        if isinstance(mod, torch.nn.Linear):
            out[name] = (mod, False)
        elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # transformers GPT-2 Conv1D
            out[name] = (mod, True)
    return out


@torch.no_grad()
def gram_matrices(
    model: torch.nn.Module, batches: Iterable[Batch | torch.Tensor], *, modules: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Gᵢ = XᵀX of every linear layer's inputs over all (non-padding) tokens, keyed ``<module>.weight``.
    Returns ``(grams, fan_in_fan_out)`` where the set names weights stored ``[d_in, d_out]`` (GPT-2 Conv1D)."""
    targets = _linear_modules(model, modules)
    grams: dict[str, torch.Tensor] = {}
    current_mask: list[torch.Tensor | None] = [None]

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            if current_mask[0] is not None and current_mask[0].numel() * 1 == x.shape[0]:
                x = x[current_mask[0].reshape(-1).bool()]
            g = x.T @ x
            key = name + ".weight"
            grams[key] = grams[key] + g if key in grams else g

        return fn

    handles = [mod.register_forward_pre_hook(hook(n)) for n, (mod, _) in targets.items()]
    try:
        model.eval()
        for batch in batches:
            batch = _as_batch(batch)
            current_mask[0] = batch.get("attention_mask")
            model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
    finally:
        for h in handles:
            h.remove()
    return grams, {n + ".weight" for n, (_, fifo) in targets.items() if fifo}


def save_stats(
    tensors: dict[str, torch.Tensor],
    path: str | Path,
    kind: str,
    fan_in_fan_out: AbstractSet[str] = frozenset(),
):
    """Write statistics as safetensors (``kind`` and the fan-in-fan-out names in the header)."""
    meta = {"moerge_stats": kind, "fan_in_fan_out": json.dumps(sorted(fan_in_fan_out))}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return Path(path)


def load_stats(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None, set[str]]:
    """Read statistics written by `save_stats`: ``(tensors, kind, fan_in_fan_out names)``."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return tensors, meta.get("moerge_stats"), set(json.loads(meta.get("fan_in_fan_out", "[]")))
