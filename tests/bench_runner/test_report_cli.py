"""Reports from a run, and `moerge bench` on a suite folder through the CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner


def test_report_files(bench_results, tmp_path):
    from moerge.bench.report import load_results, table_rows, write_report

    path = write_report(bench_results, tmp_path / "out")
    text = path.read_text()
    assert "| method |" in text and "oracle" in text and "n/a" in text
    again = load_results(tmp_path / "out" / "results.json")
    assert again.summary() == bench_results.summary()
    for png in ("quality.png", "quality_vs_cost.png", "routing_arrow.png", "routing_oracle.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    header, rows, notes = table_rows(bench_results)
    assert any("embedding_centroids" in n and "held-in" in n for n in notes)
    assert len({len(r) for r in rows} | {len(header)}) == 1


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
