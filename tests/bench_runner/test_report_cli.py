"""Reports from a run, and `moerge bench` on a suite folder through the CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner


def test_report_files(bench_results, tmp_path):
    from moerge.bench.report import load_results, table_rows, write_report

    path = write_report(bench_results, tmp_path / "out")
    text = path.read_text()
    assert "| method |" in text and "oracle" in text and "embedding_centroids" in text
    again = load_results(tmp_path / "out" / "results.json")
    assert again.summary() == bench_results.summary()
    for png in ("quality.png", "quality_vs_cost.png", "routing_arrow.png", "routing_oracle.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    header, rows, notes = table_rows(bench_results)
    assert len({len(r) for r in rows} | {len(header)}) == 1


def test_recipe_ruled_out_is_reported_not_applicable_with_its_reason(reduced_suite, base_model, tmp_path):
    """Without its data statistics (and not allowed to compute them), average activation cannot run: it is
    reported as n/a with the taxonomy check's reason, not dropped."""
    from moerge.bench.report import table_rows, write_report
    from moerge.bench.runner import BenchConfig, run_bench
    from moerge.experts.library import ExpertLibrary

    model, tokenizer = base_model
    lib = ExpertLibrary.create(tmp_path / "bare")  # the experts without the artifacts the suite ships
    for name in reduced_suite.experts:
        lib.add(reduced_suite.open_library().get(name))
    config = BenchConfig(
        recipes=["average_activation"], baselines=["base"], prepare_artifacts=False, limit=1, progress=False
    )
    results = run_bench(reduced_suite, config, model=model, tokenizer=tokenizer, library=lib)
    header, rows, notes = table_rows(results)
    row = next(r for r in rows if r[0].startswith("average_activation"))
    assert "n/a" in row[header.index("held-in")]
    assert any("average_activation" in n and "hidden-state centroids" in n for n in notes)
    assert "n/a" in write_report(results, tmp_path / "out").read_text()


def test_bench_cli_on_suite_folder(reduced_suite, tmp_path):
    from moerge.cli import app

    out = tmp_path / "report"
    args = ["bench", "--suite", reduced_suite.root, "--recipe", "arrow:k=1", "--baseline", "base",
            "--baseline", "oracle", "--limit", "2", "--no-progress", "--no-artifacts", "--threads", "1", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "arrow:k=1" in res.output and "report.md" in res.output
    data = json.loads((out / "results.json").read_text())
    assert {m["name"] for m in data["methods"]} == {"base", "oracle", "arrow:k=1"}
    assert data["config"]["limit"] == 2 and data["config"]["threads"] == 1


def test_footnotes_group_one_reason_over_the_tasks_it_names():
    """A reason repeated per task (naming each) is one footnote listing the tasks; task names inside other words
    ("a" in "reason") are left alone; a reason naming no task is kept as given."""
    from moerge.bench.report import grouped_reasons

    failed = [("cipher2", "the prompt of cipher2 is too long"), ("copy9", "the prompt of copy9 is too long"),
              ("a", "no data for this reason"), ("b", "no data for this reason"), ("c", "c alone failed")]  # fmt: skip
    assert grouped_reasons(failed) == [
        (["c"], "c alone failed"),
        ([], "no data for this reason"),
        (["cipher2", "copy9"], "the prompt of the task is too long"),
    ]
