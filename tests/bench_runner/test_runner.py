"""The runner end to end on a reduced synthetic suite, checked against dense references written out here."""

from __future__ import annotations

import math

import pytest
import torch

from moerge.bench.baselines import BASELINES
from moerge.bench.config import BenchConfig, parse_method
from moerge.bench.metrics import routing_stats
from moerge.bench.results import TaskResult, normalize
from moerge.bench.runner import run_bench
from moerge.errors import MoergeError


def dense_target_nll(model, tokenizer, task, expert=None) -> float:
    """Reference: add scaling·B@A into a copy of each weight, run the model, cross-entropy on the targets."""
    return dense_reference(model, tokenizer, task, expert)[0]


def dense_reference(model, tokenizer, task, expert=None) -> tuple[float, float]:
    """``(NLL per target token, share of target tokens whose argmax is right)`` with the expert folded in."""
    import copy

    ref = copy.deepcopy(model)
    if expert is not None:
        with torch.no_grad():
            for name, lm in expert.lora.items():
                w = ref.get_submodule(name).weight
                w += (lm.alpha / lm.rank) * (lm.B @ lm.A)
    total, count, right = 0.0, 0, 0
    with torch.no_grad():
        for batch in task.eval_batches(tokenizer, batch_size=3, experts=[]):
            logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            lp = torch.log_softmax(logits[:, :-1].double(), -1)
            y = batch.labels[:, 1:]
            keep = y != -100
            total += float(-lp.gather(-1, y.clamp(min=0)[..., None])[..., 0][keep].sum())
            count += int(keep.sum())
            right += int((lp.argmax(-1) == y)[keep].sum())
    return total / count, right / count


def test_every_method_reports_every_task(bench_results, reduced_suite):
    names = {m.name for m in bench_results.methods}
    assert set(BASELINES) <= names
    assert {"arrow", "arrow:granularity=example", "phatgoose:gate_steps=4", "embedding_centroids"} <= names
    shown = [m for m in bench_results.methods if m.kind != "single"]
    for m in shown:
        tasks = [r.task for r in bench_results.results if r.method == m.name]
        assert sorted(tasks) == sorted(t.name for t in reduced_suite.tasks), m.name
    for r in bench_results.results:
        if r.status == "ok":
            assert r.score is not None and math.isfinite(r.score)
            assert r.target_nll is not None and r.target_nll > 0
    singles = [m for m in bench_results.methods if m.kind == "single"]
    assert len(singles) == len(reduced_suite.experts)


def test_a_recipe_evaluated_in_distribution_still_runs_held_out(bench_results):
    """DAM's taxonomy record says in-distribution (what its paper evaluated); that is no reason to refuse a
    held-out task, so embedding centroids run on every split."""
    rs = [r for r in bench_results.results if r.method == "embedding_centroids"]
    assert {r.split for r in rs} == {"held_in", "held_out"}
    assert all(r.status == "ok" for r in rs)


def test_oracle_and_single_experts_match_dense_reference(bench_results, reduced_suite, base_model):
    model, tokenizer = base_model
    lib = reduced_suite.open_library()
    for task in reduced_suite.held_in:
        expert = lib.get(task.oracle_expert)
        want, want_acc = dense_reference(model, tokenizer, task, expert)
        oracle = bench_results.result("oracle", task.name)
        single = bench_results.result(f"single:{task.oracle_expert}", task.name)
        assert oracle.target_nll == pytest.approx(want, rel=1e-4)
        assert single.target_nll == pytest.approx(want, rel=1e-4)
        assert oracle.token_accuracy == pytest.approx(want_acc) == single.token_accuracy
        assert oracle.routing_accuracy == pytest.approx(1.0)
    for task in reduced_suite.tasks:
        base = bench_results.result("base", task.name)
        nll, acc = dense_reference(model, tokenizer, task)
        assert base.target_nll == pytest.approx(nll, rel=1e-4)
        if task.metric == "exact_match":
            assert base.token_accuracy == pytest.approx(acc)
        else:
            assert base.token_accuracy is None


