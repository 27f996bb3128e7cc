"""``moerge demo`` and ``moerge bench``: run every method on a suite's held-in and held-out tasks and report.

moerge demo                                   # built-in synthetic suite, every recipe and baseline
moerge bench --suite my_suite/ --recipe arrow --recipe "arrow:granularity=example" --out results/
moerge bench --suite synthetic --seeds 3      # experts retrained with 3 seeds: means and 95% intervals
moerge bench report RUN_DIR                   # report.md / report.html again from RUN_DIR/results.json
moerge bench compare RUN1 RUN2                # what changed between two runs
"""

from __future__ import annotations

import enum
import time
from pathlib import Path

import typer

from moerge.cli import plugins as cli_plugins
from moerge.cli import routing_options
from moerge.cli.common import wide_option


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    group = typer.Typer(no_args_is_help=False, add_completion=False, pretty_exceptions_enable=False)
    group.callback(invoke_without_command=True)(bench)
    group.command("report")(report)
    group.command("compare")(compare)
    app.add_typer(group, name="bench")


BUILT_IN = ("synthetic", "real-text", "real_text")


def _load_suite(suite: str, reduced: bool, root: Path | None, rebuild: bool, progress: bool, seed: int = 0):
    """``(Suite, how)`` for ``synthetic``, ``real-text`` or a suite folder; ``seed`` > 0 retrains a built-in
    suite's experts with that seed (`moerge.bench.seeds.seeded`)."""
    from moerge.bench.seeds import seeded

    if suite == "synthetic":
        from moerge.bench.suites.build import is_built
        from moerge.bench.suites.synthetic import SyntheticSuiteConfig, build_synthetic_suite, suite_folder

        config = SyntheticSuiteConfig.reduced() if reduced else SyntheticSuiteConfig()
        config = seeded(config.model_copy(update={"progress": progress}), seed)
        cached = is_built(suite_folder(config, root)) and not rebuild
        return build_synthetic_suite(config, root=root, force=rebuild), "cached" if cached else "built"
    if suite in ("real-text", "real_text"):
        from moerge.bench.suites import real_text

        config = real_text.RealTextConfig.reduced() if reduced else real_text.RealTextConfig.full()
        config = seeded(config.model_copy(update={"progress": progress}), seed)
        return real_text.build_real_text_suite(config, root=root, force=rebuild), "built or cached"
    from moerge.bench.suites.format import load_jsonl_suite

    loaded = load_jsonl_suite(suite)
    # a real-text build's folder: its target splits, as when it is loaded from the cache
    if loaded.info.get("kind") == "real_text":
        from moerge.bench.suites import real_text

        return real_text.with_targets(loaded), "loaded (target splits from the installed text)"
    return loaded, "loaded"


