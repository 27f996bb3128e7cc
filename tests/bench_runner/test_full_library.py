"""The benchmark's full-fine-tune library (one dense task vector per held-in task, built beside the reduced
suite) and a run on it: every expert alone scored as its task vector folded into the base weights, written
out; the merges of task vectors; recipes that read LoRA factors reported not applicable."""

from __future__ import annotations

import pytest
import torch

from moerge.train.full import FullTrainConfig, trainable_names

FULL = FullTrainConfig(steps=6, lr=1e-3, batch_size=8, seq_len=32, stats_rows=8, progress=False)


@pytest.fixture(scope="session")
def full_library(reduced_suite):
    from moerge.bench.suites.build import build_full_library

    return build_full_library(reduced_suite, FULL, progress=False)


@pytest.fixture(scope="session")
def full_results(reduced_suite, base_model, full_library):
    from moerge.bench.config import MergeBaselineConfig, default_merges
    from moerge.bench.runner import BenchConfig, run_bench

    model, tokenizer = base_model
    config = BenchConfig(
        recipes=["average_activation", "arrow", "lora_retriever:composition=fusion"],
        baselines=["base", "oracle", "best_single", "merges"],
        expert_library="full", full_finetune=FULL, batch_size=8, progress=False, premise=False,
        experts=reduced_suite.experts[:3],
        merges=MergeBaselineConfig(methods=default_merges()[1:2], tune=False),
    )  # fmt: skip
    return run_bench(reduced_suite, config, model=model, tokenizer=tokenizer)


def test_full_library_holds_one_task_vector_per_held_in_task(reduced_suite, base_model, full_library):
    model, _ = base_model
    assert full_library.names() == sorted(reduced_suite.experts)
    linear = set(trainable_names(model, "linear"))
    assert "lm_head.weight" not in linear and not any("norm" in n or "embed" in n for n in linear)
    for name in full_library.names():
        e = full_library.get(name)
        assert e.kind == "dense" and set(e.dense) == linear
        assert any(t.abs().max() > 0 for t in e.dense.values())
        assert e.metadata.training["method"] == "full" and e.metadata.training["steps"] == FULL.steps
        for kind in ("fisher", "gram"):
            from moerge.bench.suites.build import STATS_CONFIG

            assert full_library.get_artifact(kind, STATS_CONFIG, name) is not None


def test_full_library_is_cached(reduced_suite, full_library, monkeypatch):
    import moerge.train.full as full
    from moerge.bench.suites.build import build_full_library

    monkeypatch.setattr(full, "train_full_expert", lambda *a, **k: pytest.fail("trained again"))
    again = build_full_library(reduced_suite, FULL, progress=False)
    assert again.url == full_library.url


def test_single_dense_expert_scores_as_its_folded_task_vector(
    reduced_suite, base_model, full_library, full_results
):
    """``single:X`` routes X's ΔW through the expert layers; the reference adds X's task vector into a copy of the
    base weights and scores it with the plain scorer."""
    import copy

    from moerge.bench.metrics import evaluate_task

    model, tokenizer = base_model
    task = next(t for t in reduced_suite.held_in if t.name == reduced_suite.experts[0])
    folded = copy.deepcopy(model)
    params = dict(folded.named_parameters())
    with torch.no_grad():
        for k, d in full_library.get(task.name).dense.items():
            params[k] += d
    expected = evaluate_task(folded, tokenizer, task, batch_size=8)
    got = next(r for r in full_results.results if r.method == f"single:{task.name}" and r.task == task.name)
    assert got.status == "ok"
    assert got.score == pytest.approx(expected, abs=1e-6)
    oracle = next(r for r in full_results.results if r.method == "oracle" and r.task == task.name)
    assert oracle.score == pytest.approx(expected, abs=1e-6)  # a held-in task's oracle is its own expert


def test_methods_on_the_full_library(full_results):
    status = {m.name: (m.status, m.reason or "") for m in full_results.methods}
    for name in ("base", "oracle", "task_arithmetic", "fisher", "regmean", "average_activation"):
        assert status[name][0] == "ok", (name, status[name])
    assert status["arrow"][0] == "not_applicable" and "needs LoRA experts" in status["arrow"][1]
    fusion = status["lora_retriever:composition=fusion"]
    assert fusion[0] == "not_applicable" and "factor" in fusion[1]
