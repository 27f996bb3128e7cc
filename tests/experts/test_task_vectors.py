"""Full fine-tunes as experts: ``moerge library add FOLDER --base BASE`` stores θ_ft − θ_base (against the two
state dicts subtracted here), and ``moerge library extract`` makes a LoRA by a per-matrix truncated SVD, the
rank chosen by an energy threshold (against torch.linalg.svd and the threshold applied by hand)."""

from __future__ import annotations

import pytest
import torch

from moerge.cli import app
from moerge.cli.common import run_app
from moerge.errors import MalformedConfigError
from moerge.experts.expert import Expert, ExpertMetadata
from moerge.experts.library import ExpertLibrary
from moerge.merging.task_vectors import energy_rank, extract_lora


def _spectrum_matrix(d_out, d_in, sigmas, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d_out, len(sigmas), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, len(sigmas), generator=g, dtype=torch.float64))
    return (U * torch.tensor(sigmas, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_extract_by_energy_matches_truncated_svd(energy):
    sigmas = [5.0, 3.0, 2.0, 1.0, 0.5, 0.25]
    delta = _spectrum_matrix(12, 9, sigmas, seed=0).float()
    norm = torch.randn(9)
    expert = Expert(
        ExpertMetadata(name="full", kind="dense"),
        dense={"m.q_proj.weight": delta, "m.norm.weight": norm, "m.q_proj.bias": torch.randn(12)},
    )
    lora = extract_lora(expert, energy=energy)
    # the threshold by hand: the smallest r with Σ_{i<r} σ_i² ≥ energy · Σ σ_i²
    total = sum(s * s for s in sigmas)
    r = next(k for k in range(1, len(sigmas) + 1) if sum(s * s for s in sigmas[:k]) >= energy * total)
    lm = lora.lora["m.q_proj"]
    assert lm.rank == r and energy_rank(torch.tensor(sigmas), energy) == r
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    reference = (U[:, :r] * S[:r]) @ Vh[:r]
    torch.testing.assert_close(lm.delta().double(), reference, rtol=1e-5, atol=1e-5)
    err = float(((delta.double() - lm.delta().double()) ** 2).sum())
    assert err == pytest.approx(sum(s * s for s in sigmas[r:]), rel=1e-4, abs=1e-6)  # Eckart–Young
    info = lora.metadata.extra["extracted"]
    assert sorted(info["left_out"]) == ["m.norm.weight", "m.q_proj.bias"]
    assert lora.kind == "lora" and lora.name == "full-lora"


def test_extract_fixed_rank_and_fan_in_fan_out():
    delta = _spectrum_matrix(6, 10, [4.0, 2.0, 1.0], seed=1).float()  # stored [d_in=6, d_out=10] (Conv1D)
    expert = Expert(ExpertMetadata(name="full", kind="dense"), dense={"h.0.attn.c_attn.weight": delta})
    lm = extract_lora(expert, rank=2, fan_in_fan_out=True).lora["h.0.attn.c_attn"]
    assert lm.rank == 2 and lm.fan_in_fan_out and (lm.d_in, lm.d_out) == (6, 10)
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    torch.testing.assert_close(
        lm.delta_for_weight().double(), (U[:, :2] * S[:2]) @ Vh[:2], rtol=1e-5, atol=1e-5
    )
    with pytest.raises(MalformedConfigError, match="not both"):
        extract_lora(expert, rank=2, energy=0.5)


@pytest.fixture(scope="module")
def finetuned_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a changed attention projection and norm (a "full fine-tune")."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or name.endswith("layers.0.input_layernorm.weight"):
                p += 0.05 * torch.randn(p.shape, generator=g)
    out = tmp_path_factory.mktemp("finetuned")
    model.save_pretrained(out)
    return out


def test_cli_add_full_finetune_then_extract(tiny_llama_dir, finetuned_dir, tmp_path, capsys):
    from moerge.merging.folders import CheckpointReader

    lib_dir = tmp_path / "lib"
    assert run_app(app, ["library", "init", str(lib_dir)]) == 0
    code = run_app(app, ["library", "add", str(lib_dir), str(finetuned_dir), "--base", str(tiny_llama_dir),
                         "--name", "ft", "--task", "t"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    lib = ExpertLibrary.open(lib_dir)
    expert = lib.get("ft")
    with CheckpointReader(finetuned_dir) as ft, CheckpointReader(tiny_llama_dir) as base:
        expected = {k: ft.get(k).float() - base.get(k).float() for k in ft.names()}
    expected = {k: v for k, v in expected.items() if v.any()}
    assert expert.kind == "dense" and set(expert.dense) == set(expected)
    assert any("input_layernorm" in k for k in expected)
    for k, v in expected.items():
        torch.testing.assert_close(expert.dense[k], v)

    code = run_app(app, ["library", "extract", str(lib_dir), "ft", "--rank", "3", "--as", "ft-r3"])
    assert code == 0, capsys.readouterr().err
    lora = ExpertLibrary.open(lib_dir).get("ft-r3")
    assert lora.kind == "lora" and all(m.rank == 3 for m in lora.lora.values())
    assert set(lora.lora) == {k.removesuffix(".weight") for k in expected if "q_proj" in k}

    code = run_app(app, ["library", "extract", str(lib_dir), "ft", "--rank", "3", "--energy", "0.9"])
    assert code == 2 and "not both" in capsys.readouterr().err


def test_cli_refuses_a_model_folder_without_base(finetuned_dir, tmp_path, capsys):
    lib_dir = tmp_path / "lib"
    run_app(app, ["library", "init", str(lib_dir)])
    capsys.readouterr()
    code = run_app(app, ["library", "add", str(lib_dir), str(finetuned_dir)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error:") and "--base" in err and "Traceback" not in err
