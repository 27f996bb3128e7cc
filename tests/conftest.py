"""Session-wide fixtures shared by every test area: tiny models built once, never downloaded."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Caches (suites, embeddings, dequantised models, remote catalogs) go to a throwaway folder, not ~/.cache.
os.environ["MOERGE_CACHE"] = tempfile.mkdtemp(prefix="moerge-test-cache-")
atexit.register(shutil.rmtree, os.environ["MOERGE_CACHE"], ignore_errors=True)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny Llama-style causal LM (transformers folder with tokenizer)."""
    from moerge.backbones.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), architecture="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A saved tiny GPT-2 (Conv1D layers, fan_in_fan_out) with tokenizer."""
    from moerge.backbones.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), architecture="gpt2", seed=0)


# ---------------------------------------------------------------------------------------------- one built suite
@pytest.fixture(scope="session")
def suite_root(tmp_path_factory):
    return tmp_path_factory.mktemp("suites")


@pytest.fixture(scope="session")
def reduced_config():
    """The reduced synthetic suite (8 held-in tasks, a few training steps: its numbers are not meaningful, its
    shapes and code paths are), shared by the suite tests and the benchmark-runner tests."""
    from moerge.bench.suites.synthetic import SyntheticSuiteConfig
    from moerge.train.pretrain import PretrainConfig

    return SyntheticSuiteConfig.reduced(
        n_eval=6,
        pretrain=PretrainConfig(steps=10, lr=3e-3, batch_size=16, seq_len=64, warmup_steps=2, progress=False),
        progress=False,
    )


@pytest.fixture(scope="session")
def reduced_suite(reduced_config, suite_root):
    from moerge.bench.suites.synthetic import build_synthetic_suite

    return build_synthetic_suite(reduced_config, root=suite_root)
