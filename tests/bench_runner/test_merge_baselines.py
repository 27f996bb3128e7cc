"""The merge baselines as configuration: any registered merge method with its parameters and tuning grid,
validated through the merge registry; the defaults give what the former three fixed baselines gave."""

from __future__ import annotations

import pytest

from moerge.bench.config import BenchConfig
from moerge.errors import MalformedConfigError, UnknownNameError

SMALL = dict(recipes=[], batch_size=4, limit=2, premise=False, prepare_artifacts=False, progress=False)


def _grid(start, stop, step):
    return [round(start + i * step, 6) for i in range(int(round((stop - start) / step)) + 1)]


def former_merge_rows(suite, model, tokenizer, validation_limit):
    """The former fixed baselines, written out as their code ran them: uniform average (linear, normalised);
    task arithmetic with λ ∈ 0.1 … 1.0 tuned and λ 0.4 untuned; TIES with λ ∈ 0.1 … 1.0, 1.2, 1.5, 2, 2.5 and
    density ∈ {0.2, 0.5, 1} tuned (each density merged once at scale 1, folded at each λ), density 0.2, λ 1
    untuned. Returns ``{method: ({task: result}, tuned choice or None)}``."""
    from moerge.bench.evaluate import BenchRun, evaluate
    from moerge.bench.subjects import PlainSubject, folded
    from moerge.merging.api import merge

    config = BenchConfig(**SMALL)
    lib = suite.open_library()
    experts = [lib.get(n) for n in suite.experts]
    run = BenchRun(suite, config, model, tokenizer, lib, experts, None)

    def merged(method, params):
        return merge(merge_method=method, experts=experts, lora_mode="dense", parameters=params)

    def score(expert, scale, tasks):
        with folded(model, expert, scale) as m:
            return evaluate(run, PlainSubject(m), "x", tasks, counted=False)

    held_in = [t for t in suite.tasks if t.split == "held_in" and t.validation]
    validation = [t.model_copy(update={"name": f"{t.name}/validation", "eval": t.validation[:validation_limit]})
                  for t in held_in]  # fmt: skip
    out = {"uniform_merge": (score(merged("linear", {"normalize": True}), 1.0, suite.tasks), None)}
    for name, settings, scales, untuned in (
        ("task_arithmetic", [{}], _grid(0.1, 1.0, 0.1), {"scale": 0.4}),
        ("ties", [{"density": d} for d in (0.2, 0.5, 1.0)], [*_grid(0.1, 1.0, 0.1), 1.2, 1.5, 2.0, 2.5],
         {"density": 0.2, "scale": 1.0}),
    ):  # fmt: skip
        best = None
        for params in settings:
            expert = merged(name, {**params, "scale": 1.0})
            for lam in scales:
                rs = score(expert, lam, validation)
                quality = sum(r.score if r.metric == "exact_match" else -r.score for r in rs) / len(rs)
                key = (quality, -sum(r.target_nll for r in rs) / len(rs))
                if best is None or key > best[0]:
                    best = (key, params, lam)
        _, params, lam = best
        out[name] = (
            score(merged(name, {**params, "scale": 1.0}), lam, suite.tasks),
            {"scale": lam, **params},
        )
        out[f"{name}:untuned"] = (score(merged(name, untuned), 1.0, suite.tasks), None)
    return {k: ({r.task: r for r in rs}, tuned) for k, (rs, tuned) in out.items()}


def test_default_merges_give_the_former_fixed_baselines_numbers(reduced_suite, base_model):
    from moerge.bench.runner import run_bench

    model, tokenizer = base_model
    config = BenchConfig(baselines=["uniform_merge", "task_arithmetic", "ties"], **SMALL)
    config.merges.validation_limit = 4
    results = run_bench(reduced_suite, config, model=model, tokenizer=tokenizer)
    expected = former_merge_rows(reduced_suite, model, tokenizer, validation_limit=4)
    assert [m.name for m in results.methods] == list(expected)
    for name, (rows, tuned) in expected.items():
        got = {r.task: r for r in results.results if r.method == name}
        assert set(got) == set(rows)
        for task, ref in rows.items():
            for field in ("score", "target_nll", "token_accuracy", "examples", "targets"):
                assert getattr(got[task], field) == getattr(ref, field), (name, task, field)
        if tuned is not None:
            chosen = results.method(name).options["tuned"]
            assert {k: chosen[k] for k in tuned} == tuned
    assert results.method("ties").description.startswith("TIES with λ = ")
    assert (
        results.method("ties:untuned").description == "TIES with its default λ = 1.0, density 0.2 (not tuned)"
    )


