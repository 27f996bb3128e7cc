"""Full-checkpoint merges: streamed, sharded in and out, loadable, refusing incompatible models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import moerge
from moerge.errors import MalformedConfigError, ModelLoadError, ShapeMismatchError, UnsafeFormatError
from moerge.merging.folders import CheckpointReader

from .conftest import TINY, perturbed_copy


def state(folder):
    with CheckpointReader(folder) as r:
        return {k: r.get(k) for k in r.names()}


def test_ties_full_merge_equals_dense_reference_and_loads(model_dirs, tmp_path):
    d = model_dirs
    out = moerge.merge(
        {
            "merge_method": "ties",
            "base_model": str(d["base"]),
            "models": [
                {"model": str(d[f"ft{i}"]), "parameters": {"weight": w, "density": 0.4}}
                for i, w in enumerate([1.0, 0.5, 0.8])
            ],
            "parameters": {"lambda": 0.9},
        },
        tmp_path / "ties",
    )
    base, fts, merged = state(d["base"]), [state(d[f"ft{i}"]) for i in range(3)], state(out)
    w = torch.tensor([1.0, 0.5, 0.8])
    for k, b in base.items():  # reference: trim, elect, disjoint weighted mean, written out with sort
        taus = []
        for ft in fts:
            t = (ft[k] - b).flatten()
            kk = int(0.4 * t.numel())
            thr_idx = t.abs().sort(descending=True).indices[:kk]
            m = torch.zeros_like(t)
            m[thr_idx] = 1
            taus.append(t * m)
        tw = torch.stack(taus) * w[:, None]
        sign = torch.where(tw.sum(0) >= 0, 1.0, -1.0)
        agree = (tw.sign() == sign).float()
        den = (agree * w[:, None]).sum(0)
        mixed = (tw * agree).sum(0) / torch.where(den == 0, 1.0, den)
        torch.testing.assert_close(merged[k], b + 0.9 * mixed.reshape(b.shape), rtol=1e-5, atol=1e-6)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model(**tok("hi", return_tensors="pt")).logits.isfinite().all()
    card = (out / "README.md").read_text()
    assert (
        "merge_method: ties" in card
        and json.loads((out / "moerge_merge.json").read_text())["merge_method"] == "ties"
    )


def test_sharded_inputs_and_outputs_stream_and_agree(model_dirs, tmp_path):
    """Sharded inputs and a small shard size give many output shards with the same numbers as one file."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "ft0_sharded"
    AutoModelForCausalLM.from_pretrained(model_dirs["ft0"]).save_pretrained(sharded, max_shard_size="30KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    common = {
        "merge_method": "task_arithmetic",
        "base_model": str(model_dirs["base"]),
        "parameters": {"lambda": 0.5},
    }
    a = moerge.merge(
        {**common, "models": [str(sharded), str(model_dirs["ft1"])], "shard_size": "20KB"}, tmp_path / "a"
    )
    b = moerge.merge({**common, "models": [str(model_dirs["ft0"]), str(model_dirs["ft1"])]}, tmp_path / "b")
    index = json.loads((a / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((a / f).is_file() for f in files)
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k])
    AutoModelForCausalLM.from_pretrained(a)


def test_one_model_in_gives_that_model_out_and_tokenizer_is_copied(model_dirs, tmp_path):
    out = moerge.merge(
        merge_method="linear", models=[str(model_dirs["ft1"])], out=tmp_path / "one", dtype="float16"
    )
    src, got = state(model_dirs["ft1"]), state(out)
    for k in src:
        assert got[k].dtype == torch.float16
        torch.testing.assert_close(got[k], src[k].half())
    assert (out / "tokenizer.json").read_text() == (model_dirs["ft1"] / "tokenizer.json").read_text()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_slerp_with_base_listed_among_models_is_mergekit_style(model_dirs, tmp_path):
    d = model_dirs
    out = moerge.merge(
        merge_method="slerp",
        base_model=str(d["base"]),
        models=[str(d["base"]), str(d["ft0"])],
        parameters={"t": 0.0},
        out=tmp_path / "s0",
    )
    for k, v in state(d["base"]).items():
        torch.testing.assert_close(state(out)[k], v)