def _run(
    suite_name: str,
    recipes: list[str] | None,
    baselines: list[str] | None,
    library: str | None,
    base: str | None,
    out: Path,
    config_file: Path | None,
    limit: int | None,
    batch_size: int | None,
    reduced: bool,
    root: Path | None,
    rebuild: bool,
    artifacts: bool | None,
    device: str | None,
    progress: bool,
    threads: int | None = None,
    plugins: list[str] | None = None,
    seeds: int = 1,
    plots: bool = True,
    wide: bool = False,
    as_json: bool = False,
    experts: list[str] | None = None,
    artifacts_dir: Path | None = None,
    write_artifacts: bool = False,
    user_data: list[str] | None = None,
    few_shot: int | None = None,
    executor: str | None = None,
    expert_library: str | None = None,
) -> None:
    from moerge.cli import plugins as cli_plugins
    from moerge.cli.common import console, err_console
    from moerge.progress import status

    if as_json:  # stdout carries the JSON only; what is said along the way goes to stderr
        console = err_console
    t0 = time.perf_counter()
    with status("starting (importing torch and transformers)", enabled=progress):
        from transformers.utils import logging as hf_logging

        from moerge.bench.report import print_table, write_report
        from moerge.bench.runner import run_bench

    hf_logging.disable_progress_bar()  # the per-load "Loading weights" bars

    fields: dict = {}
    if config_file is not None:
        fields.update(_read_yaml(config_file))
    flags = {"recipes": recipes or None, "baselines": baselines or None, "limit": limit, "batch_size": batch_size,
             "prepare_artifacts": artifacts, "device": device, "threads": threads,
             "experts": routing_options.parse_experts(experts),
             "artifacts_dir": str(artifacts_dir) if artifacts_dir is not None else None,
             "write_artifacts": write_artifacts or None, "few_shot": few_shot, "executor": executor,
             "expert_library": expert_library,
             "user_data": [m.strip() for v in user_data for m in v.split(",") if m.strip()] if user_data else None}  # fmt: skip
    fields.update({k: v for k, v in flags.items() if v is not None})
    fields["progress"] = progress
    cli_plugins.load(plugins)  # before the config: its merges may name a plugin's merge method
    if suite_name == "pool":
        _run_pool(
            recipes, baselines, out, reduced, root, rebuild, progress, plots, wide, as_json, console, t0
        )
        return
    config = _config(fields, config_file)
    if seeds > 1:
        if suite_name not in BUILT_IN:
            from moerge.errors import MoergeError

            raise MoergeError(
                f"--seeds retrains the experts, which only a built-in suite can do (synthetic, real-text); "
                f"{suite_name} is a suite folder: run it once per library instead"
            )
        _run_seeds(suite_name, seeds, config, out, reduced, root, rebuild, progress, t0, plots, wide, as_json)
        return

    with status(f"loading the {suite_name} suite (built and cached on first use)", enabled=progress):
        suite, how = _load_suite(suite_name, reduced, root, rebuild, progress)
    t_suite = time.perf_counter() - t0
    console.print(f"suite [bold]{suite.name}[/] {how} in {t_suite:.1f} s ({len(suite.tasks)} tasks, "
                  f"{len(suite.experts)} experts)", highlight=False)  # fmt: skip
    model = tokenizer = lib = None
    if base is not None:
        from moerge.train.lora import load_base

        model, tokenizer, _, _ = load_base(base)
    if library is not None:
        from moerge.experts.library import ExpertLibrary

        lib = ExpertLibrary.open(library)
    results = run_bench(suite, config, model=model, tokenizer=tokenizer, library=lib)
    results.environment["command"] = command_line()
    if as_json:
        print_json(results)
    else:
        print_table(results, console, wide=wide)
    with status(f"writing the report{' and plots' if plots else ''} to {out}", enabled=progress):
        report = write_report(results, out, plots=plots)
    wall = time.perf_counter() - t0
    console.print(
        f"total {wall:.1f} s (suite {t_suite:.1f} s, benchmark {results.wall_s:.1f} s). "
        f"Report: [bold]{report}[/] (results.json and plots alongside, in {out})",
        highlight=False,
    )


def _run_pool(recipes, baselines, out: Path, reduced: bool, root: Path | None, rebuild: bool, progress: bool,
              plots: bool, wide: bool, as_json: bool, console, t0: float) -> None:  # fmt: skip
    """``--suite pool``: pool recipes fitted on the pool suite's routing split, scored on its eval split."""
    import json

    from moerge.bench.pool import pool_table, run_pool_bench, write_pool_report
    from moerge.bench.suites.pool import PoolSuiteConfig, build_pool_suite
    from moerge.progress import status
    from moerge.tables import records, render

    config = PoolSuiteConfig.reduced(progress=progress) if reduced else PoolSuiteConfig(progress=progress)
    with status("loading the pool suite (built and cached on first use: minutes)", enabled=progress):
        suite = build_pool_suite(config, root=root, force=rebuild)
    console.print(f"suite [bold]{suite.name}[/]: {len(suite.members)} members, {len(suite.routing.texts)} routing "
                  f"and {len(suite.eval.texts)} eval queries", highlight=False)  # fmt: skip
    results = run_pool_bench(suite, recipes or None, baselines or None)
    results.environment["command"] = command_line()
    table = pool_table(results)
    if as_json:
        typer.echo(
            json.dumps({"suite": results.suite, "summary": records(table)}, indent=1, ensure_ascii=False)
        )
    else:
        render(table, console, wide=wide)
    report = write_pool_report(results, out, plots=plots)
    console.print(f"total {time.perf_counter() - t0:.1f} s. Report: [bold]{report}[/] (results.json"
                  f"{' and pool_curve.png' if plots else ''} alongside)", highlight=False)  # fmt: skip


