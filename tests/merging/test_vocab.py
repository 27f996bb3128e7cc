"""`tokenizer_source` / `tokenizer:` (moerge.merging.vocab): the union vocabulary and the aligned embeddings,
against a dense reference written out here (mergekit's own numbers: tests/compat)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moerge.errors import MalformedConfigError
from moerge.merging.folders import CheckpointReader

VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def with_added_tokens(src: Path, dst: Path, tokens: list[str], seed: int) -> Path:
    """``src`` with its tokenizer adding ``tokens`` and random new embedding / LM-head rows."""
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    tok.save_pretrained(str(dst))
    sd = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for k in VOCAB_KEYS:
        sd[k] = torch.cat([sd[k], torch.randn(len(tokens), sd[k].shape[1], generator=g)])
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = sd["lm_head.weight"].shape[0]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def sd(folder: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(folder) as r:
        return {k: r.get(k).float() for k in r.names()}


@pytest.fixture(scope="module")
def tok_models(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {
        "base": model_dirs["base"],
        "t0": with_added_tokens(model_dirs["ft0"], root / "t0", ["<A>", "<B>"], seed=10),
        "t1": with_added_tokens(model_dirs["ft1"], root / "t1", ["<B>", "<C>"], seed=11),
    }


def test_union_aligns_embeddings_and_saves_the_union_tokenizer(tok_models, tmp_path):
    from transformers import AutoTokenizer

    import moerge

    base, t0, t1 = (tok_models[k] for k in ("base", "t0", "t1"))
    w = [0.6, 0.3]
    out = moerge.merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(t), "parameters": {"weight": wi}} for t, wi in zip((t0, t1), w)],
            "tokenizer_source": "union",
        },
        tmp_path / "out",
    )
    b, x0, x1, got = sd(base), sd(t0), sd(t1), sd(out)
    v = b["lm_head.weight"].shape[0]
    # union: the base's tokens, then <A>, <B> (t0's), then <C> (t1's); t1 holds <B> at v and <C> at v + 1
    vocab = AutoTokenizer.from_pretrained(str(out)).get_vocab()
    assert [vocab[t] for t in ("<A>", "<B>", "<C>")] == [v, v + 1, v + 2] and len(vocab) == v + 3
    assert json.loads((out / "config.json").read_text())["vocab_size"] == v + 3
    for k in got:
        if k not in VOCAB_KEYS:
            ref = b[k] + sum(wi * (x[k] - b[k]) for wi, x in zip(w, (x0, x1)))
            torch.testing.assert_close(got[k], ref, rtol=0, atol=1e-6)
            continue
        a_row = x0[k][v]  # only t0 has <A>: its row, in every input
        b_row = (x0[k][v + 1] + x1[k][v]) / 2  # t0 and t1 have <B>, the base lacks it: their mean
        c_row = x1[k][v + 1]  # only t1 has <C>
        aligned_base = torch.cat([b[k], torch.stack([a_row, b_row, c_row])])
        aligned0 = torch.cat([x0[k][: v + 2], c_row[None]])
        aligned1 = torch.cat([x1[k][:v], torch.stack([a_row, x1[k][v], c_row])])
        ref = aligned_base + w[0] * (aligned0 - aligned_base) + w[1] * (aligned1 - aligned_base)
        torch.testing.assert_close(got[k], ref, rtol=0, atol=1e-6)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == v + 3


def test_tokenizer_block_zero_force_and_padding(tok_models, tmp_path):
    import moerge

    base, t0, t1 = (tok_models[k] for k in ("base", "t0", "t1"))
    out = moerge.merge(
        {
            "merge_method": "linear",
            "base_model": str(base),
            "models": [{"model": str(t), "parameters": {"weight": 1.0}} for t in (base, t0)],
            "parameters": {"normalize": True},
            "tokenizer": {
                "source": "base",
                "pad_to_multiple_of": 16,
                "tokens": {"<Z>": {"source": {"kind": "zero"}}, "x": {"source": str(t0), "force": True}},
            },
        },
        tmp_path / "out",
    )
    b, x0, got = sd(base), sd(t0), sd(out)
    v = b["lm_head.weight"].shape[0]
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(out)).get_vocab()
    assert vocab["<Z>"] == v and "<A>" not in vocab
    n = -(-(v + 1) // 16) * 16
    x = vocab["x"]
    for k in VOCAB_KEYS:
        rows = torch.cat([(b[k] + x0[k][:v]) / 2, torch.zeros(1, b[k].shape[1])])
        rows[x] = x0[k][x]  # forced: t0's row in both inputs
        ref = torch.cat([rows, rows.mean(0).expand(n - v - 1, -1)])
        torch.testing.assert_close(got[k], ref, rtol=0, atol=1e-6)


def test_tokenizer_config_refusals(tok_models, tmp_path):
    import moerge

    base, t0 = str(tok_models["base"]), str(tok_models["t0"])
    common = {"merge_method": "task_arithmetic", "base_model": base, "models": [t0]}
    with pytest.raises(MalformedConfigError, match="not both"):
        moerge.merge(
            {**common, "tokenizer_source": "union", "tokenizer": {"source": "union"}}, tmp_path / "a"
        )
    with pytest.raises(MalformedConfigError, match="not an input"):
        moerge.merge(
            {**common, "tokenizer": {"tokens": {"<A>": {"source": str(tmp_path), "force": True}}}},
            tmp_path / "b",
        )
    with pytest.raises(Exception, match="vocab_size differs"):  # without an output tokenizer: refused
        moerge.merge(common, tmp_path / "c")
    assert not (tmp_path / "b").exists()
    bare = tmp_path / "bare"  # a model folder without its tokenizer
    bare.mkdir()
    for f in ("model.safetensors", "config.json"):
        shutil.copyfile(tok_models["t0"] / f, bare / f)
    with pytest.raises(MalformedConfigError, match="tokenizer does not load"):
        moerge.merge({**common, "models": [str(bare)], "tokenizer_source": "union"}, tmp_path / "d")
