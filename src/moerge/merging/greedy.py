"""Greedy soup (Wortsman et al. 2022): sort ingredients by held-out score, add each one to the soup only if the
held-out score of the uniform average improves. The evaluation is a callback, so it works for state dicts of
full models and for LoRA experts alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from moerge.errors import MalformedConfigError

T = TypeVar("T")


@dataclass
class GreedySoupResult(Generic[T]):
    soup: T
    chosen: list[int]  # indices into the candidates, in the order they were added
    score: float
    individual_scores: list[float]


def uniform_state_dict_average(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform soup of state dicts (float tensors averaged, others taken from the first)."""
    first = items[0]
    return {
        k: torch.stack([it[k].float() for it in items]).mean(0).to(v.dtype) if v.is_floating_point() else v
        for k, v in first.items()
    }


def greedy_soup(
    candidates: Sequence[T],
    evaluate: Callable[[T], float],
    *,
    average: Callable[[Sequence[T]], T] = uniform_state_dict_average,  # type: ignore[assignment]
    tolerance: float = 0.0,
) -> GreedySoupResult[T]:
    """Greedy soup over ``candidates`` (state dicts by default; pass ``average`` for other kinds, e.g. a LoRA
    ``linear`` merge). ``evaluate`` returns a held-out score, higher is better; an ingredient is kept when the
    score improves by more than ``tolerance``."""
    if not candidates:
        raise MalformedConfigError("greedy_soup needs at least one candidate")
    scores = [float(evaluate(c)) for c in candidates]
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    chosen = [order[0]]
    best = scores[order[0]]
    soup = candidates[order[0]]
    for i in order[1:]:
        trial = average([candidates[j] for j in chosen + [i]])
        s = float(evaluate(trial))
        if s > best + tolerance:
            chosen.append(i)
            best, soup = s, trial
    return GreedySoupResult(soup=soup, chosen=chosen, score=best, individual_scores=scores)
