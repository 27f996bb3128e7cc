"""``moerge demo`` and ``moerge bench``: run every method on a suite's held-in and held-out tasks and report.

moerge demo                                   # built-in synthetic suite, every recipe and baseline
moerge bench --suite my_suite/ --recipe arrow --recipe "arrow:granularity=example" --out results/
moerge bench --suite synthetic --seeds 3      # experts retrained with 3 seeds: means and 95% intervals
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from moerge.cli import plugins as cli_plugins


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.command("bench")(bench)


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

    return load_jsonl_suite(suite), "loaded"


def _run(
    suite_name: str,
    recipes: list[str] | None,
    baselines: list[str] | None,
    library: str | None,
    base: Path | None,
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
) -> None:
    from moerge.cli import plugins as cli_plugins
    from moerge.cli.common import console

    t0 = time.perf_counter()
    from transformers.utils import logging as hf_logging

    from moerge.bench.report import print_table, write_report

    hf_logging.disable_progress_bar()  # the per-load "Loading weights" bars
    from moerge.bench.runner import BenchConfig, run_bench

    fields: dict = {}
    if config_file is not None:
        fields.update(_read_yaml(config_file))
    flags = {"recipes": recipes or None, "baselines": baselines or None, "limit": limit, "batch_size": batch_size,
             "prepare_artifacts": artifacts, "device": device, "threads": threads}  # fmt: skip
    fields.update({k: v for k, v in flags.items() if v is not None})
    fields["progress"] = progress
    config = BenchConfig(**fields)
    cli_plugins.load(plugins)
    if seeds > 1:
        if suite_name not in BUILT_IN:
            from moerge.errors import MoergeError

            raise MoergeError(
                f"--seeds retrains the experts, which only a built-in suite can do (synthetic, real-text); "
                f"{suite_name} is a suite folder: run it once per library instead"
            )
        _run_seeds(suite_name, seeds, config, out, reduced, root, rebuild, progress, t0, plots)
        return

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
    print_table(results, console)
    report = write_report(results, out, plots=plots)
    wall = time.perf_counter() - t0
    console.print(
        f"total {wall:.1f} s (suite {t_suite:.1f} s, benchmark {results.wall_s:.1f} s). "
        f"Report: [bold]{report}[/] (results.json and plots alongside, in {out})",
        highlight=False,
    )


def command_line() -> str:
    """The command as typed (for the results' record of what produced them)."""
    import shlex
    import sys

    return shlex.join(["moerge", *sys.argv[1:]])


def _run_seeds(suite_name: str, seeds: int, config, out: Path, reduced: bool, root: Path | None, rebuild: bool,
               progress: bool, t0: float, plots: bool) -> None:  # fmt: skip
    """The built-in suite with its experts retrained for each seed, one run each; the interval report."""
    from rich.table import Table

    from moerge.bench.report import literature_rows
    from moerge.bench.runner import run_bench
    from moerge.bench.seeds import interval_rows, write_seed_report
    from moerge.cli.common import console

    runs = []
    for s in range(seeds):
        suite, how = _load_suite(suite_name, reduced, root, rebuild, progress, seed=s)
        console.print(f"seed {s + 1}/{seeds}: suite [bold]{suite.name}[/] {how}", highlight=False)
        runs.append(run_bench(suite, config))
        runs[-1].notes.insert(0, f"expert-training seed {s}")
        runs[-1].environment["command"] = command_line()
    for title, (header, rows) in (
        (f"moerge bench · {seeds} seeds · mean ± 95% interval", interval_rows(runs)),
        ("the literature's expected orderings, over the seeds", literature_rows(runs)),
    ):
        table = Table(title=title, title_justify="left")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    report = write_seed_report(runs, out, plots=plots)
    console.print(f"total {time.perf_counter() - t0:.1f} s. Report: [bold]{report}[/] (each seed in {out}/seed-<i>/)",
                  highlight=False)  # fmt: skip


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
    rebuild: bool = typer.Option(False, "--rebuild", help="rebuild the suite even if cached"),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads (1 is fastest for the tiny models)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    plugin: list[str] = cli_plugins.plugin_option(),
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
    )


def bench(
    suite: str = typer.Option(
        "synthetic", "--suite", help="synthetic, real-text, or a suite folder (suite.yaml + JSONL task files)"
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
        "uniform_merge, task_arithmetic, ties, multitask)",
    ),  # fmt: skip
    library: str | None = typer.Option(None, "--library", help="expert library (default: the suite's)"),
    base: Path | None = typer.Option(None, "--base", help="base model folder (default: the suite's)"),
    out: Path = typer.Option(Path("moerge-bench"), "--out", help="report folder"),
    config: Path | None = typer.Option(None, "--config", help="YAML of BenchConfig fields; flags win"),
    limit: int | None = typer.Option(None, "--limit", help="eval examples per task"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    reduced: bool = typer.Option(False, "--reduced", help="synthetic / real-text: the small configuration"),
    root: Path | None = typer.Option(None, "--cache", help="synthetic / real-text suite cache folder"),
    rebuild: bool = typer.Option(False, "--rebuild", help="synthetic / real-text: rebuild even if cached"),
    artifacts: bool | None = typer.Option(
        None,
        "--artifacts/--no-artifacts",
        help="compute missing routing artifacts from the suite's training data",
    ),
    device: str | None = typer.Option(None, "--device", help="cpu (default) or cuda"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's own)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    plugin: list[str] = cli_plugins.plugin_option(),
    seeds: int = typer.Option(
        1,
        "--seeds",
        min=1,
        help="synthetic / real-text: retrain the experts with N seeds; means and 95% intervals",
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="write the report's plots"),
) -> None:
    """Run recipes and baselines on a suite: quality per task and split, routing accuracy, cost; write a report."""
    _run(suite, recipe, baseline, library, base, out, config, limit, batch_size, reduced, root, rebuild,
         artifacts, device, progress, threads, plugin, seeds, plots)  # fmt: skip
