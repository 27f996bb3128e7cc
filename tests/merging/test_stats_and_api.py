"""Data statistics (Fisher, Gram) against direct computations; RegMean / Fisher merges end to end; the YAML
config, the CLI and the Python API validated by one model; library LoRA merges; greedy soup."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import moerge
from moerge.errors import MalformedConfigError
from moerge.merging.folders import CheckpointReader
from moerge.merging.stats import fisher_diagonal, gram_matrices, load_stats, save_stats

from .conftest import LLAMA_MODULES


def state(folder):
    with CheckpointReader(folder) as r:
        return {k: r.get(k) for k in r.names()}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(4, 90, (3, 12), generator=torch.Generator().manual_seed(0))


def test_gram_matrices_are_inputs_transposed_times_inputs(model_dirs, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["ft0"])
    grams, fifo = gram_matrices(model, [tokens[:2], tokens[2:]])
    assert not fifo
    with torch.no_grad():
        hs = model(tokens, output_hidden_states=True).hidden_states
        x = model.model.layers[1].input_layernorm(hs[1]).reshape(-1, 32)
    torch.testing.assert_close(grams["model.layers.1.self_attn.q_proj.weight"], x.T @ x, rtol=1e-4, atol=1e-4)


def test_fisher_is_the_mean_of_squared_per_example_gradients(model_dirs, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["ft0"])
    name = "model.layers.0.mlp.down_proj.weight"
    fisher = fisher_diagonal(model, [tokens], labels="empirical", params=[name])
    param = dict(model.named_parameters())[name]
    sq = torch.zeros_like(param)
    for i in range(3):
        logits = model(tokens[i : i + 1]).logits[0, :-1]
        ll = torch.log_softmax(logits, -1).gather(-1, tokens[i, 1:, None]).sum()
        (g,) = torch.autograd.grad(ll, param)
        sq += g**2
    torch.testing.assert_close(fisher[name], sq / 3, rtol=1e-4, atol=1e-10)


def test_regmean_and_fisher_full_merges(model_dirs, tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(2):
        model = AutoModelForCausalLM.from_pretrained(model_dirs[f"ft{i}"])
        grams, fifo = gram_matrices(model, [tokens[i : i + 2]])
        paths.append(save_stats(grams, tmp_path / f"gram{i}.safetensors", "gram", fifo))
    assert load_stats(paths[0])[1] == "gram"
    cfg = {
        "merge_method": "regmean",
        "parameters": {"alpha": 0.5},
        "models": [{"model": str(model_dirs[f"ft{i}"]), "stats": str(paths[i])} for i in range(2)],
    }
    out = state(moerge.merge(cfg, tmp_path / "rm"))
    s0, s1 = state(model_dirs["ft0"]), state(model_dirs["ft1"])
    k = "model.layers.0.self_attn.v_proj.weight"
    g = [load_stats(p)[0][k].double() for p in paths]
    g = [0.5 * gi + 0.5 * torch.diag(torch.diag(gi)) for gi in g]
    ref = torch.linalg.solve(g[0] + g[1], g[0] @ s0[k].double().T + g[1] @ s1[k].double().T).T
    torch.testing.assert_close(out[k], ref.float(), rtol=1e-4, atol=1e-5)
    norm = "model.norm.weight"
    torch.testing.assert_close(out[norm], (s0[norm] + s1[norm]) / 2)
    with pytest.raises(MalformedConfigError, match="needs gram statistics"):
        moerge.merge({**cfg, "models": [str(model_dirs["ft0"]), str(model_dirs["ft1"])]}, tmp_path / "no")
    # equal Fishers: the average
    f = {k: torch.ones_like(v) for k, v in s0.items()}
    fp = [save_stats(f, tmp_path / f"f{i}.safetensors", "fisher") for i in range(2)]
    out = state(
        moerge.merge(
            {
                "merge_method": "fisher",
                "models": [{"model": str(model_dirs[f"ft{i}"]), "stats": str(fp[i])} for i in range(2)],
            },
            tmp_path / "fm",
        )
    )
    torch.testing.assert_close(out[k], (s0[k] + s1[k]) / 2)
    with pytest.raises(MalformedConfigError, match="holds fisher statistics"):
        moerge.merge(
            {**cfg, "models": [{"model": str(model_dirs["ft0"]), "stats": str(fp[0])}]}, tmp_path / "bad"
        )


def test_config_errors_are_one_clear_line(model_dirs, tmp_path):
    m = [str(model_dirs["ft0"])]
    with pytest.raises(MalformedConfigError, match="unknown merge method 'tie'; valid methods: .*ties"):
        moerge.merge(merge_method="tie", models=m, out=tmp_path / "a")
    with pytest.raises(MalformedConfigError, match="no parameter 'dense'.*density"):
        moerge.merge(
            merge_method="ties",
            base_model=str(model_dirs["base"]),
            models=m,
            parameters={"dense": 1},
            out=tmp_path / "b",
        )
    with pytest.raises(MalformedConfigError, match="merge_methd: unknown key"):
        moerge.merge({"merge_methd": "ties", "merge_method": "ties", "models": m}, tmp_path / "c")
    with pytest.raises(MalformedConfigError, match="explicit lora_mode"):
        moerge.merge(merge_method="linear", library=str(tmp_path), models=["a"])


def test_cli_yaml_equals_python_api(model_dirs, tmp_path):
    from typer.testing import CliRunner

    from moerge.cli import app

    cfg = {
        "merge_method": "dare_ties",
        "base_model": str(model_dirs["base"]),
        "models": [
            {"model": str(model_dirs[f"ft{i}"]), "parameters": {"weight": 0.5, "density": 0.5}}
            for i in range(2)
        ],
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
        "seed": 3,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    py = moerge.merge(cfg, tmp_path / "py")
    a, b = state(tmp_path / "cli"), state(py)
    for k in a:
        assert torch.equal(a[k], b[k])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg, "merge_method": "nope"}))
    import sys

    from moerge.cli.common import run_app

    argv, sys.argv = sys.argv, ["moerge", "merge", str(bad), str(tmp_path / "x")]
    try:
        assert run_app(app) == 1
    finally:
        sys.argv = argv


def test_library_lora_merge_from_yaml(lora_experts, tmp_path):
    from moerge.experts.library import ExpertLibrary
    from moerge.experts.peft_io import read_peft_folder

    lib = ExpertLibrary.create(tmp_path / "lib")
    for e in lora_experts:
        lib.add(e)
    cfg = {
        "merge_method": "task_arithmetic",
        "library": str(tmp_path / "lib"),
        "lora_mode": "exact",
        "models": [
            {"model": "e0", "parameters": {"weight": 0.5}},
            {"model": "e2", "parameters": {"weight": 1.5}},
        ],
        "name": "e0_e2",
        "add_to_library": True,
    }
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from typer.testing import CliRunner

    from moerge.cli import app

    res = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "adapter")])
    assert res.exit_code == 0, res.output
    assert "e0_e2" in lib
    stored = lib.get("e0_e2")
    folder = read_peft_folder(tmp_path / "adapter")
    m = next(iter(LLAMA_MODULES))
    expected = 0.5 * lora_experts[0].lora[m].delta() + 1.5 * lora_experts[2].lora[m].delta()
    torch.testing.assert_close(stored.lora[m].delta(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folder.lora[m].delta(), expected, rtol=1e-5, atol=1e-5)
    md = lib.get_metadata("e0_e2")
    assert (
        md.training["merge"]["merge_method"] == "task_arithmetic" and md.extra["merge_lora_mode"] == "exact"
    )
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_greedy_soup_keeps_only_helpful_ingredients(lora_experts):
    """Held-out score: closeness of the soup's ΔW to a target that e0 and e1 average to; e2 hurts."""
    m = next(iter(LLAMA_MODULES))
    target = (lora_experts[0].lora[m].delta() + lora_experts[1].lora[m].delta()) / 2

    def evaluate(expert):
        return -float((expert.lora[m].delta() - target).norm())

    soup = moerge.merge(
        merge_method="greedy_soup", experts=lora_experts, lora_mode="exact", evaluate=evaluate
    )
    assert sorted(soup.metadata.extra["greedy_soup"]["chosen"]) == ["e0", "e1"]
    torch.testing.assert_close(soup.lora[m].delta(), target, rtol=1e-5, atol=1e-5)


