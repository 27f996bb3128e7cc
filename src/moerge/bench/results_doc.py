"""docs/results.md and the results blocks of the other pages, generated from the results files under
docs/results/ — never edited by hand.

    python -m moerge.bench.results_doc             # rewrite docs/results.md (and docs/img/<suite>-quality.png)
                                                   # and every results block of README.md and docs/*.md
    python -m moerge.bench.results_doc --check     # exit 1 when any of them is not what the files give

A page holds a generated table as a block whose contents are rewritten from ``docs/results/NAME/`` (the
``--out`` folder of ``moerge bench ... --no-plots``; its results.json, or ``seed-<i>/results.json``)::

    <!-- results: NAME held-in, switching, train s -->
    (the summary table of `moerge bench` with these columns, the method first; the command and environment)
    <!-- /results -->

No columns: every column of the summary table. Text outside the blocks is left as it is. ``NAME/KEY`` names
table KEY of ``docs/results/NAME/tables.json``, which a benchmark script writes with `write_tables` (its
``--json PATH``): the same block, for tables that do not come from ``moerge bench``.

Each suite folder (``docs/results/<suite>/``) is the ``--out`` folder of a run of ``moerge bench ... --seeds N
--no-plots``: ``seed-<i>/results.json`` per seed (a single run: ``results.json``), and optionally the suite
build's ``build.json`` copied beside it (``seed-<i>/build.json``). The page shows, per suite, the command and
environment recorded in the results, the summary with 95% intervals over the seeds, the graded per-token
accuracy, the premise diagnostics, the literature checks and, where ``build.json`` is there, the build's
timings and reference scores — all computed here from the JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from moerge.bench.results import BenchResults
from moerge.errors import MalformedConfigError, MoergeError, UnknownNameError

ROOT = Path(__file__).resolve().parents[3]
SUITES = {
    "synthetic": "Synthetic suite (`moerge demo`'s suite)",
    "real-text": "Real-text suite (SmolLM2-135M, reduced)",
    "synthetic-full": "Synthetic suite, full-fine-tune library (`--expert-library full`: one full fine-tune per held-in task)",
}


def load_runs(folder: Path) -> list[BenchResults]:
    """The runs of one suite folder: ``seed-<i>/results.json`` in seed order, else ``results.json``."""
    seeds = sorted(folder.glob("seed-*/results.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    paths = seeds or ([folder / "results.json"] if (folder / "results.json").is_file() else [])
    return [BenchResults.model_validate_json(p.read_text()) for p in paths]


def load_builds(folder: Path) -> list[dict]:
    """The ``build.json`` files beside the runs (``seed-<i>/build.json`` in seed order, else ``build.json``)."""
    seeds = sorted(folder.glob("seed-*/build.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    paths = seeds or ([folder / "build.json"] if (folder / "build.json").is_file() else [])
    return [json.loads(p.read_text()) for p in paths]


def build_section(builds: list[dict], run: BenchResults) -> list[str]:
    """The suite builds: time per phase (every seed) and the reference scores of seed 0's build."""
    from moerge.bench.report import markdown_table
    from moerge.bench.suites.synthetic import SCORE_COLUMNS

    def per_seed(kind: str, phase: str) -> str:
        vals = [b.get(kind, {}).get(phase) for b in builds]
        return " / ".join("–" if v is None else f"{v:.1f}" for v in vals)

    phases = list(dict.fromkeys(k for b in builds for k in (*b.get("timings_s", {}), *b.get("cpu_s", {}))))
    threads = sorted({b.get("torch_threads") for b in builds}, key=str)
    time_rows = [[ph, per_seed("timings_s", ph), per_seed("cpu_s", ph)] for ph in phases]
    scores = builds[0].get("scores", {})
    score_rows = []
    for t in run.tasks:
        s = scores.get(t["name"], {})
        cells = [
            t["name"],
            t["split"],
            t["condition"],
            t["metric"],
            f"{t['ceiling']:.3f}" if t.get("ceiling") else "-",
        ]
        score_rows.append(cells + [f"{s[k]:.3f}" if k in s else "-" for k, _ in SCORE_COLUMNS])
    head = ["task", "split", "condition", "metric", "ceiling"] + [short for _, short in SCORE_COLUMNS]
    if any(any(k in scores.get(t["name"], {}) for k, _ in SCORE_COLUMNS) for t in run.tasks):
        reference = [
            "Reference scores of seed 0's build (`measure_suite`: exact match, or nats per character for NLL "
            "tasks). `base`: the base model; `oracle`: the task's own expert; `best1`: the best single expert for "
            "the whole task; `or/ex`: the best expert per example; `or/tok`: each scored token predicted by the "
            "model of its ground-truth expert; `merge`: the task's experts' deltas summed into the base; `multi`: "
            "the multitask LoRA.",
            "",
            markdown_table(head, score_rows),
            "",
        ]
    elif "validation" in scores:  # the real-text build: NLL of the base and of each expert on every domain
        domains = list(scores["validation"].get("base", {}))
        reference = [
            "Specialisation in seed 0's build: nats per token on each held-in domain's validation passages, for "
            "the base model and each expert folded into it (an expert should be best on its own domain).",
            "",
            markdown_table(
                ["model", *domains],
                [
                    [m, *(f"{row.get(d, float('nan')):.2f}" for d in domains)]
                    for m, row in scores["validation"].items()
                ],
            ),
            "",
        ]
    else:
        reference = []
    return [
        "### The suite builds (`build.json`)",
        "",
        f"Time per build phase, seed by seed ({len(builds)} build{'s' if len(builds) > 1 else ''}, torch threads "
        f"{', '.join(map(str, threads))}; `premise` and `measure` run after the build):",
        "",
        markdown_table(["phase", "wall s", "CPU s"], time_rows),
        "",
        *reference,
    ]


