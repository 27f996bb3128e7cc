"""Several seeds: the built-in suites rebuilt with N expert-training seeds, one benchmark run each, and the
results summarised as means with 95% intervals (Student t over the seeds), the literature checks included.

    runs = run_seeds(lambda s: build_synthetic_suite(seeded(SyntheticSuiteConfig(), s)), 3, BenchConfig())
    write_seed_report(runs, "bench-out/")      # seed-<s>/ (each run's report) + report.md with intervals

Only the experts' (and the multitask LoRA's) training seeds change: the data, the base model and everything
else stay, so the intervals measure how much a method's verdict depends on the particular experts trained.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from moerge.bench.config import BenchConfig
from moerge.bench.literature import mean_interval
from moerge.bench.results import BenchResults
from moerge.errors import MoergeError

SEED_STRIDE = 1000  # seed s trains expert i with seed expert.seed + i + 1000·s (no overlap between seeds)

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def seeded(config: ConfigT, seed: int) -> ConfigT:
    """A built-in suite config whose expert and multitask training seeds are offset for ``seed`` (0: as is)."""
    if seed == 0:
        return config
    update = {}
    for part in ("expert", "multitask"):
        train = getattr(config, part, None)
        if train is None:
            raise MoergeError(f"{type(config).__name__} has no {part} training config to reseed")
        update[part] = train.model_copy(update={"seed": train.seed + SEED_STRIDE * seed})
    return config.model_copy(update=update)


def run_seeds(
    build: Callable[[int], Any],
    seeds: int | Sequence[int],
    config: BenchConfig | None = None,
    **run_kwargs: Any,
) -> list[BenchResults]:
    """``run_bench`` on ``build(seed)`` for each seed (``seeds``: a count, or the seeds themselves)."""
    from moerge.bench.runner import run_bench

    chosen = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not chosen:
        raise MoergeError("give at least one seed")
    runs = []
    for s in chosen:
        results = run_bench(build(s), config, **run_kwargs)
        results.notes.insert(0, f"expert-training seed {s}")
        runs.append(results)
    return runs


def interval_cell(values: list[float]) -> str:
    if not values:
        return "—"
    mean, half = mean_interval(values)
    return f"{mean:+.2f}" if half is None else f"{mean:+.2f} ± {half:.2f}"


def token_accuracy_rows(runs: Sequence[BenchResults]) -> tuple[list[str], list[list[str]]]:
    """The graded companion of the summary: per method and split/condition, the mean per-token accuracy on
    target tokens (exact-match tasks) ± its 95% interval over the runs."""
    from moerge.bench.report import group_title

    first = runs[0]
    groups = [(s, c) for s, c in first.groups()
              if any(t["metric"] == "exact_match" for t in first.tasks if (t["split"], t["condition"]) == (s, c))]  # fmt: skip
    header = ["method", *[group_title(f"{s}/{c}") for s, c in groups]]
    rows = []
    for m in first.methods:
        if m.kind == "single":
            continue
        row = [m.name]
        for split, cond in groups:
            means = []
            for res in runs:
                vals = [r.token_accuracy for r in res.results
                        if r.method == m.name and r.split == split and r.condition == cond and r.status == "ok"
                        and r.token_accuracy is not None]  # fmt: skip
                if vals:
                    means.append(sum(vals) / len(vals))
            row.append(interval_cell(means).lstrip("+") if len(means) == len(runs) else "n/a")
        rows.append(row)
    return header, rows


def interval_rows(runs: Sequence[BenchResults]) -> tuple[list[str], list[list[str]]]:
    """The summary table over seeds: per method its user-data mode (as in each run's table), then per
    split/condition the mean normalised quality ± the half-width of its 95% interval (raw means where
    normalisation is undefined), and the routing accuracy likewise."""
    from moerge.bench.report import METRIC_SHORT, format_user_data, group_title

    first = runs[0]
    groups = first.groups()
    header = [
        "method",
        "user data",
        *[group_title(f"{s}/{c}") for s, c in groups],
        "route acc in",
        "route acc out",
    ]
    rows = []
    for m in first.methods:
        if m.kind == "single":
            continue
        row = [m.name, format_user_data(m.user_data)]
        for split, cond in groups:
            cells = [r.group_score(m.name, split, cond) for r in runs]
            normalized = [c["value"] for c in cells if c and c["status"] == "ok" and c["normalized"]]
            if len(normalized) == len(runs):
                row.append(interval_cell(normalized))
            elif all(c and c["status"] == "ok" for c in cells):
                metrics = sorted({k for c in cells for k in c["value"]}) if not cells[0]["normalized"] else []
                row.append(" ".join(f"{METRIC_SHORT.get(k, k)} {interval_cell([c['value'][k] for c in cells]).lstrip('+')}"
                                    for k in metrics) or "mixed")  # fmt: skip
            else:
                row.append("n/a")
        for split in ("held_in", "held_out"):
            accs = []
            for res in runs:
                vals = [r.routing_accuracy for r in res.results
                        if r.method == m.name and r.split == split and r.routing_accuracy is not None]  # fmt: skip
                if vals:
                    accs.append(sum(vals) / len(vals))
            row.append(interval_cell(accs).lstrip("+") if len(accs) == len(runs) else "—")
        rows.append(row)
    return header, rows


def write_seed_report(runs: Sequence[BenchResults], folder: str | Path, plots: bool = True) -> Path:
    """Each run's report in ``seed-<i>/``; ``report.md`` with the summary and the literature checks over the
    seeds (95% intervals) and each seed's premise verdicts; ``seeds.json`` with the tables as data."""
    from moerge.bench.report import literature_checks, literature_rows, markdown_table, write_report

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, res in enumerate(runs):
        write_report(res, folder / f"seed-{i}", plots=plots)
    header, rows = interval_rows(runs)
    lh, lr = literature_rows(list(runs))
    verdicts = []
    for i, res in enumerate(runs):
        report = res.premise_report()
        if report is not None:
            verdicts += [f"- seed {i}, {r}: {report.verdict(r)}" for r in report.top1]
    lines = [
        f"# moerge bench over {len(runs)} seeds: suite `{runs[0].suite}`",
        "",
        "Each seed retrains every expert (and the multitask LoRA) with its own training seed; data and base "
        "model stay. Cells: mean over the seeds ± the half-width of the 95% interval (Student t). Quality is "
        "normalised per task (base 0, oracle 1). Each seed's full report is in `seed-<i>/report.md`.",
        "",
        "## Summary",
        "",
        markdown_table(header, rows),
        "",
        "## Graded: per-token accuracy on target tokens",
        "",
        markdown_table(*token_accuracy_rows(runs)),
        "",
        "## The literature's expected orderings",
        "",
        "The per-seed difference of mean normalised quality (first method − second), averaged over the seeds, "
        "with its 95% interval. holds: the interval lies above 0; tie: it contains 0; premise fails: the premise "
        "diagnostics say the method cannot be tested on this suite.",
        "",
        markdown_table(lh, lr),
        "",
    ]
    if verdicts:
        lines += ["## Premise diagnostics per seed", "", *verdicts, ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    (folder / "seeds.json").write_text(json.dumps(
        {"suite": runs[0].suite, "seeds": len(runs), "summary": {"header": header, "rows": rows},
         "literature": literature_checks(list(runs))}, indent=1))  # fmt: skip
    return path
