"""Fixtures for the library tests: PEFT-saved adapters on the tiny models."""

from __future__ import annotations

import pytest
from library_helpers import ADAPTER_CASES, save_peft_adapter


@pytest.fixture(scope="session")
def peft_adapters(tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory):
    """{case: (base_dir, adapter_dir, peft_model)} for every ADAPTER_CASES entry."""
    out = {}
    for case, (arch, kwargs) in ADAPTER_CASES.items():
        base = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
        folder = tmp_path_factory.mktemp(case)
        out[case] = (base, folder, save_peft_adapter(base, folder, **kwargs))
    return out
