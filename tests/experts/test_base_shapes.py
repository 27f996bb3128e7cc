"""A library records its base model's tensor shapes (at init, from the base's safetensors headers) and refuses
adapters whose modules do not exist there or do not fit; PEFT folders carry no fingerprint, so this is what
stops an adapter for another base."""

from __future__ import annotations

import json

import pytest
import torch
from library_helpers import make_expert

from moerge.errors import ShapeMismatchError
from moerge.experts.library import ExpertLibrary, base_shapes_of


def test_adapter_for_another_base_is_refused_by_recorded_shapes(tmp_path, tiny_llama_dir, peft_adapters):

    lib = ExpertLibrary.create(
        tmp_path / "lib", base_model=str(tiny_llama_dir), base_shapes=base_shapes_of(tiny_llama_dir)
    )
    lib.add_peft(peft_adapters["llama-patterns"][1], name="llama")  # made for this base: fits
    with pytest.raises(ShapeMismatchError, match="does not exist in this library's base model"):
        lib.add_peft(peft_adapters["gpt2-conv1d"][1], name="gpt2")
    wrong = make_expert(
        "wrong-size", module="model.layers.0.self_attn.q_proj", d_in=8, d_out=8, fingerprint=None
    )
    with pytest.raises(ShapeMismatchError, match="the base weight has shape"):
        lib.add(wrong)
    assert lib.names() == ["llama"] and lib.verify().ok


def test_cli_init_records_the_base_shapes(tmp_path, tiny_llama_dir, peft_adapters, capsys):
    from moerge.cli import app
    from moerge.cli.common import run_app

    lib = str(tmp_path / "lib")
    assert run_app(app, ["library", "init", lib, "--base-model", str(tiny_llama_dir)]) == 0
    assert "checked against" in capsys.readouterr().out
    assert run_app(app, ["library", "add", lib, str(peft_adapters["gpt2-conv1d"][1])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist in this library's base model" in err
    assert json.loads((tmp_path / "lib" / "moerge-library.json").read_text())["base_shapes"]


def test_base_shapes_are_the_safetensors_headers(tiny_llama_dir):
    from safetensors.torch import load_file

    shapes = base_shapes_of(tiny_llama_dir)
    assert shapes == {
        k: list(v.shape) for k, v in load_file(str(tiny_llama_dir / "model.safetensors")).items()
    }
    assert torch.Size(shapes["model.layers.0.self_attn.q_proj.weight"]) == torch.Size([64, 64])
