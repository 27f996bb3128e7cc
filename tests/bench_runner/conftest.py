"""Fixtures for the benchmark-runner tests: a reduced synthetic suite built once per session (5 held-in tasks,
a few training steps; its numbers are not meaningful, its shapes and code paths are), and one runner pass."""

from __future__ import annotations

import pytest

RECIPES = ["arrow", "arrow:granularity=example", "phatgoose:gate_steps=3", "embedding_centroids", "uniform"]


@pytest.fixture(scope="session")
def reduced_suite(tmp_path_factory):
    from moerge.bench.suites.synthetic import SyntheticSuiteConfig, build_synthetic_suite
    from moerge.train.pretrain import PretrainConfig

    config = SyntheticSuiteConfig.reduced(
        n_tasks=5,
        n_eval=6,
        pretrain=PretrainConfig(steps=10, lr=3e-3, batch_size=16, seq_len=64, warmup_steps=2, progress=False),
        progress=False,
    )
    config = config.model_copy(
        update={
            "expert": config.expert.model_copy(update={"progress": False}),
            "multitask": config.multitask.model_copy(update={"progress": False}),
        }
    )
    return build_synthetic_suite(config, root=tmp_path_factory.mktemp("suites"))


@pytest.fixture(scope="session")
def base_model(reduced_suite):
    return reduced_suite.load_base()


@pytest.fixture(scope="session")
def bench_results(reduced_suite, base_model):
    """Every baseline and a few recipes (one per routing family present) through the runner."""
    from moerge.bench.runner import BenchConfig, run_bench

    model, tokenizer = base_model
    config = BenchConfig(recipes=RECIPES, batch_size=4, progress=False)
    return run_bench(reduced_suite, config, model=model, tokenizer=tokenizer)
