"""Target data in the benchmark: each recipe gets exactly what its taxonomy record declares (spy recipes record
it), never an evaluation or validation example of any task; the user-data column and the old config form."""

from __future__ import annotations

import pytest
import torch

from moerge.bench.config import BenchConfig
from moerge.errors import MalformedConfigError
from moerge.recipes.recipe import Recipe, Taxonomy
from moerge.routing.fixed import FixedRouter


def spy(name: str, mode: str, seen: list) -> Recipe:
    def build(ctx, options):
        seen.append(ctx.target)
        return FixedRouter(torch.full((len(ctx.experts),), 1.0 / len(ctx.experts)))

    taxonomy = Taxonomy(training="standard", expert_data="private", routing_data="target", granularity="task",
                        depth="model", selection="dense", aggregation="output", generalization="multiple",
                        user_data=mode)  # fmt: skip
    return Recipe(name=name, summary="records the target data it is given", taxonomy=taxonomy, builder=build)


@pytest.fixture
def spies(monkeypatch):
    from moerge.recipes import registry

    registry._ensure_loaded()
    seen: dict[str, list] = {"zero-shot": [], "few-shot": [], "full": []}
    for mode, found in seen.items():
        monkeypatch.setitem(
            registry._RECIPES, f"spy_{mode.replace('-', '_')}", spy(f"spy_{mode}", mode, found)
        )
    return seen


def test_recipes_get_their_declared_data_and_never_an_eval_example(reduced_suite, base_model, spies):
    from moerge.bench.runner import run_bench

    model, tok = base_model
    config = BenchConfig(recipes=["spy_zero_shot", "spy_few_shot", "spy_full"], baselines=["base"], few_shot=5,
                         batch_size=8, progress=False, premise=False, limit=4)  # fmt: skip
    res = run_bench(reduced_suite, config, model=model, tokenizer=tok)

    held = {
        ex.text for t in reduced_suite.tasks for ex in [*t.eval, *t.validation]
    }  # every task's, not only its own
    assert spies["zero-shot"] == [None]  # one build for every task, with no data
    for mode in ("few-shot", "full"):
        by_task = {d.task: d for d in spies[mode]}
        assert sorted(by_task) == sorted(t.name for t in reduced_suite.tasks)  # one build per task
        for task in reduced_suite.tasks:
            data = by_task[task.name]
            assert data.mode == mode
            texts = [
                r.get("prompt", "") + r.get("completion", r.get("text", ""))
                for r in data.rows + data.validation
            ]
            assert not set(texts) & held
            mine = [ex.text for ex in (task.target or task.train)]  # the task's own labelled training data
            assert set(texts) <= set(mine)
            if mode == "few-shot":
                assert len(data.rows) == 5 and not data.validation
            else:
                assert len(texts) == len(task.target_examples())
    method = {m.name: m for m in res.methods}
    assert method["spy_few_shot"].user_data == "few-shot 5" and method["spy_full"].user_data == "full"
    assert method["spy_zero_shot"].user_data == "zero-shot"
    assert all(r.status == "ok" for r in res.results if r.method.startswith("spy_"))


def test_a_mode_the_run_does_not_serve_is_not_applicable(reduced_suite, base_model, spies):
    from moerge.bench.runner import run_bench

    model, tok = base_model
    config = BenchConfig(recipes=["spy_full"], baselines=["base"], user_data="few-shot", progress=False,
                         premise=False, limit=2)  # fmt: skip
    res = run_bench(reduced_suite, config, model=model, tokenizer=tok)
    rows = [r for r in res.results if r.method == "spy_full"]
    assert rows and all(r.status == "not_applicable" and "add full to user_data" in r.reason for r in rows)
    assert spies["full"] == []


def test_old_single_user_data_value_still_reads():
    assert BenchConfig(user_data="zero-shot").user_data == ["zero-shot"]
    assert BenchConfig(user_data="few-shot").user_data == ["zero-shot", "few-shot"]
    assert BenchConfig().user_data == ["zero-shot", "few-shot", "full"]
    with pytest.raises(MalformedConfigError, match="give a list"):
        BenchConfig(user_data="some")


def test_target_split_must_not_repeat_an_eval_example(tmp_path):
    from moerge.bench.suites.format import load_jsonl_suite
    from moerge.errors import SuiteError

    (tmp_path / "e.jsonl").write_text('{"prompt": "a>", "completion": "b"}\n')
    (tmp_path / "t.jsonl").write_text(
        '{"prompt": "c>", "completion": "d"}\n{"prompt": "a>", "completion": "b"}\n'
    )
    (tmp_path / "suite.yaml").write_text(
        "name: s\nexperts: [x]\ntasks:\n  - {name: new, split: held_out, eval: e.jsonl, target: t.jsonl}\n"
    )
    with pytest.raises(SuiteError, match="target example"):
        load_jsonl_suite(tmp_path)
    (tmp_path / "t.jsonl").write_text('{"prompt": "c>", "completion": "d"}\n')
    assert [ex.text for ex in load_jsonl_suite(tmp_path).task("new").target] == ["c>d"]