def print_json(results) -> None:
    """The summary and the literature's orderings as JSON on stdout (``--json``): the table's cells by header."""
    import json

    from moerge.bench.report import literature_table, summary_table
    from moerge.tables import records

    table = summary_table(results)
    data = {
        "suite": results.suite,
        "summary": records(table),
        "notes": table.notes,
        "literature": records(literature_table([results], "literature")),
    }
    typer.echo(json.dumps(data, indent=1, ensure_ascii=False))


def command_line() -> str:
    """The command as typed (for the results' record of what produced them)."""
    import shlex
    import sys

    return shlex.join(["moerge", *sys.argv[1:]])


def _run_seeds(suite_name: str, seeds: int, config, out: Path, reduced: bool, root: Path | None, rebuild: bool,
               progress: bool, t0: float, plots: bool, wide: bool = False, as_json: bool = False) -> None:  # fmt: skip
    """The built-in suite with its experts retrained for each seed, one run each; the interval report."""
    import json

    from moerge.bench.report import literature_rows
    from moerge.bench.runner import run_bench
    from moerge.bench.seeds import interval_rows, write_seed_report
    from moerge.cli.common import console, err_console
    from moerge.progress import status
    from moerge.tables import NBSP, Column, Table, records, render

    if as_json:
        console = err_console

    runs = []
    for s in range(seeds):
        suite, how = _load_suite(suite_name, reduced, root, rebuild, progress, seed=s)
        console.print(f"seed {s + 1}/{seeds}: suite [bold]{suite.name}[/] {how}", highlight=False)
        runs.append(run_bench(suite, config))
        runs[-1].notes.insert(0, f"expert-training seed {s}")
        runs[-1].environment["command"] = command_line()
    tables = []
    for title, (header, rows), numbers in (
        (f"moerge bench · {seeds} seeds · mean ± 95% interval", interval_rows(runs), True),
        ("the literature's expected orderings, over the seeds", literature_rows(runs), False),
    ):
        table = Table(title, [Column(h, right=numbers and i > 0) for i, h in enumerate(header)])
        for row in rows:
            table.add_row(*[c.replace(" ± ", f"{NBSP}±{NBSP}") for c in row])  # "+0.46 ± 0.03" kept whole
        tables.append(table)
    if as_json:
        typer.echo(json.dumps({"summary": records(tables[0]), "literature": records(tables[1])}, indent=1,
                              ensure_ascii=False))  # fmt: skip
    else:
        for table in tables:
            render(table, console, wide=wide)
    with status(f"writing the report to {out}", enabled=progress):
        report = write_seed_report(runs, out, plots=plots)
    console.print(f"total {time.perf_counter() - t0:.1f} s. Report: [bold]{report}[/] (each seed in {out}/seed-<i>/)",
                  highlight=False)  # fmt: skip


