"""Shared fixtures for the routing tests: tiny models built once per session."""

from __future__ import annotations

import pytest
import torch
from _routing_helpers import TwoLayerMLP

from moerge.backbones.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_llama():
    model, tok = build_tiny_model(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, seed=1)
    return model, tok


@pytest.fixture(scope="session")
def tiny_gpt2():
    model, tok = build_tiny_model(
        architecture="gpt2", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, seed=2
    )
    return model, tok


@pytest.fixture(scope="session")
def mlp():
    torch.manual_seed(3)
    return TwoLayerMLP().eval()


def pytest_configure(config):
    # torch warns once that its sparse CSR support is "beta"; the CSR kernels are checked against references here.
    config.addinivalue_line("filterwarnings", "ignore:Sparse CSR tensor support is in beta")
