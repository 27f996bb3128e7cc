"""Reports of a benchmark run: a rich table in the terminal, ``results.json``, and a Markdown report with plots
(quality per task and method, quality against cost, routing heatmaps of the routed recipes).

    from moerge.bench.report import print_table, write_report
    print_table(results)
    folder = write_report(results, "bench-out/")     # results.json, report.md, *.png
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from moerge.bench.results import BenchResults

GROUP_TITLES = {
    "held_in/in_distribution": "held-in",
    "held_out/switching": "switching",
    "held_out/composition": "composition",
    "held_out/unrelated": "unrelated",
    "held_out/out_of_distribution": "held-out",
}
METRIC_SHORT = {"exact_match": "EM", "nll": "nll"}


# ---------------------------------------------------------------------------------------------- cell formatting
def group_title(key: str) -> str:
    return GROUP_TITLES.get(key, key.replace("held_out/", "").replace("held_in/", "in:"))


def format_group(cell: dict[str, Any] | None) -> str:
    """A split/condition cell: the mean normalised score (base 0, oracle 1), or raw means per metric."""
    if cell is None:
        return "—"
    if cell["status"] != "ok":
        return "n/a" if cell["status"] == "not_applicable" else "error"
    v = cell["value"]
    if cell["normalized"]:
        return f"{v:+.2f}"
    return " ".join(f"{METRIC_SHORT.get(k, k)}\u00a0{x:.2f}" for k, x in v.items())  # NBSP: kept together


def _fmt(v: float | None, spec: str = ".2f", none: str = "—") -> str:
    return none if v is None else format(v, spec)


def format_flops(v: float | None) -> str:
    if v is None:
        return "—"
    if v == 0:
        return "0"
    if v >= 1e6:
        return f"{v / 1e6:.1f}M"
    return f"{v / 1e3:.1f}k"


def format_user_data(v: str | None) -> str:
    """``zero-shot`` → ``zero``, ``few-shot 20`` → ``few 20``, ``full``; ``—`` for reference baselines."""
    if not v:
        return "—"
    return v.replace("zero-shot", "zero").replace("few-shot", "few")


def format_count(v: int | None) -> str:
    if v is None:
        return "—"
    if v >= 1e6:
        return f"{v / 1e6:.1f}M"
    return f"{v / 1e3:.1f}k" if v >= 1e4 else str(v)


def table_rows(results: BenchResults) -> tuple[list[str], list[list[str]], list[str]]:
    """``(header, rows, footnotes)`` of the summary table (shared by the terminal and Markdown tables)."""
    summary = results.summary()
    groups = [f"{s}/{c}" for s, c in results.groups()]
    header = ["method", "user data", *[group_title(g) for g in groups], "route acc in", "route acc out", "route H",
              "expert FLOPs/tok", "train s", "train params", "eval s", "peak MiB", "held-out rank"]  # fmt: skip
    rows, notes = [], []
    for row in summary:
        name = row["method"]
        failed = [
            (r.task, r.reason) for r in results.results if r.method == name and r.status != "ok" and r.reason
        ]
        reasons = grouped_reasons(failed)
        if row["status"] != "ok" and row.get("reason") and not any(row["reason"] == r for _, r in reasons):
            reasons.append(([], row["reason"]))
        mark = ""
        for tasks, reason in reasons:
            where = f" on {', '.join(tasks)}" if len(tasks) > 1 else ""
            notes.append(f"[{len(notes) + 1}] {name}{where}: {reason}")
            mark += f"[{len(notes)}]"
        rows.append([
            name + (f" {mark}" if mark else ""),
            format_user_data(row.get("user_data")),
            *[format_group(row.get(g)) for g in groups],
            _fmt(row["routing_acc/held_in"]),
            _fmt(row["routing_acc/held_out"]),
            _fmt(row["routing_entropy"]),
            format_flops(row["expert_flops_per_token"]),
            _fmt(row.get("router_train_s"), ".1f"),
            format_count(row.get("trainable_parameters")),
            _fmt(row["eval_s"], ".1f"),
            _fmt(row["peak_memory_mb"], ".0f"),
            str(row.get("held_out_rank", "")),
        ])  # fmt: skip
    return header, rows, notes


def grouped_reasons(failed: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """One footnote per reason, however many tasks gave it: reasons that differ only by the task they name are
    one reason about "the task", with those tasks listed (``[(tasks, reason)]``, sorted by reason; ``tasks`` is
    empty where the reason names no task)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for task, reason in failed:
        members = groups.setdefault(_generic(task, reason), [])
        if task not in [t for t, _ in members]:
            members.append((task, reason))
    out = []
    for key, ms in groups.items():
        named = any(_generic(t, r) != r for t, r in ms)
        out.append(([t for t, _ in ms] if named else [], key if len(ms) > 1 else ms[0][1]))
    return sorted(out, key=lambda x: x[1])