def environment_sentence(runs: list[BenchResults], folder: Path) -> str:
    """Where the runs of ``folder`` ran (as their results record it), their benchmark wall times, and the folder."""
    env = runs[0].environment
    walls = ", ".join(f"{r.wall_s:.0f} s" for r in runs)
    return (
        f"torch {env.get('torch')}, {env.get('threads')} thread(s), {env.get('device')}, Python "
        f"{env.get('python')} on {env.get('machine')}; benchmark wall time per seed (suite builds not included): "
        f"{walls}. Data: `{_rel(folder)}/`."
    )


def _rel(folder: Path) -> Path:
    return folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder


def suite_section(title: str, folder: Path, runs: list[BenchResults], img: str | None) -> list[str]:
    from moerge.bench.premise import format_premise
    from moerge.bench.report import literature_rows, markdown_table
    from moerge.bench.seeds import interval_rows, token_accuracy_rows

    command = runs[0].environment.get("command", "(not recorded)")
    lines = [
        f"## {title}",
        "",
        f"Suite `{runs[0].suite}` (seed 0), {len(runs[0].experts)} experts, {len(runs[0].tasks)} tasks; "
        f"{len(runs)} expert-training seed{'s' if len(runs) > 1 else ''}. Produced by:",
        "",
        '<!-- doc-test: skip reason="the benchmark run that produced these files (full suite builds: minutes)" -->',
        "```bash",
        command,
        "```",
        "",
        environment_sentence(runs, folder),
        "",
        "### Quality",
        "",
        "Mean normalised quality (base 0, oracle 1) per split and condition"
        + (", ± the half-width of the 95% interval over the seeds (Student t)" if len(runs) > 1 else "")
        + "; raw exact match / nats per token where no expert applies.",
        "",
        markdown_table(*interval_rows(runs)),
        "",
    ]
    graded_head, graded_rows = token_accuracy_rows(runs)
    if len(graded_head) > 1:  # only where some task is scored per target token (not for NLL-only suites)
        lines += [
            "### Graded: per-token accuracy on target tokens",
            "",
            markdown_table(graded_head, graded_rows),
            "",
        ]
    if img:
        lines += [f"![quality per task, seed 0]({img})", ""]
    report = runs[0].premise_report()
    if report is not None:
        lines += ["### Premise diagnostics (seed 0)", "", format_premise(report), ""]
        if len(runs) > 1:
            lines += ["Verdicts on the other seeds:", ""]
            for i, res in enumerate(runs[1:], start=1):
                rep = res.premise_report()
                if rep is not None:
                    lines += [f"- seed {i}, {r}: {rep.verdict(r)}" for r in rep.top1]
            lines.append("")
    lines += ["### The literature's expected orderings", "", markdown_table(*literature_rows(runs)), ""]
    builds = load_builds(folder)
    if builds:
        lines += build_section(builds, runs[0])
    return lines


