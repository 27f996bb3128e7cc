"""Fixtures for suite tests: the reduced synthetic suite, built once per session into a temporary cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def suite_root(tmp_path_factory):
    return tmp_path_factory.mktemp("suites")


@pytest.fixture(scope="session")
def reduced_config():
    from moerge.bench.suites.synthetic import SyntheticSuiteConfig

    return SyntheticSuiteConfig.reduced(progress=False)


@pytest.fixture(scope="session")
def reduced_suite(reduced_config, suite_root):
    from moerge.bench.suites.synthetic import build_synthetic_suite

    return build_synthetic_suite(reduced_config, root=suite_root)


@pytest.fixture(scope="session")
def char_tokenizer():
    from moerge.backbones.tiny import build_tokenizer

    return build_tokenizer()