def test_refuses_models_that_differ(model_dirs, tmp_path):
    from moerge.backbones.tiny import save_tiny_model

    bigger = save_tiny_model(tmp_path / "bigger", **{**TINY, "intermediate_size": 96})
    with pytest.raises(ShapeMismatchError, match="intermediate|shape"):
        moerge.merge(merge_method="linear", models=[str(model_dirs["ft0"]), str(bigger)], out=tmp_path / "x")
    gpt2 = save_tiny_model(tmp_path / "gpt2", architecture="gpt2", hidden_size=32, intermediate_size=64)
    with pytest.raises(ShapeMismatchError, match="architectures"):
        moerge.merge(merge_method="linear", models=[str(model_dirs["ft0"]), str(gpt2)], out=tmp_path / "y")
    other_vocab = perturbed_copy(model_dirs["base"], tmp_path / "vocab", seed=5)
    cfg = json.loads((other_vocab / "config.json").read_text())
    cfg["vocab_size"] += 1
    (other_vocab / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match="vocab_size"):
        moerge.merge(
            merge_method="linear", models=[str(model_dirs["ft0"]), str(other_vocab)], out=tmp_path / "z"
        )
    tok = perturbed_copy(model_dirs["base"], tmp_path / "tok", seed=6)
    data = json.loads((tok / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tok / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ShapeMismatchError, match="tokenizers"):
        moerge.merge(merge_method="linear", models=[str(model_dirs["ft0"]), str(tok)], out=tmp_path / "w")


def test_refuses_pickles_and_missing_base(model_dirs, tmp_path):
    pk = tmp_path / "pickled"
    pk.mkdir()
    shutil.copy(model_dirs["base"] / "config.json", pk / "config.json")
    torch.save({"x": torch.zeros(1)}, pk / "pytorch_model.bin")
    with pytest.raises(UnsafeFormatError, match="pickle"):
        moerge.merge(merge_method="linear", models=[str(model_dirs["ft0"]), str(pk)], out=tmp_path / "p")
    with pytest.raises(MalformedConfigError, match="needs base_model"):
        moerge.merge(merge_method="ties", models=[str(model_dirs["ft0"])], out=tmp_path / "q")


def test_dare_full_merge_is_seeded(model_dirs, tmp_path):
    cfg = {
        "merge_method": "dare_linear",
        "base_model": str(model_dirs["base"]),
        "models": [str(model_dirs["ft0"]), str(model_dirs["ft1"])],
        "parameters": {"density": 0.3},
    }
    a = state(moerge.merge({**cfg, "seed": 1}, tmp_path / "a"))
    b = state(moerge.merge({**cfg, "seed": 1}, tmp_path / "b"))
    c = state(moerge.merge({**cfg, "seed": 2}, tmp_path / "c"))
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k])
    base = load_file(str(model_dirs["base"] / "model.safetensors"))[k]
    kept_fraction = ((a[k] - base).abs() > 0).float().mean().item()
    assert 0.4 < kept_fraction < 0.6  # union of two density-0.3 masks ≈ 1 − 0.7² = 0.51


def test_mergekit_gradients_and_filters(model_dirs, tmp_path):
    """t: self_attn follows the gradient [0, 1] over the 2 layers, mlp is 1, everything else 0.5 (mergekit YAML)."""
    from .test_methods import ref_slerp

    d = model_dirs
    cfg = {
        "merge_method": "slerp",
        "base_model": str(d["base"]),
        "models": [str(d["base"]), str(d["ft0"])],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0.0, 1.0]},
                {"filter": "mlp", "value": 1.0},
                {"value": 0.5},
            ]
        },
    }
    out, base, ft = state(moerge.merge(cfg, tmp_path / "g")), state(d["base"]), state(d["ft0"])
    torch.testing.assert_close(
        out["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    torch.testing.assert_close(
        out["model.layers.1.self_attn.q_proj.weight"], ft["model.layers.1.self_attn.q_proj.weight"]
    )
    torch.testing.assert_close(
        out["model.layers.0.mlp.up_proj.weight"], ft["model.layers.0.mlp.up_proj.weight"]
    )
    k = "model.embed_tokens.weight"
    torch.testing.assert_close(out[k], ref_slerp(0.5, base[k], ft[k]), rtol=1e-5, atol=1e-6)
    with pytest.raises(MalformedConfigError, match=r"parameter t: .*filter"):
        moerge.merge({**cfg, "parameters": {"t": [{"filtr": "mlp", "value": 1.0}]}}, tmp_path / "bad")
    with pytest.raises(MalformedConfigError, match=r"parameter models\[0\]\.weight"):
        moerge.merge(
            {"merge_method": "linear", "models": [{"model": str(d["ft0"]), "parameters": {"weight": ["x"]}}]},
            tmp_path / "bad2",
        )


def test_greedy_soup_of_checkpoints(model_dirs, tmp_path):
    k = "model.layers.0.mlp.up_proj.weight"
    target = (state(model_dirs["ft0"])[k] + state(model_dirs["ft1"])[k]) / 2

    def evaluate(sd):  # held-out score: closeness of one tensor to the ft0/ft1 average
        return -float((sd[k] - target).norm())

    out = moerge.merge(
        merge_method="greedy_soup",
        models=[str(model_dirs[f"ft{i}"]) for i in range(3)],
        evaluate=evaluate,
        out=tmp_path / "greedy",
    )
    torch.testing.assert_close(state(out)[k], target)
    chosen = json.loads((out / "moerge_merge.json").read_text())["greedy_soup"]["chosen"]
    assert sorted(chosen) == sorted([str(model_dirs["ft0"]), str(model_dirs["ft1"])])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_a_hub_id_base_merges_like_its_folder(model_dirs, tmp_path, monkeypatch):
    """The base (and a model) may be a hub id, read from the local hub cache (HF_HUB_OFFLINE=1): the merge
    equals the dense task-arithmetic reference computed from the folders."""
    import huggingface_hub.constants as hf_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    for name in ("base", "ft0"):
        repo = tmp_path / "hub" / f"models--moerge-test--{name}"
        shutil.copytree(model_dirs[name], repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = moerge.merge(
        merge_method="task_arithmetic",
        base_model="moerge-test/base",
        models=["moerge-test/ft0", str(model_dirs["ft1"])],
        parameters={"lambda": 0.5},
        out=tmp_path / "merged",
    )
    base, ft0, ft1, merged = (
        state(p) for p in (model_dirs["base"], model_dirs["ft0"], model_dirs["ft1"], out)
    )
    for k, b in base.items():
        torch.testing.assert_close(merged[k], b + 0.5 * ((ft0[k] - b) + (ft1[k] - b)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelLoadError, match="moerge-test/missing: model not found"):
        moerge.merge(merge_method="linear", models=["moerge-test/missing"], out=tmp_path / "none")
