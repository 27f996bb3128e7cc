"""Fixtures for suite tests (the reduced synthetic suite itself is shared from tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def char_tokenizer():
    from moerge.backbones.tiny import build_tokenizer

    return build_tokenizer()