def test_oracle_routes_each_switching_segment_to_its_expert(bench_results, reduced_suite, base_model):
    """Per-token ground truth on a switching sequence: the same numbers as running each example with the
    experts folded in per segment is not expressible densely, so check the routing record instead."""
    r = bench_results.result("oracle", "switch")
    assert r.routing_accuracy == pytest.approx(1.0)
    assert r.routing_entropy == pytest.approx(0.0, abs=1e-6)
    assert sum(r.mean_weights) == pytest.approx(1.0, rel=1e-5)


def test_uniform_merge_equals_uniform_output_mixture(bench_results, reduced_suite):
    """For LoRA on linear modules Σ wᵢBᵢAᵢx = (Σ wᵢBᵢAᵢ)x: the merge engine's dense uniform merge folded into
    the weights and the expert layer's uniform output mix must agree."""
    for task in reduced_suite.tasks:
        merged = bench_results.result("uniform_merge", task.name).target_nll
        mixed = bench_results.result("uniform", task.name).target_nll
        assert merged == pytest.approx(mixed, rel=1e-4)


def test_best_single_is_one_of_the_singles(bench_results):
    best = bench_results.method("best_single")
    chosen = best.options["chosen"]
    for split, name in chosen.items():
        for r in bench_results.results:
            if r.method == "best_single" and r.split == split:
                assert r.target_nll == bench_results.result(f"single:{name}", r.task).target_nll


def test_missing_artifacts_are_reported_and_unknown_names_refused_up_front(
    reduced_suite, base_model, tmp_path
):
    from moerge.experts.library import ExpertLibrary

    model, tokenizer = base_model
    # a fresh copy of the library without any routing artifacts
    lib = ExpertLibrary.create(tmp_path / "lib")
    src = reduced_suite.open_library()
    for n in reduced_suite.experts:
        lib.add(src.get(n))
    config = BenchConfig(
        recipes=["average_activation"], baselines=["base"], prepare_artifacts=False, progress=False, limit=2
    )
    res = run_bench(reduced_suite, config, model=model, tokenizer=tokenizer, library=lib)
    aa = res.method("average_activation")
    assert aa.status == "not_applicable" and "centroids" in aa.reason
    assert all(r.status == "ok" for r in res.results if r.method == "base")
    # an unknown recipe, a bad option or an unknown baseline is refused before anything runs
    for bad, match in [
        ({"recipes": ["average_activation", "no_such_recipe"]}, "unknown recipe 'no_such_recipe'"),
        ({"recipes": ["arrow:topk=2"]}, "option topk"),
        ({"recipes": ["arrow"], "baselines": ["nope"]}, "unknown baselines"),
    ]:
        with pytest.raises(MoergeError, match=match):
            run_bench(reduced_suite, config.model_copy(update=bad), model=None, tokenizer=None, library=lib)


def test_runner_trains_missing_gates_on_each_experts_training_examples(reduced_suite, base_model, tmp_path):
    """A library without gates: the runner trains them as the contributor would, on the expert's own training
    examples (prompt/completion, loss on the completion) and with the expert's batch size and data seed."""
    from moerge.experts.library import ExpertLibrary
    from moerge.train.data import encode_examples
    from moerge.train.gates import GATES_KIND, gates_config

    model, tokenizer = base_model
    lib = ExpertLibrary.create(tmp_path / "lib")
    for n in reduced_suite.experts:
        lib.add(reduced_suite.open_library().get(n))
    config = BenchConfig(recipes=["phatgoose:gate_steps=2"], baselines=["base"], limit=1, progress=False)
    res = run_bench(reduced_suite, config, model=model, tokenizer=tokenizer, library=lib)
    assert res.method("phatgoose:gate_steps=2").status == "ok"
    assert any("phatgoose_gates" in n for n in res.notes)
    for task in reduced_suite.held_in:
        tensors, meta = lib.get_artifact(GATES_KIND, gates_config(2), task.name)
        trained = lib.get_metadata(task.name).training
        assert set(tensors) == set(lib.get(task.name).lora)
        assert meta["steps"] == 2 and meta["lr"] == 5e-3
        assert (meta["batch_size"], meta["seq_len"], meta["seed"]) == (
            trained["batch_size"], trained["seq_len"], trained["seed"]
        )  # fmt: skip
        assert meta["examples"] == len(encode_examples(tokenizer, task.training_rows(), trained["seq_len"]))


