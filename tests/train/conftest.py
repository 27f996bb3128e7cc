"""Shared fixtures for training tests: one tiny base model per session, a small task data set."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama():
    from moerge.backbones.tiny import build_tiny_model

    return build_tiny_model(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2():
    from moerge.backbones.tiny import build_tiny_model

    return build_tiny_model(
        architecture="gpt2", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2
    )


@pytest.fixture(scope="session")
def reverse_data():
    """Prompt/completion rows: reverse a short lowercase word."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(64):
        w = "".join(rng.choice("abcdef") for _ in range(4))
        rows.append({"prompt": w + "=", "completion": w[::-1]})
    return rows
