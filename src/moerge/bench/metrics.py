"""Metrics: pure functions over logits, labels and routing weights (exact match, NLL, routing accuracy and
entropy, traces), what a router may see of an eval batch, and peak memory of a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moerge.bench.suites.format import IGNORE_INDEX, EvalBatch, Task


def target_correct(logits, labels):
    """[B, T] bool: the argmax at ``t - 1`` equals ``labels[t]`` (False where ``labels`` is -100)."""
    import torch

    pred = logits[:, :-1].argmax(-1)
    ok = (pred == labels[:, 1:]) & (labels[:, 1:] != IGNORE_INDEX)
    return torch.cat([torch.zeros_like(ok[:, :1]), ok], dim=1)


def span_exact_match(logits, batch: EvalBatch):
    """[n_spans] float: 1.0 where every token of the span is predicted right (greedy decoding exact match)."""
    import torch

    ok = target_correct(logits, batch.labels)
    scored = batch.span >= 0
    wrong = torch.zeros(batch.n_spans, dtype=torch.long)
    wrong.index_add_(0, batch.span[scored], (~ok[scored]).long())
    return (wrong == 0).float()


def target_token_accuracy(logits, batch: EvalBatch):
    """[n_target_tokens] float: 1.0 where the argmax prediction of a target token is right (teacher forcing), in
    batch order. Its mean is the graded companion of `span_exact_match`: a span with one wrong token of five
    scores 0 in exact match and 0.8 here."""
    ok = target_correct(logits, batch.labels)
    return ok[batch.labels != IGNORE_INDEX].float()


def target_nll(logits, labels):
    """``(sum of next-token NLL over scored tokens, number of scored tokens)`` in nats."""
    import torch.nn.functional as F

    lp = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return float(lp), int((labels[:, 1:] != IGNORE_INDEX).sum())


def evaluate_task(
    model: Any, tokenizer: Any, task: Task, batch_size: int = 64, limit: int | None = None
) -> float:
    """Score a plain model on a task: mean span exact match, or mean NLL per scored token (nats)."""
    import torch

    hits, total, nll, count = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for batch in task.eval_batches(tokenizer, batch_size, experts=[], limit=limit):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            if task.metric == "exact_match":
                em = span_exact_match(logits, batch)
                hits += float(em.sum())
                total += em.numel()
            else:
                s, c = target_nll(logits, batch.labels)
                nll += s
                count += c
    if task.metric == "exact_match":
        return hits / max(1, total)
    return nll / max(1, count)


def _read_status_kb(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float | None]]:
    """Peak memory added while the block runs, in MiB: CUDA allocator peak on a GPU; on Linux CPUs the peak
    resident set size above the RSS at entry (``/proc/self/clear_refs`` resets the high-water mark);
    None elsewhere."""
    import torch

    out: dict[str, float | None] = {"mb": None}
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["mb"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return
    start = _read_status_kb("VmRSS")
    ok = False
    if start is not None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            ok = True
        except OSError:
            ok = False
    yield out
    peak = _read_status_kb("VmHWM")
    if ok and peak is not None and start is not None:
        out["mb"] = max(0.0, peak - start) / 1024


def routing_stats(weights: Any, routes: Any, labels: Any) -> dict[str, Any]:
    """Sums over target tokens of routing mass on the ground truth, entropy, and weights per expert (averaged
    over layers, and per layer: ``layer_sum`` ``[L, E]``).

    ``weights`` ``[L, B, T, E]`` (per layer), ``routes`` ``[B, T, E]`` bool (ground truth per token),
    ``labels`` ``[B, T]`` (-100 where not scored). Weights at ``t`` are compared with the label of ``t + 1``.
    """
    import torch

    from moerge.routing.selection import entropy

    L = weights.shape[0]
    w = weights[:, :, :-1].float()  # [L, B, T-1, E]
    scored = labels[:, 1:] != -100  # [B, T-1]
    truth = routes[:, 1:]  # [B, T-1, E]
    labelled = scored & truth.any(-1)
    mass = (w * truth.to(w.dtype)).sum(-1)  # [L, B, T-1]
    ent = entropy(w)  # [L, B, T-1]
    return {
        "acc_sum": float(mass[:, labelled].sum()) / L,
        "acc_n": int(labelled.sum()),
        "ent_sum": float(ent[:, scored].sum()) / L,
        "ent_n": int(scored.sum()),
        "weight_sum": w[:, scored].sum((0, 1)) / L if scored.any() else torch.zeros(w.shape[-1]),
        "weight_n": int(scored.sum()),
        "layer_sum": w[:, scored].sum(1) if scored.any() else torch.zeros(L, w.shape[-1]),  # [L, E]
    }


def routing_trace(weights: Any, batch: Any, tokenizer: Any, example: int = 0) -> dict[str, Any]:
    """Per position of one example: the predicted token, its ground-truth expert (first one, -1: none) and the
    expert with the largest mean weight over layers (-1: no weight)."""
    n = int(batch.attention_mask[example].sum())
    w = weights[:, example, : n - 1].float().mean(0)  # [n-1, E]: position t predicts token t+1
    chosen = top_expert_or_none(w)
    truth = batch.routes[example, 1:n]
    has = truth.any(-1)
    first = truth.float().argmax(-1)
    ids = batch.input_ids[example, 1:n].tolist()
    return {
        "tokens": [tokenizer.decode([i]) for i in ids],
        "truth": [int(f) if h else -1 for f, h in zip(first.tolist(), has.tolist())],
        "chosen": chosen,
        "scored": (batch.labels[example, 1:n] != -100).tolist(),
    }


def top_expert_or_none(w: Any) -> list[int]:
    """Row-wise argmax of ``[N, E]`` weights, -1 for rows without positive weight."""
    top = w.argmax(-1)
    return [int(i) if v > 0 else -1 for i, v in zip(top.tolist(), w.max(-1).values.tolist())]


def routing_view(batch: Any) -> tuple[Any, list[str]]:
    """What an example-level router may see: ``(mask [B, T], texts)`` of the unscored tokens/characters
    (prompt and segment inputs); an example with nothing unscored but ``<bos>`` is seen whole."""
    import torch

    unscored = (batch.attention_mask > 0) & (batch.labels == -100)
    nonbos = unscored.clone()
    nonbos[:, 0] = False
    whole = ~nonbos.any(1)
    mask = torch.where(whole[:, None], batch.attention_mask > 0, unscored).long()
    texts = []
    for ex in batch.examples:
        keep = [True] * len(ex.text)
        for s, e in ex.targets:
            keep[s:e] = [False] * (e - s)
        seen = "".join(c for c, k in zip(ex.text, keep) if k)
        texts.append(seen if seen.strip() else ex.text)
    return mask, texts


def label_weights(batch: Any) -> Any:
    """Ground-truth routing as weights ``[B, T, E]``: position ``t`` gets token ``t+1``'s experts, equally."""
    import torch

    r = batch.routes.float()
    shifted = torch.zeros_like(r)
    shifted[:, :-1] = r[:, 1:]
    return shifted / shifted.sum(-1, keepdim=True).clamp(min=1)