def _generic(task: str, reason: str) -> str:
    """``reason`` with the task's name (as a whole word) replaced by "the task"."""
    import re

    return re.sub(rf"(?<![\w-]){re.escape(task)}(?![\w-])", "the task", reason) if task else reason


def legend(results: BenchResults) -> str:
    base = {r.task: r for r in results.results if r.method == "base"}
    unrelated = [t for t in results.tasks if t["condition"] == "unrelated"]
    parts = [
        "Quality columns: mean over the condition's tasks of (score − base) / (oracle − base), so the base model "
        "is 0 and the oracle (each target token predicted by its ground-truth expert) is 1; where the oracle does "
        "not beat the base (no expert applies) the raw mean is shown instead (EM = exact-match accuracy, higher is better; nll = nats per target token, lower is better).",
    ]
    if unrelated:
        shown = ", ".join(
            f"{t['name']} {METRIC_SHORT.get(t['metric'], t['metric'])} {base[t['name']].score:.3f}"
            for t in unrelated
            if t["name"] in base and base[t["name"]].score is not None
        )
        if shown:
            parts.append(f"Base model on the unrelated tasks (the floor): {shown}.")
    parts.append(
        "user data: the target-task data a method was given (zero = zero-shot; few N = N labelled examples of each "
        "task, built and evaluated per task; full = the task's whole target split). train s / train params: its "
        "router's training (or weight-search) time per build and trainable parameters (0 for zero-shot routers). "
        "held-out rank: routed recipes ordered by their mean normalised score over the held-out tasks where it "
        "is defined. route acc: mean routing weight on the ground-truth expert(s) of each target token; route H: mean "
        "entropy of the routing weights (nats)."
    )
    return " ".join(parts)


def condition_ranking(results: BenchResults) -> dict[str, list[tuple[str, float, str]]]:
    """Per held-out condition, the routed recipes that ran on all its tasks, best first:
    ``(method, value, what)`` with ``what`` = ``normalized`` (mean normalised quality) or ``gain vs base``
    (mean of score − base for accuracy and base − score for NLL, where normalisation is undefined)."""
    base = {r.task: r for r in results.results if r.method == "base" and r.status == "ok"}
    out: dict[str, list[tuple[str, float, str]]] = {}
    for split, cond in results.groups():
        if split != "held_out":
            continue
        ranked = []
        for m in results.methods:
            if m.kind != "recipe":
                continue
            rs = [
                r for r in results.results if r.method == m.name and r.split == split and r.condition == cond
            ]
            if not rs or any(r.status != "ok" for r in rs):
                continue
            if all(r.normalized is not None for r in rs):
                ranked.append((m.name, sum(r.normalized for r in rs) / len(rs), "normalized"))
            elif all(r.task in base for r in rs):
                gains = [
                    (r.score - base[r.task].score)
                    if r.metric == "exact_match"
                    else (base[r.task].score - r.score)
                    for r in rs
                ]
                ranked.append((m.name, sum(gains) / len(gains), "gain vs base"))
        out[cond] = sorted(ranked, key=lambda x: -x[1])
    return out


