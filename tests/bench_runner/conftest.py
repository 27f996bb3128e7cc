"""Fixtures for the benchmark-runner tests: one runner pass over the shared reduced synthetic suite
(tests/conftest.py)."""

from __future__ import annotations

import pytest

RECIPES = ["arrow", "arrow:granularity=example", "phatgoose:gate_steps=4", "embedding_centroids", "uniform"]


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
