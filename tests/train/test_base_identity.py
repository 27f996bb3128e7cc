"""Base-model identity: the base id `moerge train` stores resolves from any folder, through PEFT itself
(`AutoPeftModelForCausalLM` on the exported adapter) and through moerge's one loader (folders, hub ids)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from moerge.cli import app
from moerge.cli.common import run_app

ROWS = [{"prompt": f"{w}=", "completion": w[::-1]} for w in ("abcd", "bcde", "cdef", "defa")]
HUB_ID = "moerge-test/tiny-llama"


def dense_with_expert(model, expert):
    """Independent reference: a copy of the base with W += alpha/r · B @ A written into every adapted module."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, lm in expert.lora.items():
            w = merged.get_submodule(name).weight
            delta = lm.alpha / lm.rank * (lm.B @ lm.A)
            w += delta.T if lm.fan_in_fan_out else delta
    return merged.eval()


def peft_logits_from(exported, cwd, monkeypatch, ids):
    """PEFT's own loader, from another working folder: the adapter names its base, PEFT finds it."""
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(cwd)
    model = AutoPeftModelForCausalLM.from_pretrained(str(exported)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_cli_train_with_a_relative_base_exports_an_adapter_peft_loads_anywhere(
    tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    from transformers import AutoModelForCausalLM

    from moerge.experts.library import ExpertLibrary

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    shutil.copytree(tiny_llama_dir, work / "base")
    (work / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.chdir(work)
    args = ["train", "--base", "base", "--data", "d.jsonl", "--library", "lib", "--name", "rev",
            "--steps", "4", "--lr", "0.05", "--rank", "2"]  # fmt: skip
    assert run_app(app, args) == 0, capsys.readouterr().err

    lib = ExpertLibrary.open(work / "lib")
    expert = lib.get("rev")
    assert expert.metadata.base_model == str((work / "base").resolve())
    exported = lib.export_peft("rev", work / "exported")
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((work / "base").resolve())

    ids = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    got = peft_logits_from(exported, elsewhere, monkeypatch, ids)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    with torch.no_grad():
        expected = dense_with_expert(base, expert)(input_ids=ids).logits
        assert not torch.allclose(expected, base(input_ids=ids).logits, atol=1e-4), (
            "the expert must change logits"
        )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture
def hub_cache(tiny_llama_dir, tmp_path, monkeypatch):
    """A local hub cache (huggingface_hub's layout) holding the tiny Llama as ``moerge-test/tiny-llama``; with
    HF_HUB_OFFLINE=1 (tests/conftest.py) transformers and PEFT resolve the id from it, never the network."""
    import huggingface_hub.constants as hf_constants

    assert hf_constants.HF_HUB_OFFLINE
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_id_loads_like_its_folder_and_is_stored_as_given(
    hub_cache, tiny_llama_dir, tmp_path, monkeypatch
):
    from moerge.backbones.loading import load_base_model
    from moerge.experts.fingerprint import fingerprint_model
    from moerge.experts.peft_io import write_peft_folder
    from moerge.train.lora import TrainConfig, train_expert

    model, _ = load_base_model(HUB_ID)
    folder_model, _ = load_base_model(tiny_llama_dir)
    assert model.moerge_base_model == HUB_ID
    assert model.moerge_base_fingerprint == fingerprint_model(folder_model)

    expert = train_expert(HUB_ID, None, ROWS, TrainConfig(steps=3, lr=0.05, rank=2, progress=False), name="h")
    assert expert.metadata.base_model == HUB_ID
    exported = write_peft_folder(expert, tmp_path / "exported")
    ids = torch.randint(4, 90, (1, 7), generator=torch.Generator().manual_seed(1))
    got = peft_logits_from(exported, tmp_path, monkeypatch, ids)
    with torch.no_grad():
        expected = dense_with_expert(folder_model, expert)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_missing_sources_are_one_line_naming_what_was_tried(tmp_path, monkeypatch, capsys):
    from moerge.backbones.loading import ModelLoadError, load_base_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_base_model("nobody/no-model")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "nobody" / "no-model") in message and "local hub cache" in message
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    for base in ("./missing", "missing.gguf", "nobody/no-model"):
        code = run_app(app, ["train", "--base", base, "--data", str(data), "--library", "lib", "--name", "x"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {base}: "), err
        assert "pass a local folder or .gguf file" in err[0] or "a .gguf file or a hub id" in err[0], err


@pytest.mark.parametrize(
    "modules, near",
    [("q_prj", "'q_proj'"), ("self_atn.v_proj", "'self_attn.v_proj'"), ("q_proj,up_prj", "'up_proj'")],
)
def test_cli_train_misspelled_target_module_is_one_line_with_near_matches(
    tiny_llama_dir, tmp_path, capsys, modules, near
):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    args = ["train", "--base", str(tiny_llama_dir), "--data", str(data), "--library", str(tmp_path / "lib"),
            "--name", "x", "--target-modules", modules]  # fmt: skip
    code = run_app(app, args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: target module") and f"did you mean {near}" in lines[0], err
    assert "module names available: down_proj, embed_tokens, gate_proj, k_proj, lm_head" in lines[0], err
    assert not (tmp_path / "lib").exists() or not any((tmp_path / "lib").rglob("*.safetensors"))