# ---------------------------------------------------------------------------------------------- premise, literature
def literature_checks(runs: list[BenchResults]) -> list[dict[str, Any]]:
    """The literature's expected orderings checked against these runs (`moerge.bench.literature.check`), with
    the premise verdicts of the runs: a router untestable on the suite marks its rows ``premise fails``; one
    whose premise fails for some experts gets that said beside the verdict."""
    from moerge.bench.literature import check

    premises: dict[str, str] = {}
    partial: dict[str, str] = {}
    for res in runs:
        for router, why in res.untestable().items():
            premises.setdefault(router, why)
        report = res.premise_report()
        if report is not None:
            for router in report.top1:
                failing = report.failing_experts(router)
                if failing and router not in premises:
                    partial.setdefault(router, f"premise fails for {len(failing)} of {len(report.experts)} experts "
                                               f"({', '.join(failing)})")  # fmt: skip
    rows = check(runs, premises)
    for row in rows:
        if row["premise"] is None and row["router"] in partial:
            row["premise_note"] = partial[row["router"]]
    return rows


def literature_rows(runs: list[BenchResults]) -> tuple[list[str], list[list[str]]]:
    """The literature checks as a table: claim (paper), where, difference (95% interval), verdict."""
    from moerge.bench.literature import format_difference

    header = ["expected (paper)", "where", "difference (95% interval)", "verdict"]
    rows = []
    for r in literature_checks(runs):
        verdict = r["verdict"] + (f": {r['premise']}" if r["premise"] else "")
        if r.get("premise_note"):
            verdict += f" ({r['premise_note']})"
        rows.append([f"{r['claim']} ({r['paper']})", r["where"], format_difference(r), verdict])
    return header, rows


def premise_lines(results: BenchResults) -> list[str]:
    """The premise section: per expert, selectivity and each router's open-loop top-1; one verdict per router."""
    from moerge.bench.premise import format_premise

    report = results.premise_report()
    if report is None:
        return []
    return [
        "## Do the routers' premises hold on this suite?",
        "",
        "Per expert, on its own training data: **selectivity** (‖ΔW_e x‖² on the expert's own target tokens ÷ on "
        "the other experts' tokens, geometric mean over modules; Arrow assumes it well above 1) and each zero-shot "
        "router's **open-loop top-1** (the share of the expert's tokens whose best-scoring signature is its own, "
        f"no expert applied; chance {report.chance:.2f}). A method whose premise fails is not tested by this suite: "
        "its numbers say nothing about the method (`moerge.bench.premise`).",
        "",
        format_premise(report),
        "",
    ]


# ---------------------------------------------------------------------------------------------- terminal
# Short headers (used with a legend when the full ones do not fit) and the order in which columns are left out
# on a narrow terminal (lowest first; `moerge.tables`). Quality columns and the method are always shown.
SHORT_HEADERS = {"held-in": "in", "switching": "switch", "composition": "comp", "unrelated": "unrel",
                 "held-out": "out", "route acc in": "acc in", "route acc out": "acc out", "route H": "H",
                 "expert FLOPs/tok": "FLOPs", "eval s": "s", "peak MiB": "MiB", "held-out rank": "rank",
                 "user data": "data", "train s": "train", "train params": "params"}  # fmt: skip
DROP_ORDER = {"peak MiB": 1, "eval s": 2, "route H": 3, "train params": 4, "held-out rank": 5, "route acc in": 6,
              "train s": 7, "expert FLOPs/tok": 8, "route acc out": 9, "user data": 10}  # fmt: skip