def test_routing_stats_by_hand():
    # 1 layer, 1 example, 3 positions, 2 experts; tokens 1 and 2 are scored, labelled expert 0 then expert 1
    w = torch.tensor([[[[0.75, 0.25], [0.5, 0.5], [0.0, 1.0]]]])
    routes = torch.tensor([[[False, False], [True, False], [False, True]]])
    labels = torch.tensor([[-100, 5, 6]])
    st = routing_stats(w, routes, labels)
    # position 0 predicts token 1 (label expert 0): mass 0.75; position 1 predicts token 2 (expert 1): 0.5
    assert st["acc_sum"] == pytest.approx(1.25) and st["acc_n"] == 2
    h = lambda p: -sum(x * math.log(x) for x in p if x > 0)  # noqa: E731
    assert st["ent_sum"] == pytest.approx(h([0.75, 0.25]) + h([0.5, 0.5]), rel=1e-5)
    assert st["weight_sum"].tolist() == pytest.approx([1.25, 0.75])


def test_normalize_base_zero_oracle_one():
    def r(method, task, score):
        return TaskResult(method=method, task=task, split="held_in", condition="c", metric="nll", score=score)

    rs = [r("base", "a", 3.0), r("oracle", "a", 1.0), r("m", "a", 2.5), r("base", "b", 2.0), r("oracle", "b", 2.0),
          r("m", "b", 1.0)]  # fmt: skip
    normalize(rs)
    got = {(x.method, x.task): x.normalized for x in rs}
    assert got[("base", "a")] == 0.0 and got[("oracle", "a")] == 1.0
    assert got[("m", "a")] == pytest.approx(0.25)
    assert got[("m", "b")] is None  # oracle == base: undefined


def test_parse_method():
    m = parse_method("arrow:k=2,granularity=example,temperature=0.5")
    assert (m.recipe, m.options) == ("arrow", {"k": 2, "granularity": "example", "temperature": 0.5})
    with pytest.raises(Exception, match="key=value"):
        parse_method("arrow:k")


def test_oracle_trace_follows_the_labels(bench_results):
    t = bench_results.result("oracle", "switch").trace
    labelled = [(c, g) for c, g in zip(t["chosen"], t["truth"]) if g >= 0]
    assert labelled and all(c == g for c, g in labelled)


def test_example_level_routers_never_see_the_answers(reduced_suite, base_model):
    from moerge.bench.metrics import routing_view
    from moerge.bench.suites.format import collate

    _, tokenizer = base_model
    task = reduced_suite.task("switch")
    batch = collate(task.name, task.eval[:3], tokenizer, reduced_suite.experts)
    mask, texts = routing_view(batch)
    assert not (mask.bool() & (batch.labels != -100)).any()
    for ex, text in zip(batch.examples, texts):
        answers = ex.completions()
        assert text == "".join(c for i, c in enumerate(ex.text) if not any(s <= i < e for s, e in ex.targets))
        assert len(text) == len(ex.text) - sum(len(a) for a in answers)