def _config(fields: dict, config_file: Path | None):
    """`BenchConfig` from YAML fields and flags; a bad field is one error line naming it."""
    from pydantic import ValidationError

    from moerge.bench.config import BenchConfig
    from moerge.errors import MalformedConfigError

    try:
        return BenchConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = str(config_file) if config_file is not None else "bench options"
        raise MalformedConfigError(f"{where}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def _read_yaml(path: Path) -> dict:
    from moerge.config_io import read_yaml_mapping

    return read_yaml_mapping(path, "a mapping of BenchConfig fields (recipes, baselines, …)")


def demo(
    out: Path = typer.Option(Path("moerge-demo"), "--out", help="report folder"),
    reduced: bool = typer.Option(
        False, "--reduced", help="the small test suite (seconds; numbers not meaningful)"
    ),
    root: Path | None = typer.Option(
        None, "--cache", help="suite cache folder (default ~/.cache/moerge/suites)"
    ),
    rebuild: bool = typer.Option(
        False,
        "--rebuild",
        help="rebuild the suite even if cached (an interrupted build is discarded, not resumed)",
    ),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads (1 is fastest for the tiny models)"),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="progress on stderr (on a terminal)"
    ),
    plugin: list[str] = cli_plugins.plugin_option(),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="write the report's plots"),
    wide: bool = wide_option(),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON instead of tables"),
) -> None:
    """Every recipe and baseline on the built-in synthetic suite (built if not cached): table and report."""
    _run(
        "synthetic",
        None,
        None,
        None,
        None,
        out,
        None,
        None,
        None,
        reduced,
        root,
        rebuild,
        None,
        None,
        progress,
        threads=threads,
        plugins=plugin,
        plots=plots,
        wide=wide,
        as_json=as_json,
    )


class ExpertLibraryKind(str, enum.Enum):
    lora = "lora"
    full = "full"