def test_regmean_on_gpt2_conv1d_uses_the_input_axis(tmp_path, tokens):
    """GPT-2's Conv1D stores weights [d_in, d_out]; the Gram is recorded as fan-in-fan-out and used so."""
    from transformers import AutoModelForCausalLM

    from moerge.backbones.tiny import save_tiny_model

    from .conftest import perturbed_copy

    base = save_tiny_model(tmp_path / "g", architecture="gpt2", hidden_size=32, intermediate_size=64, seed=0)
    fts = [perturbed_copy(base, tmp_path / f"g{i}", seed=i + 7) for i in range(2)]
    paths = []
    for i, f in enumerate(fts):
        grams, fifo = gram_matrices(AutoModelForCausalLM.from_pretrained(f), [tokens[i : i + 2]])
        assert "transformer.h.0.attn.c_attn.weight" in fifo
        paths.append(save_stats(grams, tmp_path / f"gg{i}.safetensors", "gram", fifo))
    out = state(
        moerge.merge(
            {
                "merge_method": "regmean",
                "parameters": {"alpha": 1.0},
                "models": [{"model": str(f), "stats": str(p)} for f, p in zip(fts, paths)],
            },
            tmp_path / "out",
        )
    )
    k = "transformer.h.0.attn.c_attn.weight"  # [d_in=32, d_out=96]
    g = [load_stats(p)[0][k].double() for p in paths]
    w = [state(f)[k].double() for f in fts]
    ref = torch.linalg.solve(g[0] + g[1], g[0] @ w[0] + g[1] @ w[1])
    torch.testing.assert_close(out[k], ref.float(), rtol=1e-4, atol=1e-5)


def test_lora_experts_of_different_bases_are_refused(lora_experts):
    from moerge.errors import BaseModelMismatchError

    a, b = (e.to() for e in lora_experts[:2])
    a.metadata.base_fingerprint, b.metadata.base_fingerprint = "sha256:aaa", "sha256:bbb"
    with pytest.raises(BaseModelMismatchError, match="different base models"):
        moerge.merge(merge_method="linear", experts=[a, b], lora_mode="exact")
