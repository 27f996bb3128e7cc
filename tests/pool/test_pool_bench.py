"""The pool benchmark (`moerge.bench.pool`): APGR and the cost to 50% against RouteLLM's numpy formulas
(``routellm/evals/evaluate.py``), the baselines against loops, recipes of the wrong kind reported not_applicable
on both sides, the report files and ``moerge bench --suite pool``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moerge.bench.pool import (
    apgr,
    complete_curve,
    cost_to_reach,
    random_quality,
    run_pool_bench,
    write_pool_report,
)
from moerge.bench.suites.pool import PoolSuite
from moerge.pool.query import PoolData


def toy_suite(seed: int = 0, n: int = 80) -> PoolSuite:
    """Three members; ``cheap`` is right where feature 0 > 0, ``dear`` on 90% of queries, ``mid`` on a third."""

    def split(s: int) -> PoolData:
        g = torch.Generator().manual_seed(s)
        f = torch.randn(n, 6, generator=g)
        q = torch.stack([(f[:, 0] > 0).float(), (torch.rand(n, generator=g) < 0.33).float(),
                         (torch.rand(n, generator=g) < 0.9).float()], dim=1)  # fmt: skip
        return PoolData([f"q{i}" for i in range(n)], f, q, ["cheap", "mid", "dear"], torch.tensor([1.0, 2.0, 10.0]),
                        tags=["t"] * n, descriptions=["c", "m", "d"])  # fmt: skip

    members = [{"name": m, "flops_per_token": c, "seconds_per_query": c * 1e-4}
               for m, c in (("cheap", 1.0), ("mid", 2.0), ("dear", 10.0))]  # fmt: skip
    return PoolSuite("toy", split(seed), split(seed + 1), members, {})


def test_apgr_and_cost_to_50_match_routellms_formulas():
    x = np.array([0.0, 0.1, 0.3, 0.6, 1.0])
    y = np.array([0.40, 0.55, 0.70, 0.78, 0.80])
    weak, strong = 0.40, 0.80
    auc = np.trapezoid(y, x)
    want = (auc - np.trapezoid(np.full(5, weak), x)) / (
        np.trapezoid(np.full(5, strong), x) - np.trapezoid(np.full(5, weak), x)
    )
    pts = [[a, b] for a, b in zip(x, y)]
    assert apgr(pts, weak, strong) == pytest.approx(want)
    # RouteLLM reads "50% qual" off np.interp(target, accuracy, strong share) on a monotone curve
    assert cost_to_reach(pts, weak, strong) == pytest.approx(np.interp(weak + 0.5 * (strong - weak), y, x))
    assert cost_to_reach(pts, weak, 2.0) is None  # never reached
    assert apgr(pts[:1], weak, strong) is None


def test_a_short_curve_is_completed_by_randomised_policies():
    # the oracle's shape: the weak member alone, then the strong member's quality at 20% of the way, flat after
    pts = complete_curve([[0.5, 0.8], [0.6, 1.0]], x_weak=0.5, q_weak=0.8, x_strong=1.0, q_strong=1.0)
    assert pts == [[0.5, 0.8], [0.6, 1.0], [1.0, 1.0]]
    # PGR rises linearly over the first 0.1 of 0.5, then is 1: mean (0.1·0.5 + 0.4·1) / 0.5
    assert apgr(pts, 0.8, 1.0) == pytest.approx((0.1 * 0.5 + 0.4) / 0.5)
    assert complete_curve([[0.7, 0.9]], 0.5, 0.8, 1.0, 1.0) == [[0.5, 0.8], [0.7, 0.9], [1.0, 1.0]]


def test_random_quality_is_the_expected_mix():
    data = toy_suite().eval
    q = data.quality.mean(0)
    # relative cost 0.55 = cheap (0.1) + p·(1 − 0.1) → p = 0.5
    assert random_quality(0.55, data, strong=2, weak=0) == pytest.approx(
        0.5 * float(q[0]) + 0.5 * float(q[2])
    )


def test_run_pool_bench_baselines_and_recipes(tmp_path):
    suite = toy_suite()
    res = run_pool_bench(suite, ["routellm_mf:epochs=20,dim=16,lr=0.01", "routellm_sw", "arrow"], None)
    rows = {r.name: r for r in res.rows}
    data = suite.eval
    assert (res.strong, res.weak) == ("dear", "cheap")
    for m, name in enumerate(["cheap", "mid", "dear"]):
        assert rows[name].quality == pytest.approx(float(data.quality[:, m].mean()), abs=1e-4)
        assert rows[name].cost == pytest.approx(float(data.costs[m] / 10.0))
    # oracle: per query the best member, the cheaper on ties (a loop)
    best = [
        min(range(3), key=lambda m: (-float(data.quality[i, m]), float(data.costs[m]))) for i in range(80)
    ]
    assert rows["oracle"].quality == pytest.approx(
        float(np.mean([float(data.quality[i, b]) for i, b in enumerate(best)])), abs=1e-4
    )
    assert rows["oracle"].cost == pytest.approx(
        float(np.mean([float(data.costs[b]) for b in best])) / 10, abs=1e-4
    )
    assert rows["random"].apgr == pytest.approx(0.5)
    assert rows["arrow"].status == "not_applicable" and "whole model" in rows["arrow"].reason
    mf = rows["routellm_mf:epochs=20,dim=16,lr=0.01"]
    assert mf.status == "ok" and mf.info["strong"] == "dear" and mf.info["weak"] == "cheap"
    # the curve runs from the cheap member alone to the dear one alone, sorted by cost
    assert mf.curve[0][0] == pytest.approx(0.1) and mf.curve[-1][0] == pytest.approx(1.0)
    assert [p[0] for p in mf.curve] == sorted(p[0] for p in mf.curve)
    # a router that learnt the cheap member's queries beats random routing at its cost
    assert mf.quality > mf.random_same_cost and mf.apgr > 0.5
    report = write_pool_report(res, tmp_path)
    assert "routellm_sw" in report.read_text() and (tmp_path / "pool_curve.png").stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["kind"] == "pool" and {r["name"] for r in saved["rows"]} == set(rows)


def test_pool_recipe_on_another_suite_is_not_applicable(reduced_suite):
    from moerge.bench.config import BenchConfig
    from moerge.bench.runner import run_bench

    config = BenchConfig(recipes=["routellm_sw"], baselines=[], batch_size=4, limit=2, premise=False,
                         prepare_artifacts=False, progress=False)  # fmt: skip
    res = run_bench(reduced_suite, config)
    (meta,) = [m for m in res.methods if m.name == "routellm_sw"]
    assert meta.status == "not_applicable" and "--suite pool" in meta.reason


def test_cli_bench_suite_pool(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import moerge.bench.suites.pool as pool_suite
    from moerge.cli import app

    monkeypatch.setattr(pool_suite, "build_pool_suite", lambda config, root=None, force=False: toy_suite())
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["bench", "--suite", "pool", "--recipe", "routellm_bert:epochs=20",
                                   "--out", str(out), "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "routellm_bert" in res.output and "oracle" in res.output
    assert (out / "report.md").is_file() and (out / "pool_curve.png").is_file()


def test_pool_suite_build_measures_each_member(reduced_config, suite_root):
    """The reduced pool suite on the session's reduced synthetic suite: splits disjoint, every member's quality
    column equal to exact match by greedy generation (transformers' ``generate``) for the saved members, costs
    counted, and a second call a cache hit."""
    from moerge.bench.suites.pool import PoolSuiteConfig, build_pool_suite, suite_folder
    from moerge.bench.suites.synthetic import build_synthetic_suite
    from moerge.train.lora import load_base

    config = PoolSuiteConfig.reduced(synthetic=reduced_config, n_routing=4)
    suite = build_pool_suite(config, root=suite_root)
    names = [m["name"] for m in suite.members]
    syn = build_synthetic_suite(reduced_config, root=suite_root)
    held = [t for t in syn.tasks if t.held_in]
    assert names == ["small", "multitask", *[f"base+{t.name}" for t in held], "large"]
    assert len(suite.routing.texts) == 4 * len(held) and len(suite.eval.texts) == sum(
        len(t.eval) for t in held
    )
    assert not set(suite.routing.texts) & set(suite.eval.texts)
    assert suite.routing.features.shape[0] == len(suite.routing.texts)
    folder = suite_folder(config, suite_root)
    answers = {
        ex.text[: ex.targets[0][0]]: ex.text[ex.targets[0][0] : ex.targets[0][1]]
        for t in held
        for ex in t.eval
    }
    for name in ("small", "large"):
        model, tok, _, _ = load_base(str(folder / "members" / name))
        m = names.index(name)
        for i, prompt in enumerate(suite.eval.texts[:12]):
            ids = tok(prompt, return_tensors="pt").input_ids
            want = answers[prompt]
            out = model.generate(
                ids, max_new_tokens=len(want), do_sample=False, pad_token_id=tok.pad_token_id
            )
            got = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            assert float(suite.eval.quality[i, m]) == float(got == want), (name, prompt, got, want)
    assert suite.eval.costs[names.index("large")] > suite.eval.costs[names.index("multitask")]
    assert build_pool_suite(config, root=suite_root).name == suite.name  # cached