def render(results_dir: Path, img_dir: Path | None = None) -> str:
    """The page's Markdown; writes each suite's quality heatmap (seed 0) into ``img_dir`` when given."""
    from moerge.bench.report import plot_quality

    lines = [
        "# Results",
        "",
        "<!-- generated by `python -m moerge.bench.results_doc` from docs/results/; do not edit by hand -->",
        "",
        "Every number on this page is computed from the results files under `docs/results/` by "
        "`python -m moerge.bench.results_doc` (a test fails when the page and the files disagree). Each suite "
        "section names the command that produced its files. How the benchmark works and what each column "
        "means: [benchmark.md](benchmark.md); suites: [suites.md](suites.md), [real-models.md](real-models.md).",
        "",
    ]
    for name, title in SUITES.items():
        folder = results_dir / name
        runs = load_runs(folder) if folder.is_dir() else []
        if not runs:
            continue
        img = None
        if img_dir is not None:
            img_dir.mkdir(parents=True, exist_ok=True)
            plot_quality(runs[0], img_dir / f"{name}-quality.png")
            img = f"img/{name}-quality.png"
        elif (results_dir.parent / "img" / f"{name}-quality.png").is_file():
            img = f"img/{name}-quality.png"
        lines += suite_section(title, folder, runs, img)
    pool = results_dir / "pool" / "results.json"
    if pool.is_file():
        lines += pool_section(pool, img_dir, results_dir)
    merges = sorted(
        (results_dir / "merge").glob("*.json"), key=lambda p: (p.name != "bench_merge.json", p.name)
    )
    for i, merge in enumerate(merges):
        lines += merge_section(merge, heading=i == 0)
    return "\n".join(lines).rstrip() + "\n"