def bench(
    ctx: typer.Context,
    suite: str = typer.Option(
        "synthetic",
        "--suite",
        help="synthetic, real-text, pool (whole models; pool recipes), or a suite folder (suite.yaml + JSONL task files)",
    ),
    recipe: list[str] | None = typer.Option(
        None,
        "--recipe",
        help='method to run, "name" or "name:key=value,..." (repeatable; default: every recipe)',
    ),
    baseline: list[str] | None = typer.Option(
        None,
        "--baseline",
        help="baselines to run (repeatable; default: all of base, oracle, label_routing, best_single, "
        "the merges — uniform_merge, task_arithmetic, ties unless configured otherwise — and multitask)",
    ),  # fmt: skip
    library: str | None = typer.Option(None, "--library", help="expert library (default: the suite's)"),
    base: str | None = typer.Option(
        None, "--base", help="base model: a folder, a .gguf file or a hub id (default: the suite's)"
    ),
    out: Path = typer.Option(Path("moerge-bench"), "--out", help="report folder"),
    config: Path | None = typer.Option(None, "--config", help="YAML of BenchConfig fields; flags win"),
    limit: int | None = typer.Option(None, "--limit", help="eval examples per task"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    reduced: bool = typer.Option(False, "--reduced", help="synthetic / real-text: the small configuration"),
    root: Path | None = typer.Option(None, "--cache", help="synthetic / real-text suite cache folder"),
    rebuild: bool = typer.Option(
        False,
        "--rebuild",
        help="synthetic / real-text: rebuild even if cached (an interrupted build is discarded, not resumed)",
    ),
    artifacts: bool | None = typer.Option(
        None,
        "--artifacts/--no-artifacts",
        help="compute missing routing artifacts from the suite's training data",
    ),
    artifacts_dir: Path | None = typer.Option(
        None,
        "--artifacts-dir",
        help="folder for the routing artifacts the run computes (default: $MOERGE_CACHE/artifacts/<library>); "
        "the library itself is not modified",
    ),
    write_artifacts: bool = typer.Option(
        False, "--write-artifacts", help="store the routing artifacts the run computes in the library itself"
    ),
    experts: list[str] = routing_options.experts_option(),
    device: str | None = typer.Option(None, "--device", help="cpu (default) or cuda"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's own)"),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="progress on stderr (on a terminal)"
    ),
    plugin: list[str] = cli_plugins.plugin_option(),
    seeds: int = typer.Option(
        1,
        "--seeds",
        min=1,
        help="synthetic / real-text: retrain the experts with N seeds; means and 95% intervals",
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="write the report's plots"),
    wide: bool = wide_option(),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON instead of tables"),
    user_data: list[str] | None = typer.Option(
        None,
        "--user-data",
        help="user-data modes to serve: zero-shot, few-shot, full (repeatable or comma-separated; default: all). "
        "Each recipe runs in the mode its taxonomy record declares, or is reported not applicable",
    ),
    few_shot: int | None = typer.Option(
        None,
        "--few-shot",
        min=1,
        help="labelled examples per task for few-shot recipes and baselines (default 20)",
    ),
    executor: str | None = typer.Option(
        None,
        "--executor",
        help="local (default): recipes one after another; ray: each recipe a Ray task (pip install 'moerge[ray]')",
    ),
    expert_library: ExpertLibraryKind | None = typer.Option(
        None,
        "--expert-library",
        help="the experts every method runs on: the suite's LoRA library (lora, default) or one full fine-tune "
        "per held-in task (full: dense task vectors, built beside the suite on first use and cached)",
    ),
) -> None:
    """Run recipes and baselines on a suite: quality, routing, cost; write report.md, report.html, results.json."""
    if ctx.invoked_subcommand is not None:
        return
    _run(suite, recipe, baseline, library, base, out, config, limit, batch_size, reduced, root, rebuild,
         artifacts, device, progress, threads, plugin, seeds, plots, wide, as_json, experts, artifacts_dir,
         write_artifacts, user_data, few_shot, executor,
         expert_library.value if expert_library else None)  # fmt: skip


def report(
    run_dir: Path = typer.Argument(
        ..., help="a `moerge bench` output folder (with results.json), or a seeds folder"
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="also redraw the PNG plots of report.md"),
) -> None:
    """Write report.md and report.html again from a run's results.json (a --seeds folder: every seed's)."""
    from moerge.bench.compare import load_run
    from moerge.cli.common import console

    if (run_dir / "seeds.json").is_file() and not (run_dir / "results.json").is_file():
        from moerge.bench.seeds import write_seed_report

        seeds = sorted(run_dir.glob("seed-*/results.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
        if not seeds:
            from moerge.errors import DataFormatError

            raise DataFormatError(f"{run_dir}: seeds.json but no seed-<i>/results.json")
        path = write_seed_report([load_run(p) for p in seeds], run_dir, plots=plots)
    else:
        from moerge.bench.report import write_report

        path = write_report(load_run(run_dir), run_dir, plots=plots)
    console.print(f"wrote {path} and {path.with_name('report.html')}", highlight=False)


def compare(
    run1: Path = typer.Argument(
        ..., help="the first run: a `moerge bench` output folder or its results.json"
    ),
    run2: Path = typer.Argument(..., help="the second run"),
    everything: bool = typer.Option(False, "--all", help="also the rows that did not change"),
    as_json: bool = typer.Option(False, "--json", help="print the differences as JSON"),
    wide: bool = wide_option(),
) -> None:
    """What changed from RUN1 to RUN2: scores and routing per method and split, methods, configuration."""
    import json

    from moerge.bench.compare import compare_lines, compare_runs, compare_table, load_run
    from moerge.cli.common import console

    diff = compare_runs(load_run(run1), load_run(run2))
    if as_json:
        print(json.dumps(diff, indent=1, ensure_ascii=False))
        return
    header, rows = compare_table(diff, everything)
    if rows:
        from moerge.tables import Column, Table, render

        table = Table(f"{run1} → {run2}", [Column(h, right=i >= 2) for i, h in enumerate(header)])
        for row in rows:
            table.add_row(*row)
        render(table, console, wide=wide)
    else:
        console.print("no score or routing accuracy changed.", highlight=False)
    for line in compare_lines(diff, everything):
        console.print(line, highlight=False, soft_wrap=True)
