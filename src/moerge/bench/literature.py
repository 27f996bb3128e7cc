"""The literature's expected orderings, checked as data against one or several runs (seeds).

Each `Expectation` says that one method should score at least as well as another on a split (or one of its
conditions), cites the paper that leads us to expect it, and names the router whose premise it rests on. A
run (or N runs with different expert seeds) gives the per-seed difference of the two methods' mean normalised
quality; the verdict reads its 95% interval:

- ``holds``: the interval lies above 0 (with one run: the difference is > 0, or ≥ 0 for a ``≥`` claim);
- ``tie (holds)`` / ``tie (not shown)``: the interval contains 0 — consistent with a ``≥`` claim, no evidence
  for a ``>`` one;
- ``does not hold``: the interval lies below 0;
- ``premise fails``: the premise diagnostics say the method cannot be tested on this suite (reported whatever
  the numbers say, so a failed premise is never read as a failed method);
- ``not measured``: one of the two methods did not run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moerge.bench.results import BenchResults

# two-sided 95% Student-t critical values by degrees of freedom (1 … 30); 1.96 beyond
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]  # fmt: skip


def mean_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """``(mean, half-width of its 95% interval)`` from the Student t distribution; no interval for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, t * sd / math.sqrt(n)


@dataclass(frozen=True)
class Expectation:
    """``better`` should score at least as well as (``strict``: better than) ``worse`` on ``split`` (and
    ``condition``), as ``paper`` leads us to expect. ``premise`` names the router whose premise it rests on."""

    claim: str
    paper: str
    better: str
    worse: str
    split: str
    condition: str | None = None
    strict: bool = False
    premise: str | None = None


EXPECTATIONS: tuple[Expectation, ...] = (
    Expectation("Arrow ≥ uniform merge on held-out tasks", "Ostapenko et al. 2024, arXiv:2405.11157",
                "arrow", "uniform_merge", "held_out", premise="arrow"),
    Expectation("PHATGOOSE ≥ uniform merge on held-out tasks", "Muqeeth et al. 2024, ICML (PHATGOOSE)",
                "phatgoose", "uniform_merge", "held_out", premise="phatgoose"),
    Expectation("TIES ≥ task arithmetic held-in (both tuned)", "Yadav et al. 2023, arXiv:2306.01708, Table 1",
                "ties", "task_arithmetic", "held_in"),
    Expectation("task arithmetic ≥ averaging held-in (λ tuned)",
                "Ilharco et al. 2023, arXiv:2212.04089; Yadav et al. 2023, Table 1",
                "task_arithmetic", "uniform_merge", "held_in"),
    Expectation("per-token > per-example routing on switching inputs (Arrow)",
                "Ostapenko et al. 2024 (Arrow routes every token and layer)",
                "arrow", "arrow:granularity=example", "held_out", "switching", strict=True, premise="arrow"),
    Expectation("per-token > per-example routing on switching inputs (PHATGOOSE)",
                "Muqeeth et al. 2024 (routing varies per token and module)",
                "phatgoose", "phatgoose:granularity=example", "held_out", "switching", strict=True,
                premise="phatgoose"),
    Expectation("per-token > per-example routing on switching inputs (average activation)",
                "Muqeeth et al. 2024 (its per-token baseline)",
                "average_activation", "average_activation:granularity=example", "held_out", "switching",
                strict=True, premise="average_activation"),
    Expectation("LoRA-Flow ≥ LoraHub on held-out tasks (same few examples)",
                "Wang et al. 2024, LoRA-Flow (ACL): per-token gates beat task-level weights such as LoraHub's",
                "lora_flow", "lorahub", "held_out"),
    Expectation("a router learned on the target task's examples ≥ a zero-shot router (LoRA-Flow vs PHATGOOSE)",
                "Yadav et al. 2024, arXiv:2408.07057 (survey): target data is worth having when it exists",
                "lora_flow", "phatgoose", "held_out"),
)  # fmt: skip


def group_quality(results: BenchResults, method: str, split: str, condition: str | None) -> float | None:
    """Mean normalised quality of ``method`` over the tasks of ``split`` (and ``condition``) where it is
    defined; None when the method is absent or did not run on every one of those tasks."""
    rs = [r for r in results.results
          if r.method == method and r.split == split and (condition is None or r.condition == condition)]  # fmt: skip
    if not rs or any(r.status != "ok" for r in rs):
        return None
    defined = [r.normalized for r in rs if r.normalized is not None]
    return sum(defined) / len(defined) if defined else None


def check(
    runs: Sequence[BenchResults],
    premises: Mapping[str, str | None] | None = None,
    expectations: Sequence[Expectation] = EXPECTATIONS,
) -> list[dict[str, Any]]:
    """One row per expectation: the mean difference (better − worse) over the runs, its 95% interval, the
    number of runs, and the verdict. ``premises`` maps a router to the reason its premise fails (None: holds)."""
    premises = premises or {}
    rows = []
    for e in expectations:
        diffs = []
        for res in runs:
            a = group_quality(res, e.better, e.split, e.condition)
            b = group_quality(res, e.worse, e.split, e.condition)
            if a is not None and b is not None:
                diffs.append(a - b)
        row: dict[str, Any] = {
            "claim": e.claim, "paper": e.paper, "better": e.better, "worse": e.worse,
            "where": e.split + (f"/{e.condition}" if e.condition else ""), "runs": len(diffs),
            "difference": None, "interval": None, "verdict": "not measured", "premise": None,
            "router": e.premise,
        }  # fmt: skip
        if diffs:
            mean, half = mean_interval(diffs)
            row["difference"], row["interval"] = mean, half
            if half is None:  # one run: the sign alone
                holds = mean > 0 if e.strict else mean >= 0
                row["verdict"] = "holds" if holds else "does not hold"
            elif mean - half > 0:
                row["verdict"] = "holds"
            elif mean + half < 0:
                row["verdict"] = "does not hold"
            else:  # the interval contains 0: consistent with ≥, not evidence for >
                row["verdict"] = "tie (holds)" if not e.strict else "tie (not shown)"
        reason = premises.get(e.premise) if e.premise else None
        if reason:
            row["premise"] = reason
            row["verdict"] = "premise fails"
        rows.append(row)
    return rows


def format_difference(row: dict[str, Any]) -> str:
    if row["difference"] is None:
        return "—"
    if row["interval"] is None:
        return f"{row['difference']:+.2f} (1 run)"
    return f"{row['difference']:+.2f} ± {row['interval']:.2f} ({row['runs']} runs)"