def merge_section(path: Path, heading: bool = True) -> list[str]:
    """Merging against mergekit and PEFT (``docs/results/merge/bench_merge.json``, written by
    ``benchmarks/bench_merge.py --json``): whole-process time and peak memory of the same YAML in each tool (moerge
    on each engine it has for the method), each venv's interpreter start + ``import torch`` / ``numpy``, and the
    exact LoRA merge against PEFT."""
    data = json.loads(path.read_text())
    env = data.get("environment", {})
    model = data.get("model", "8 × 27M Llama, 8k vocabulary")
    lines = ["## Merging: moerge vs mergekit and PEFT", ""] if heading else []
    if env:
        lines += [
            f"`{env.get('command')}` on {env.get('date')} ({env.get('cpus')} CPUs, load average "
            f"{env.get('load_average_before', float('nan')):.1f} before the run; torch {env.get('torch')}). "
            'Setup and method: [merging.md](merging.md), "Speed and memory".',
            "",
        ]
    lines += [
        f"| merge ({model}) | moerge engine | mergekit s | moerge s | speed-up | mergekit peak "
        "RSS MB | moerge peak RSS MB | memory ratio | max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["full"]:
        engine = r.get("engine", "torch") + (" (default)" if r.get("default_engine", True) else "")
        lines.append(
            f"| {r['method']} | {engine} | {r['mergekit_s']:.1f} | {r['moerge_s']:.1f} | "
            f"{r['mergekit_s'] / r['moerge_s']:.1f}× | {r['mergekit_rss_mb']:.0f} | {r['moerge_rss_mb']:.0f} | "
            f"{r['moerge_rss_mb'] / r['mergekit_rss_mb']:.2f} | {r['max_abs_diff_vs_mergekit']:.1e} |"
        )
    floors = data.get("floors")
    if floors:
        lines += [
            "",
            f"Before merging anything, each process starts Python and imports its array library: `import torch` "
            f"takes {floors['moerge_import_torch_s']:.2f} s in moerge's venv and {floors['mergekit_import_torch_s']:.2f} s "
            f"in mergekit's, `import numpy` {floors['moerge_import_numpy_s']:.2f} s — the numpy engine's floor "
            "(`moerge.merging.numpy_engine`).",
        ]
    lora = data.get("lora")
    if lora:
        peft = f"{lora['peft_cat_s']:.2f} s" if "peft_cat_s" in lora else "—"
        ratio = f"{lora['peft_cat_s'] / lora['moerge_exact_s']:.1f}×" if "peft_cat_s" in lora else "—"
        lines += [
            "",
            "| LoRA exact merge | modules | merged rank | moerge (in memory) | PEFT cat (in memory) | speed-up | "
            "moerge: library → PEFT folder | max abs diff vs PEFT |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| {lora['n_experts']} experts × rank {lora['rank']} | {lora['modules']} | {lora['merged_rank']} | "
            f"{lora['moerge_exact_s']:.2f} s | {peft} | {ratio} | {lora['moerge_library_to_peft_folder_s']:.2f} s | "
            f"{lora.get('max_abs_diff_vs_peft', float('nan')):.1e} |",
        ]
    return [*lines, ""]


def pool_section(path: Path, img_dir: Path | None, results_dir: Path) -> list[str]:
    """The pool suite's table and quality–cost curves (``docs/results/pool/results.json``, the ``--out`` folder
    of ``moerge bench --suite pool --no-plots``)."""
    from moerge.bench.pool import PoolResults, plot_curves, pool_table
    from moerge.tables import to_markdown

    results = PoolResults.from_dict(json.loads(path.read_text()))
    lines = ["## Pool suite (whole models, query routing)", ""]
    command = results.environment.get("command")
    if command:
        lines += [f"`{command}` — members, metrics and the headline: [pool.md](pool.md).", ""]
    lines += [to_markdown(pool_table(results)), ""]
    if img_dir is not None:
        plot_curves(results, img_dir / "pool-curve.png")
    if img_dir is not None or (results_dir.parent / "img" / "pool-curve.png").is_file():
        lines += ["![quality–cost curves on the pool suite](img/pool-curve.png)", ""]
    return lines


# ---------------------------------------------------------------------------------------------- blocks in pages
BLOCK_OPEN = re.compile(r"<!-- results:(?P<spec>.*?)-->[ \t]*")
BLOCK_CLOSE = re.compile(r"<!-- /results -->[ \t]*")
FENCE = re.compile(r"[ \t]*(```|~~~)")


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """``"NAME col, col, …"`` → ``(NAME, [col, …])`` (no columns: every column of the summary table)."""
    name, _, rest = spec.strip().partition(" ")
    if not name:
        raise MalformedConfigError(
            "a results block names no results folder: write <!-- results: NAME [column, column, …] -->"
        )
    return name, [c.strip() for c in rest.split(",") if c.strip()]


TABLES_FILE = "tables.json"


def write_tables(
    path: Path, tables: dict[str, tuple[Sequence[str], Sequence[Sequence[object]]]], wall_s: float
) -> Path:
    """Write a script's tables (``{key: (header, rows)}``, cells as the page shows them) as ``path``, with the
    command and environment, so a ``<!-- results: NAME/KEY -->`` block can show them (``path`` is then
    ``docs/results/NAME/tables.json``). Written to a temp sibling and renamed."""
    import os
    import platform
    import shlex
    from datetime import datetime, timezone

    torch = sys.modules.get("torch")
    env = {
        "command": shlex.join(["python", *sys.argv]),
        "started": datetime.fromtimestamp(time.time() - wall_s, timezone.utc).isoformat(timespec="seconds"),
        "torch": getattr(torch, "__version__", None),
        "threads": torch.get_num_threads() if torch is not None else None,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    data = {"environment": env, "wall_s": wall_s,
            "tables": {k: {"header": list(h), "rows": [list(map(str, r)) for r in rows]} for k, (h, rows) in tables.items()}}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return path


def _known_names(results_dir: Path) -> list[str]:
    names = []
    for p in sorted(results_dir.iterdir()) if results_dir.is_dir() else []:
        if p.is_dir() and load_runs(p):
            names.append(p.name)
        elif (p / TABLES_FILE).is_file():
            names += [f"{p.name}/{k}" for k in json.loads((p / TABLES_FILE).read_text()).get("tables", {})]
    return names


def _provenance(env: dict, where: str) -> str:
    return (
        f"Generated from the results of `{env.get('command', '(command not recorded)')}`"
        + (f" (started {env['started']})" if env.get("started") else "")
        + f" by `python -m moerge.bench.results_doc`; {where}"
    )


def results_block(name: str, columns: list[str], results_dir: Path) -> str:
    """The contents of a ``<!-- results: NAME columns -->`` block: the summary table of ``results_dir/NAME``
    (one run: ``moerge bench``'s own table; ``--seeds`` runs: the means ± 95% intervals) restricted to
    ``columns`` (the first column always), its footnotes, then the command and environment the results record.
    ``NAME/KEY``: table KEY of ``results_dir/NAME/tables.json`` (a benchmark script's, `write_tables`)."""
    from moerge.bench.report import markdown_table, table_rows
    from moerge.bench.seeds import interval_rows
    from moerge.experts.paths import contain

    folder_name, _, key = name.partition("/")
    folder = Path(contain(results_dir, folder_name, what=f"results block {name!r}"))
    runs = load_runs(folder) if folder.is_dir() and not key else []
    tables = (
        json.loads((folder / TABLES_FILE).read_text()) if key and (folder / TABLES_FILE).is_file() else {}
    )
    notes: list[str] = []
    if runs:
        header, rows, notes = (*interval_rows(runs), []) if len(runs) > 1 else table_rows(runs[0])
        where = environment_sentence(runs, folder)
    elif key in tables.get("tables", {}):
        header, rows = tables["tables"][key]["header"], tables["tables"][key]["rows"]
        env = tables["environment"]
        where = (
            f"torch {env.get('torch')}, {env.get('threads')} thread(s), Python {env.get('python')} on "
            f"{env.get('machine')}; wall time {tables.get('wall_s', float('nan')):.0f} s. Data: "
            f"`{_rel(folder)}/{TABLES_FILE}`."
        )
    else:
        raise UnknownNameError(
            f"results block {name!r}: no {folder}/results.json (nor seed-*/results.json; NAME/KEY: table KEY of "
            f"{folder}/{TABLES_FILE}); write it with `moerge bench ... --no-plots --out {folder}` (or the "
            f"script's --json), or name one of: {', '.join(_known_names(results_dir)) or '(none)'}"
        )
    unknown = [c for c in columns if c not in header]
    if unknown:
        raise UnknownNameError(
            f"results block {name!r}: no column {', '.join(map(repr, unknown))}; the columns are: "
            f"{', '.join(header[1:])}"
        )
    keep = [0, *(header.index(c) for c in columns if c != header[0])] if columns else list(range(len(header)))
    lines = [markdown_table([header[i] for i in keep], [[r[i] for i in keep] for r in rows]), ""]
    if notes:
        lines += [*(f"- {n}" for n in notes), ""]
    env = runs[0].environment if runs else tables["environment"]
    return "\n".join([*lines, _provenance(env, where)])


def find_blocks(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, spec)`` of each results block of ``text``: the offsets of its contents (from the line after
    its opening line to its closing line) and what its opening line names. Lines inside fenced code are not
    block lines (a page may show the syntax)."""
    blocks: list[tuple[int, int, str]] = []
    fence: str | None = None
    opened: tuple[int, int, str] | None = None  # line, contents' start, spec
    offset = 0
    for lineno, line in enumerate(text.splitlines(keepends=True), start=1):
        bare = line.rstrip("\r\n")
        if opened is None and (f := FENCE.match(bare)):
            fence = f.group(1) if fence is None else (None if f.group(1) == fence else fence)
        elif fence is None and (m := BLOCK_OPEN.fullmatch(bare)):
            if opened is not None:
                break
            opened = (lineno, offset + len(line), m.group("spec"))
        elif fence is None and BLOCK_CLOSE.fullmatch(bare):
            if opened is None:
                raise MalformedConfigError(f"line {lineno}: <!-- /results --> closes no results block")
            blocks.append((opened[1], offset, opened[2]))
            opened = None
        offset += len(line)
    if opened is not None:
        raise MalformedConfigError(
            f"the results block at line {opened[0]} has no closing <!-- /results --> line"
        )
    return blocks


def rewrite_blocks(text: str, results_dir: Path) -> str:
    """``text`` with the contents of every ``<!-- results: … -->`` … ``<!-- /results -->`` block rewritten from
    ``results_dir``; everything outside the blocks is kept as it is."""
    out, pos = [], 0
    for start, end, spec in find_blocks(text):
        name, columns = parse_spec(spec)
        out += [text[pos:start], "\n", results_block(name, columns, results_dir), "\n\n"]
        pos = end
    return "".join(out) + text[pos:]


def block_pages(docs: Path) -> list[Path]:
    """The pages that may hold results blocks: README.md beside ``docs`` and ``docs/*.md`` but results.md."""
    pages = [docs.parent / "README.md", *sorted(docs.glob("*.md"))]
    return [p for p in pages if p.is_file() and p.name != "results.md" and find_blocks(p.read_text())]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate docs/results.md and the pages' results blocks from docs/results/."
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check that docs/results.md and every results block are up to date",
    )
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="the docs folder")
    args = parser.parse_args(argv)
    page, results = args.docs / "results.md", args.docs / "results"
    try:
        pages = {p: rewrite_blocks(p.read_text(), results) for p in block_pages(args.docs)}
        if args.check:
            stale = [p for p, want in pages.items() if p.read_text() != want]
            if not page.is_file() or page.read_text() != render(results):
                stale.insert(0, page)
            for p in stale:
                print(f"{p} is out of date: run python -m moerge.bench.results_doc", file=sys.stderr)
            return 1 if stale else 0
        _write(page, render(results, args.docs / "img"))
    except MoergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {page}")
    for p, want in pages.items():
        if p.read_text() != want:
            _write(p, want)
            print(f"rewrote the results blocks of {p}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