def test_oracle_on_switching_matches_per_token_dense_reference(bench_results, reduced_suite, base_model):
    """Reference: every expert folded densely into its own copy of the model; each target token's log-prob
    taken from the copy of its ground-truth expert (the mean of the logits where it has several)."""
    import copy

    model, tokenizer = base_model
    lib = reduced_suite.open_library()
    names = reduced_suite.experts
    copies = []
    for n in names:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for mod, lm in lib.get(n).lora.items():
                m.get_submodule(mod).weight += (lm.alpha / lm.rank) * (lm.B @ lm.A)
        copies.append(m)
    for task_name in ("switch", "blend0_4"):
        task = reduced_suite.task(task_name)
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in task.eval_batches(tokenizer, batch_size=4, experts=names):
                ids = batch.input_ids
                for b in range(ids.shape[0]):
                    for t in range(1, ids.shape[1]):
                        if batch.labels[b, t] == -100:
                            continue
                        experts = batch.routes[b, t].nonzero().flatten().tolist()
                        if experts:
                            lg = torch.stack(
                                [copies[e](input_ids=ids[b : b + 1]).logits[0, t - 1] for e in experts]
                            )
                            lg = lg.mean(0)
                        else:
                            lg = model(input_ids=ids[b : b + 1]).logits[0, t - 1]
                        total -= float(torch.log_softmax(lg.double(), -1)[batch.labels[b, t]])
                        count += 1
        got = bench_results.result("oracle", task_name).target_nll
        assert got == pytest.approx(total / count, rel=1e-4), task_name


def test_label_routing_equals_oracle_on_held_in(bench_results, reduced_suite):
    for task in reduced_suite.held_in:
        a = bench_results.result("label_routing", task.name).target_nll
        b = bench_results.result("oracle", task.name).target_nll
        assert a == pytest.approx(b, rel=1e-4)


def test_merges_are_tuned_on_held_in_data_and_untuned_rows_kept(bench_results):
    """λ (and TIES' density) are the argmax of the recorded grid; the untuned defaults are extra rows."""
    from moerge.bench.config import MergeBaselineConfig

    defaults = MergeBaselineConfig()
    for name, grid_keys in (("task_arithmetic", {"scale"}), ("ties", {"scale", "density"})):
        tuned = bench_results.method(name).options["tuned"]
        grid = tuned["grid"]
        sizes = {
            "task_arithmetic": len(defaults.task_arithmetic_scales),
            "ties": len(defaults.ties_scales) * len(defaults.ties_densities),
        }
        assert len(grid) == sizes[name]
        best = max(grid, key=lambda g: (g["quality"], -g["nll"]))
        assert {k: best[k] for k in grid_keys} == {k: tuned[k] for k in grid_keys}
        assert "chosen on held-in" in bench_results.method(name).description
        untuned = bench_results.method(f"{name}:untuned")
        assert untuned.status == "ok" and "not tuned" in untuned.description
        assert {r.task for r in bench_results.results if r.method == name} == {
            t["name"] for t in bench_results.tasks
        }


def test_scaled_fold_equals_merging_with_that_scale(reduced_suite, base_model):
    """Tuning folds λ·τ_merged(scale=1); that equals the method run with scale=λ (both methods are linear in λ)."""
    from moerge.bench.subjects import folded
    from moerge.merging.api import merge

    model, tok = base_model
    lib = reduced_suite.open_library()
    experts = [lib.get(n) for n in reduced_suite.experts]
    ids = tok(["abc>def"], return_tensors="pt")["input_ids"]
    for method, params in (("task_arithmetic", {}), ("ties", {"density": 0.3})):
        one = merge(
            merge_method=method, experts=experts, lora_mode="dense", parameters={**params, "scale": 1.0}
        )
        direct = merge(
            merge_method=method, experts=experts, lora_mode="dense", parameters={**params, "scale": 1.7}
        )
        with torch.no_grad():
            with folded(model, one, 1.7) as m:
                a = m(input_ids=ids).logits
            with folded(model, direct) as m:
                b = m(input_ids=ids).logits
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