def summary_table(results: BenchResults) -> Any:
    """The summary as a `moerge.tables.Table` (baselines and recipes in separate sections; footnotes below)."""
    from moerge.tables import Column, Table

    header, rows, notes = table_rows(results)
    columns = [Column(h, short=SHORT_HEADERS.get(h), right=i > 0, drop=DROP_ORDER.get(h))
               for i, h in enumerate(header)]  # fmt: skip
    table = Table(
        f"moerge bench · suite {results.suite} · {len(results.experts)} experts", columns, notes=notes
    )
    kinds = {m.name: m.kind for m in results.methods}
    previous = None
    for row in rows:
        kind = kinds.get(row[0].split(" [")[0])
        table.add_row(*row, section=previous is not None and kind != previous)
        previous = kind
    return table


def literature_table(runs: list[BenchResults], title: str) -> Any:
    from moerge.tables import Column, Table

    header, rows = literature_rows(runs)
    table = Table(title, [Column(h) for h in header])
    for row in rows:
        table.add_row(*row)
    return table


def print_table(results: BenchResults, console: Any = None, *, wide: bool = False) -> None:
    """Print the summary table, its footnotes and legend, the premise verdicts and the literature's orderings:
    fitted to the terminal's width (``wide``: every column), Markdown when not a terminal (`moerge.tables`)."""
    from rich.console import Console
    from rich.text import Text

    from moerge.tables import render

    console = console or Console()
    terminal = console.is_terminal

    def say(text: str, style: str = "", indent: int = 0) -> None:
        if terminal:
            from rich.padding import Padding

            console.print(Padding(Text(text, style=style), (0, 0, 0, indent)), highlight=False)
        else:
            console.out(" " * indent + text, highlight=False)

    render(summary_table(results), console, wide=wide)
    say(legend(results), "dim")
    report = results.premise_report()
    if report is not None:
        from moerge.bench.premise import ROUTER_LABELS

        say("")
        say("premise diagnostics (moerge.bench.premise):", "bold")
        for r in report.top1:
            say(f"{ROUTER_LABELS.get(r, r)}: {report.verdict(r)}", indent=2)
    say("")
    render(
        literature_table([results], "the literature's expected orderings, on this run"), console, wide=wide
    )


# ---------------------------------------------------------------------------------------------- files
def write_json(results: BenchResults, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results.model_dump(mode="json"), indent=1))
    return path


