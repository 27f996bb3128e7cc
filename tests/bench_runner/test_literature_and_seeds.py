"""The literature checks, intervals over seeds, and the premise diagnostics in a run's results and report."""

from __future__ import annotations

import math

import pytest

from moerge.bench.literature import Expectation, check, mean_interval
from moerge.bench.results import BenchResults, MethodResult, TaskResult


def test_mean_interval_is_students_t():
    mean, half = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)  # t(0.975, 2) = 4.303
    assert mean_interval([0.5]) == (0.5, None)


def fake_run(
    scores: dict[str, float], premise: dict | None = None, user_data: dict[str, str] | None = None
) -> BenchResults:
    """One held-out task per method with the given normalised quality (and user-data mode, where given)."""
    results = [
        TaskResult(
            method=m,
            task="t",
            split="held_out",
            condition="switching",
            metric="exact_match",
            score=v,
            normalized=v,
        )  # fmt: skip
        for m, v in scores.items()
    ]
    methods = [MethodResult(name=m, kind="recipe", user_data=(user_data or {}).get(m)) for m in scores]
    tasks = [{"name": "t", "split": "held_out", "condition": "switching", "metric": "exact_match"}]
    return BenchResults(suite="s", experts=["a", "b"], tasks=tasks, methods=methods, results=results, config={},
                        environment={}, premise=premise)  # fmt: skip


CLAIM = Expectation("a ≥ b", "paper", "a", "b", "held_out")
STRICT = Expectation("a > b", "paper", "a", "b", "held_out", "switching", strict=True, premise="arrow")


@pytest.mark.parametrize(
    "pairs,claim,verdict",
    [
        ([(0.6, 0.5), (0.7, 0.5), (0.65, 0.5)], CLAIM, "holds"),  # interval above 0
        ([(0.4, 0.5), (0.3, 0.5), (0.35, 0.5)], CLAIM, "does not hold"),
        ([(0.6, 0.5), (0.4, 0.5), (0.5, 0.5)], CLAIM, "tie (holds)"),  # interval contains 0
        ([(0.6, 0.5), (0.4, 0.5), (0.5, 0.5)], STRICT, "tie (not shown)"),
        ([(0.5, 0.5)], CLAIM, "holds"),  # one run: ≥ 0 holds a ≥ claim …
        ([(0.5, 0.5)], STRICT, "does not hold"),  # … but not a > claim
    ],
)
def test_verdicts_read_the_interval(pairs, claim, verdict):
    runs = [fake_run({"a": a, "b": b}) for a, b in pairs]
    row = check(runs, expectations=[claim])[0]
    assert row["verdict"] == verdict
    diffs = [a - b for a, b in pairs]
    assert row["difference"] == pytest.approx(sum(diffs) / len(diffs)) and row["runs"] == len(pairs)


def test_a_failed_premise_is_reported_as_such_whatever_the_numbers():
    runs = [fake_run({"a": 0.9, "b": 0.1})]
    row = check(runs, {"arrow": "Arrow not testable here: selectivity 1.2 < 2"}, [STRICT])[0]
    assert row["verdict"] == "premise fails" and "selectivity" in row["premise"]
    assert check([fake_run({"a": 0.9})], expectations=[CLAIM])[0]["verdict"] == "not measured"


def test_seeded_configs_change_only_the_training_seeds():
    from moerge.bench.seeds import SEED_STRIDE, seeded
    from moerge.bench.suites.synthetic import SyntheticSuiteConfig

    base = SyntheticSuiteConfig.reduced()
    assert seeded(base, 0) is base
    two = seeded(base, 2)
    assert two.expert.seed == base.expert.seed + 2 * SEED_STRIDE
    assert two.multitask.seed == base.multitask.seed + 2 * SEED_STRIDE
    same = {k: v for k, v in two.model_dump().items() if k not in ("expert", "multitask")}
    assert same == {k: v for k, v in base.model_dump().items() if k not in ("expert", "multitask")}
    assert two.key() != base.key()


def test_interval_table_over_runs(tmp_path):
    from moerge.bench.seeds import interval_rows, write_seed_report

    runs = [fake_run({"a": a, "b": 0.5}, user_data={"a": "few-shot 5"}) for a in (0.6, 0.7, 0.8)]
    header, rows = interval_rows(runs)
    col = header.index("switching")
    mean, half = mean_interval([0.6, 0.7, 0.8])
    assert rows[0][col] == f"{mean:+.2f} ± {half:.2f}" and rows[1][col] == "+0.50 ± 0.00"
    # the user-data column, as in a single run's table: few N for a few-shot method, — for a reference one
    assert header[:2] == ["method", "user data"] and [r[1] for r in rows] == ["few 5", "—"]
    report = write_seed_report(runs, tmp_path / "out", plots=False)
    text = report.read_text()
    assert "over 3 seeds" in text and (tmp_path / "out" / "seed-2" / "results.json").is_file()


def test_a_run_measures_premises_and_reports_the_literature(bench_results, tmp_path):
    from moerge.bench.report import literature_rows, write_report

    report = bench_results.premise_report()
    assert report is not None and set(report.experts) == set(bench_results.experts)
    assert {"arrow", "average_activation"} <= set(report.top1)  # built from the recipes' own signatures
    for router in report.top1:
        assert report.verdict(router)
    header, rows = literature_rows([bench_results])
    from moerge.bench.literature import EXPECTATIONS

    assert len(rows) == len(EXPECTATIONS) and all(len(r) == len(header) for r in rows)
    text = write_report(bench_results, tmp_path / "out", plots=False).read_text()
    assert "Do the routers' premises hold" in text and "expected orderings" in text


def test_seeds_from_the_cli(tmp_path, reduced_suite):
    """`moerge bench --seeds 2` retrains the (reduced) suite's experts per seed; a suite folder is refused."""
    import json

    from typer.testing import CliRunner

    from moerge.cli import app

    out = tmp_path / "out"
    args = ["bench", "--suite", "synthetic", "--reduced", "--seeds", "2", "--cache", str(tmp_path / "cache"),
            "--recipe", "arrow", "--baseline", "base", "--baseline", "oracle", "--limit", "2", "--no-progress",
            "--no-plots", "--threads", "1", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    suites = [json.loads((out / f"seed-{i}" / "results.json").read_text())["suite"] for i in range(2)]
    assert suites[0] != suites[1]  # each seed's experts are another build
    assert "mean ± 95% interval" in res.output and "± " in (out / "report.md").read_text()
    assert json.loads((out / "seed-1" / "results.json").read_text())["environment"]["command"].startswith(
        "moerge"
    )
    res = CliRunner().invoke(app, ["bench", "--suite", reduced_suite.root, "--seeds", "2"])
    assert res.exit_code != 0 and "built-in suite" in str(res.exception)


def test_results_from_before_user_data_modes_read_as_zero_shot_recipes():
    """An older results.json (config ``user_data: zero-shot``, no mode per method) served zero-shot recipes only."""
    old = fake_run({"a": 0.5, "b": 0.5}).model_dump()
    old["config"] = {"user_data": "zero-shot"}
    old["methods"][1]["kind"] = "baseline"
    got = BenchResults.model_validate(old)
    assert [m.user_data for m in got.methods] == [
        "zero-shot",
        None,
    ]  # the recipe; a reference baseline stays —
    new = BenchResults.model_validate({**old, "config": {"user_data": ["zero-shot", "few-shot"]}})
    assert [m.user_data for m in new.methods] == [None, None]  # a current file records each method's mode
