"""Each bad input gets one clear error naming the file or thing and the fix; the library is left unchanged."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from library_helpers import make_expert
from safetensors.torch import load_file, save_file

from moerge.errors import (
    BaseModelMismatchError,
    ExpertExistsError,
    MalformedConfigError,
    NonFiniteWeightsError,
    ShapeMismatchError,
    UnsafeFormatError,
)
from moerge.experts.library import ExpertLibrary


@pytest.fixture
def lib(tmp_path):
    library = ExpertLibrary.create(tmp_path / "lib")
    library.add(make_expert("first"))
    return library


@pytest.fixture
def adapter(peft_adapters, tmp_path):
    """A fresh, editable copy of a PEFT-saved adapter folder."""
    dst = tmp_path / "adapter"
    shutil.copytree(peft_adapters["llama-rslora"][1], dst)
    return dst


def assert_unchanged(lib):
    assert lib.names() == ["first"]
    report = lib.verify()
    assert report.ok and not report.leftovers


@pytest.mark.parametrize("suffix", ["adapter_model.bin", "adapter_model.pt", "weights.pkl"])
def test_pickle_adapter_is_refused_never_unpickled(lib, adapter, suffix):
    weights = adapter / "adapter_model.safetensors"
    # a file that would run code if unpickled: refusing must not even open it
    (adapter / suffix).write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    weights.unlink()
    with pytest.raises(UnsafeFormatError) as err:
        lib.add_peft(adapter)
    assert suffix in str(err.value) and "save_file" in str(err.value) and "never unpickles" in str(err.value)
    assert_unchanged(lib)


def test_other_base_model_is_refused(lib):
    with pytest.raises(BaseModelMismatchError, match="trained on another base model") as err:
        lib.add(make_expert("other", fingerprint="sha256:another"), source="/x/other-adapter")
    assert "/x/other-adapter" in str(err.value)
    assert_unchanged(lib)


def test_shape_mismatch_with_library_is_refused(lib):
    with pytest.raises(ShapeMismatchError, match="layer.q maps 10→6") as err:
        lib.add(make_expert("wide", d_in=10), source="wide-adapter")
    assert "wide-adapter" in str(err.value)
    assert_unchanged(lib)


def test_factor_shapes_that_do_not_fit_are_refused(lib, adapter):
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    sd[key] = torch.randn(sd[key].shape[0], 3)
    save_file(sd, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ShapeMismatchError, match="do not fit") as err:
        lib.add_peft(adapter)
    assert str(adapter) in str(err.value)
    assert_unchanged(lib)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(lib, adapter, bad):
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    key = sorted(sd)[0]
    sd[key][0, 0] = bad
    save_file(sd, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(NonFiniteWeightsError, match="NaN or Inf") as err:
        lib.add_peft(adapter)
    assert str(adapter) in str(err.value)
    assert_unchanged(lib)


def test_taken_name_is_refused_unless_overwrite(lib):
    with pytest.raises(ExpertExistsError, match="already exists.*overwrite=True"):
        lib.add(make_expert("first", seed=3))
    assert_unchanged(lib)
    lib.add(make_expert("first", seed=3), overwrite=True)
    assert torch.equal(lib.get("first").lora["layer.q"].A, make_expert(seed=3).lora["layer.q"].A)


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda c: "{not json", MalformedConfigError, "not valid JSON"),
        (lambda c: json.dumps({**c, "peft_type": "IA3"}), MalformedConfigError, "LoRA adapters only"),
        (
            lambda c: json.dumps({**c, "r": 5}),
            ShapeMismatchError,
            "the config gives rank 5 but lora_A has rank 8",
        ),
        (lambda c: json.dumps({**c, "use_dora": True}), MalformedConfigError, "DoRA"),
        (
            lambda c: json.dumps({**c, "lora_alpha": "big"}),
            MalformedConfigError,
            "lora_alpha: Input should be a valid number",
        ),
        (lambda c: json.dumps([1, 2]), MalformedConfigError, "expected a JSON object"),
    ],
)
def test_malformed_config_is_refused(lib, adapter, edit, error, message):
    cfg_path = adapter / "adapter_config.json"
    cfg_path.write_text(edit(json.loads(cfg_path.read_text())))
    with pytest.raises(error, match=message) as err:
        lib.add_peft(adapter)
    assert "adapter_config.json" in str(err.value)
    assert_unchanged(lib)


def test_invalid_expert_name_is_refused(lib, adapter):
    with pytest.raises(MalformedConfigError, match="invalid expert metadata: name"):
        lib.add_peft(adapter, name="../escape")
    assert_unchanged(lib)


def test_cli_reports_one_line_and_exit_code(lib, adapter, tmp_path):
    import subprocess
    import sys

    (adapter / "adapter_model.bin").write_bytes(b"x")
    (adapter / "adapter_model.safetensors").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "moerge", "library", "add", str(lib.url), str(adapter)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "adapter_model.bin" in proc.stderr