def load_results(path: str | Path) -> BenchResults:
    return BenchResults.model_validate_json(Path(path).read_text())


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\u00a0", " ")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def per_task_table(results: BenchResults) -> tuple[list[str], list[list[str]]]:
    tasks = results.tasks
    header = ["method", *[f"{t['name']} ({METRIC_SHORT.get(t['metric'], t['metric'])})" for t in tasks]]
    rows = []
    for m in results.methods:
        if m.kind == "single":
            continue
        row = [m.name]
        for t in tasks:
            r = results.result(m.name, t["name"])
            if r is None:
                row.append("—")
            elif r.status != "ok":
                row.append("n/a" if r.status == "not_applicable" else "error")
            else:
                row.append(f"{r.score:.3f}" + (f" ({r.normalized:+.2f})" if r.normalized is not None else ""))
        rows.append(row)
    ceil = ["ceiling"] + [_fmt(t.get("ceiling"), ".3f") for t in tasks]
    return header, [*rows, ceil]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def write_report(results: BenchResults, folder: str | Path, plots: bool = True) -> Path:
    """Write ``results.json``, ``report.md``, ``report.html`` (`moerge.bench.html_report`) and the plots into
    ``folder``; returns the Markdown report's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(results, folder / "results.json")
    header, rows, notes = table_rows(results)
    th, tr = per_task_table(results)
    figures: dict[str, Any] = {}
    if plots:
        figures = write_plots(results, folder)
    env = results.environment
    lines = [
        f"# moerge bench: suite `{results.suite}`",
        "",
        f"{len(results.experts)} experts ({', '.join(results.experts)}), {len(results.tasks)} tasks, "
        f"{len([m for m in results.methods if m.kind != 'single'])} methods; "
        f"{results.wall_s:.1f} s wall; torch {env.get('torch')} on {env.get('device')} "
        f"with {env.get('threads')} threads.",
        "",
        "## Summary",
        "",
        markdown_table(header, rows),
        "",
        *[f"{n}  " for n in notes],
        "",
        legend(results),
        "",
        "## Per task",
        "",
        "Score (exact match, or nll in nats per target token) and, in brackets, normalised quality.",
        "",
        markdown_table(th, tr),
        "",
    ]
    lines += premise_lines(results)
    lh, lr = literature_rows([results])
    lines += ["## The literature's expected orderings", "",
              "Each row: the difference of mean normalised quality (first method − second) where the paper leads us "
              "to expect it ≥ 0 (> 0 for per-token vs per-example routing). One run gives no interval: "
              "`moerge bench --seeds N` retrains the experts with N seeds and reports 95% intervals.", "",
              markdown_table(lh, lr), ""]  # fmt: skip
    ranking = condition_ranking(results)
    if ranking:
        lines += ["## Routed recipes ranked on each held-out condition", ""]
        for cond, items in ranking.items():
            shown = (
                ", ".join(f"{i}. {n} ({v:+.3f})" for i, (n, v, _) in enumerate(items, start=1)) or "none ran"
            )
            what = items[0][2] if items else ""
            lines.append(f"- **{cond}** ({what}): {shown}")
        lines.append("")
    if "quality" in figures:
        lines += ["## Quality per task and method", "", f"![quality]({figures['quality']})", ""]
    if "cost" in figures:
        lines += ["## Quality against cost", "", f"![quality vs cost]({figures['cost']})", ""]
    if figures.get("trace"):
        lines += ["## Routing along one sequence", "",
                  "The first example of a switching task: per predicted token, the ground-truth expert (top row) "
                  "and, for each routed method, the expert with the largest mean weight over layers.", "",
                  f"![routing trace]({figures['trace']})", ""]  # fmt: skip
    if figures.get("routing"):
        lines += ["## Routing", "",
                  "Mean routing weight per task (rows) and expert (columns) over target tokens and layers.", ""]  # fmt: skip
        for name, path in figures["routing"].items():
            lines += [f"### {name}", "", f"![routing {name}]({path})", ""]
    lines += ["## Methods", "", "| method | kind | what | taxonomy | status |", "|---|---|---|---|---|"]
    for m in results.methods:
        if m.kind == "single":
            continue
        tax = ", ".join(f"{k}={v}" for k, v in (m.taxonomy or {}).items())
        what = (m.description or "").replace("|", "\\|")
        status = m.status + (f": {m.reason}" if m.reason else "")
        lines.append(f"| {m.name} | {m.kind} | {what} | {tax} | {status.replace('|', '/')} |")
    if results.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in results.notes]]
    lines += ["", "Configuration:", "", "```json", json.dumps(results.config, indent=1), "```", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    from moerge.bench.html_report import write_html

    write_html(results, folder / "report.html")
    return path


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(results: BenchResults, folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["quality"] = plot_quality(results, folder / "quality.png").name
    out["cost"] = plot_cost(results, folder / "quality_vs_cost.png").name
    trace = plot_trace(results, folder / "routing_trace.png")
    if trace is not None:
        out["trace"] = trace.name
    out["routing"] = {}
    for m in results.methods:
        if m.routed and m.status == "ok":
            p = plot_routing(results, m.name, folder / f"routing_{_slug(m.name)}.png")
            if p is not None:
                out["routing"][m.name] = p.name
    return out


def plot_quality(results: BenchResults, path: Path) -> Path:
    """Heatmap methods × tasks: colour = normalised quality (clipped to [-1, 1.5]); text = raw score."""
    import numpy as np

    plt = _plt()
    methods = [m.name for m in results.methods if m.kind != "single"]
    tasks = [t["name"] for t in results.tasks]
    val = np.full((len(methods), len(tasks)), np.nan)
    txt = [["" for _ in tasks] for _ in methods]
    for i, m in enumerate(methods):
        for j, t in enumerate(tasks):
            r = results.result(m, t)
            if r is None or r.status != "ok":
                txt[i][j] = "n/a"
                continue
            txt[i][j] = f"{r.score:.2f}"
            if r.normalized is not None:
                val[i, j] = max(-1.0, min(1.5, r.normalized))
    fig, ax = plt.subplots(figsize=(1.5 + 0.75 * len(tasks), 1.0 + 0.36 * len(methods)))
    im = ax.imshow(np.ma.masked_invalid(val), aspect="auto", cmap="RdYlGn", vmin=-1, vmax=1.5)
    for i in range(len(methods)):
        for j in range(len(tasks)):
            ax.text(j, i, txt[i][j], ha="center", va="center", fontsize=6)
    metric = {t["name"]: METRIC_SHORT.get(t["metric"], t["metric"]) for t in results.tasks}
    ax.set_xticks(
        range(len(tasks)), [f"{t}\n{metric[t]}" for t in tasks], fontsize=7, rotation=45, ha="right"
    )
    ax.set_yticks(range(len(methods)), methods, fontsize=7)
    ax.set_title("quality per task (text: raw score; colour: normalised, base 0 / oracle 1; grey: undefined)",
                 fontsize=8)  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cost(results: BenchResults, path: Path) -> Path:
    """Mean normalised quality (held-in and held-out) against expert FLOPs per token, one numbered point per
    method; the numbers are explained in a legend beside the plots (labels on the points would overlap)."""
    plt = _plt()
    methods = [m for m in results.methods if m.kind != "single" and m.expert_flops_per_token is not None]
    number = {m.name: i for i, m in enumerate(methods, start=1)}
    colours = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=False)
    for ax, split in zip(axes, ("held_in", "held_out")):
        points: list[tuple[float, float, int]] = []
        for m in methods:
            rs = [
                r
                for r in results.results
                if r.method == m.name and r.split == split and r.normalized is not None
            ]
            if not rs or any(r.status != "ok" for r in rs):
                continue
            y = sum(r.normalized for r in rs) / len(rs)
            x = m.expert_flops_per_token
            i = number[m.name]
            ax.scatter([x], [y], marker="o" if m.kind == "recipe" else "s", s=30, color=colours((i - 1) % 20))
            points.append((x, y, i))
        ax.set_xscale("symlog", linthresh=1e4, linscale=0.5)
        _number_points(ax, points)
        ax.set_xlabel("expert FLOPs per token (0 = merged into the weights)")
        ax.set_ylabel("mean normalised quality")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axhline(1, color="grey", lw=0.5, ls="--")
        ax.set_title(split.replace("_", "-") + (" (tasks where the oracle differs from the base)" if split == "held_out" else ""),
                     fontsize=8)  # fmt: skip
    handles = [
        plt.Line2D([], [], ls="", marker="o" if m.kind == "recipe" else "s", color=colours((i - 1) % 20))
        for i, m in enumerate(methods, start=1)
    ]
    fig.legend(handles, [f"{number[m.name]}  {m.name}" for m in methods], fontsize=6.5, loc="center right",
               frameon=False, title="■ baseline  ● recipe", title_fontsize=7)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 0.77, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _number_points(ax: Any, points: list[tuple[float, float, int]], radius_px: float = 12.0) -> None:
    """Write each point's number beside it; points closer than ``radius_px`` on screen share one label
    ("4,5,19") so that no two labels are drawn over each other."""
    ax.get_xlim(), ax.get_ylim()  # settle the limits, so the data-to-screen transform is final
    groups: list[tuple[tuple[float, float], tuple[float, float], list[int]]] = []
    for x, y, i in points:
        px, py = ax.transData.transform((x, y))
        for (gx, gy), _, numbers in groups:
            if abs(gx - px) < radius_px * 2.5 and abs(gy - py) < radius_px:
                numbers.append(i)
                break
        else:
            groups.append(((px, py), (x, y), [i]))
    for _, xy, numbers in groups:
        ax.annotate(",".join(map(str, numbers)), xy, fontsize=7, xytext=(4, 2), textcoords="offset points")


# Colours of the experts in the routing trace: tab20 without its greys (a grey expert reads as "no expert",
# which is drawn white and named in the legend).
TRACE_COLOURS = [c for i, c in enumerate(
    ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd", "#c5b0d5",
     "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5"]
) if i not in (14, 15)]  # fmt: skip
TRACE_COLOURS = TRACE_COLOURS[0::2] + TRACE_COLOURS[1::2]  # the strong colours first


def plot_trace(results: BenchResults, path: Path) -> Path | None:
    """One switching example (else the first held-out task with labels): ground truth and each routed method's
    top expert per predicted token, as colour strips."""
    import numpy as np

    plt = _plt()
    tasks = [t for t in results.tasks if t["condition"] == "switching"] or [
        t for t in results.tasks if t["split"] == "held_out" and t["experts"]
    ]
    if not tasks:
        return None
    task = tasks[0]["name"]
    rows = [(m.name, results.result(m.name, task)) for m in results.methods if m.routed and m.status == "ok"]
    rows = [(n, r) for n, r in rows if r is not None and r.trace]
    if not rows:
        return None
    first = rows[0][1].trace
    E = len(results.experts)
    mat = [first["truth"]] + [r.trace["chosen"] for _, r in rows]
    labels = ["ground truth"] + [n for n, _ in rows]
    width = min(len(x) for x in mat)
    data = np.array([x[:width] for x in mat], dtype=float)
    data[data < 0] = np.nan
    from matplotlib.colors import ListedColormap

    palette = [TRACE_COLOURS[i % len(TRACE_COLOURS)] for i in range(E)]
    cmap = ListedColormap(palette).with_extremes(bad="white")
    fig, ax = plt.subplots(figsize=(2.0 + 0.22 * width, 1.3 + 0.3 * len(labels)))
    ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=-0.5, vmax=E - 0.5,
              interpolation="nearest")  # fmt: skip
    toks = [t if t.strip() else "␣" for t in first["tokens"][:width]]
    ax.set_xticks(range(width), toks, fontsize=7)
    for j, scored in enumerate(first["scored"][:width]):
        if scored:
            ax.get_xticklabels()[j].set_fontweight("bold")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[i]) for i in range(E)]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", lw=0.5))
    ax.legend(handles, [*results.experts, "no expert"], fontsize=6, ncol=min(E + 1, 5), loc="upper center",
              bbox_to_anchor=(0.5, -0.12), frameon=False)  # fmt: skip
    ax.set_title(
        f"{task}, first example: expert per predicted token (bold: scored; white: no expert)", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_routing(results: BenchResults, method: str, path: Path) -> Path | None:
    """Heatmap tasks × experts of the mean routing weight, with each task's ground-truth experts outlined."""
    import numpy as np

    plt = _plt()
    rows = [r for r in results.results if r.method == method and r.mean_weights is not None]
    if not rows:
        return None
    E = len(results.experts)
    mat = np.array([r.mean_weights for r in rows])
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * E, 1.0 + 0.32 * len(rows)))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-6, float(mat.max())))
    truth = {t["name"]: t["experts"] for t in results.tasks}
    for i, r in enumerate(rows):
        if r.condition not in ("in_distribution", "composition"):
            continue  # switching tasks list every expert; unrelated tasks none
        for name in truth.get(r.task, []):
            if name in results.experts:
                j = results.experts.index(name)
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
    ax.set_xticks(range(E), results.experts, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [r.task for r in rows], fontsize=7)
    acc = [r.routing_accuracy for r in rows if r.routing_accuracy is not None]
    mean_acc = f"; mean routing accuracy {sum(acc) / len(acc):.2f}" if acc else ""
    ax.set_title(f"{method}: mean weight per expert (red: ground truth){mean_acc}", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