def test_unknown_merge_methods_parameters_and_values_are_refused_with_the_fix():
    with pytest.raises(UnknownNameError, match="valid methods: .*dare_ties.*ties"):
        BenchConfig(merges={"methods": [{"method": "tiez"}]})
    with pytest.raises(MalformedConfigError, match="has no parameter 'lambda'; valid: .*density.*scale"):
        BenchConfig(merges={"methods": [{"method": "ties", "grid": {"lambda": [0.5]}}]})
    with pytest.raises(MalformedConfigError, match="parameter sign"):
        BenchConfig(merges={"methods": [{"method": "ties", "params": {"sign": "median"}}]})
    with pytest.raises(MalformedConfigError, match="linear' has no parameter 'scale'"):
        BenchConfig(merges={"methods": [{"method": "linear", "grid": {"scale": [0.5, 1.0]}}]})
    with pytest.raises(MalformedConfigError, match="named ties"):
        BenchConfig(merges={"methods": [{"method": "ties"}, {"method": "ties", "params": {"density": 0.5}}]})
    with pytest.raises(MalformedConfigError, match="give the merges as a list"):
        BenchConfig(merges={"ties_scales": [1.0]})
    ok = BenchConfig(
        merges={"methods": [{"method": "dare_ties", "name": "dare", "grid": {"density": [0.3, 0.6]}}]}
    )
    assert ok.merges.methods[0].label == "dare"


def test_a_config_file_with_a_bad_merge_is_one_error_line(tmp_path):
    import contextlib
    import io

    from moerge.cli.common import run_app

    cfg = tmp_path / "bench.yaml"
    cfg.write_text("merges:\n  methods:\n    - {method: ties, grid: {lambda: [0.5, 1.0]}}\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        from moerge.cli import app

        code = run_app(app, ["bench", "--config", str(cfg), "--no-progress"])
    assert code == 1
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    assert len(lines) == 1 and "has no parameter 'lambda'" in lines[0], err.getvalue()


def test_any_registered_merge_runs_tuned_with_its_untuned_row(reduced_suite, base_model):
    """A DARE-TIES baseline named ``dare`` tuned over density and λ: the chosen point is the grid's best; the
    tuned row equals the merge at that point folded at that λ; ``--baseline dare`` selects it alone."""
    from moerge.bench.evaluate import BenchRun, evaluate
    from moerge.bench.runner import run_bench
    from moerge.bench.subjects import PlainSubject, folded
    from moerge.merging.api import merge

    model, tokenizer = base_model
    merges = {"validation_limit": 2, "methods": [
        {"method": "dare_ties", "name": "dare", "params": {"density": 0.5, "scale": 0.5},
         "grid": {"density": [0.4, 0.8], "scale": [0.5, 1.0]}}]}  # fmt: skip
    config = BenchConfig(baselines=["dare"], merges=merges, **SMALL)
    results = run_bench(reduced_suite, config, model=model, tokenizer=tokenizer)
    assert [m.name for m in results.methods] == ["dare", "dare:untuned"]
    tuned = results.method("dare").options["tuned"]
    assert len(tuned["grid"]) == 4
    best = max(tuned["grid"], key=lambda g: (g["quality"], -g["nll"]))
    assert (best["density"], best["scale"]) == (tuned["density"], tuned["scale"])
    assert results.method("dare:untuned").options == {
        "merge_method": "dare_ties",
        "density": 0.5,
        "scale": 0.5,
    }

    lib = reduced_suite.open_library()
    experts = [lib.get(n) for n in reduced_suite.experts]
    run = BenchRun(reduced_suite, config, model, tokenizer, lib, experts, None)
    ref = merge(merge_method="dare_ties", experts=experts, lora_mode="dense",
                parameters={"density": tuned["density"], "scale": 1.0})  # fmt: skip
    task = reduced_suite.tasks[0]
    with folded(model, ref, tuned["scale"]) as m:
        (want,) = evaluate(run, PlainSubject(m), "ref", [task], counted=False)
    assert results.result("dare", task.name).target_nll == want.target_nll


def test_a_merge_that_cannot_take_every_expert_is_refused_before_anything_runs(reduced_suite, base_model):
    from moerge.bench.runner import run_bench

    model, tokenizer = base_model
    config = BenchConfig(baselines=["slerp"], merges={"methods": [{"method": "slerp"}]}, **SMALL)
    with pytest.raises(MalformedConfigError, match="at most 2"):
        run_bench(reduced_suite, config, model=model, tokenizer=tokenizer)
    with pytest.raises(UnknownNameError, match="known: .*uniform_merge"):
        run_bench(reduced_suite, BenchConfig(baselines=["nope"], **SMALL), model=model, tokenizer=tokenizer)
