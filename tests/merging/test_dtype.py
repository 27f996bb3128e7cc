"""`dtype` is the dtype a merge computes in and `out_dtype` the one it stores, as in mergekit (whose
`LoadTensor` casts every input to `dtype` before the method runs and whose `SaveTensor` casts to `out_dtype`;
`tests/compat/test_mergekit_compat.py` compares with mergekit itself).

The inputs are chosen so that computing in bfloat16 and rounding a float32 result differ: every entry of ft0 is
1.0045 and of ft1 1.0035. Rounded to bfloat16 first they are 1.0078125 and 1.0, whose mean 1.00390625 lies
halfway between two bfloat16 values and rounds (to even) to 1.0; their float32 mean 1.004 rounds to 1.0078125.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moerge

ROUNDED_FIRST = 1.0  # bfloat16(mean(bfloat16(ft0), bfloat16(ft1)))
ROUNDED_LAST = 1.0078125  # bfloat16(mean(ft0, ft1)) computed in float32


@pytest.fixture(scope="module")
def constant_fine_tunes(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype")
    sd = load_file(str(tiny_llama_dir / "model.safetensors"))
    out = []
    for i, value in enumerate((1.0045, 1.0035)):
        d = root / f"ft{i}"
        shutil.copytree(tiny_llama_dir, d)
        save_file({k: torch.full_like(v, value) for k, v in sd.items()}, str(d / "model.safetensors"))
        out.append(str(d))
    return out


def merged(folder):
    tensors = load_file(str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    return tensors, cfg.get("torch_dtype", cfg.get("dtype"))


@pytest.mark.parametrize(
    ("fields", "stored", "value"),
    [
        ({"dtype": "bfloat16"}, torch.bfloat16, ROUNDED_FIRST),  # computed in bf16, stored in bf16
        ({"dtype": "float32", "out_dtype": "bfloat16"}, torch.bfloat16, ROUNDED_LAST),
        ({"out_dtype": "bfloat16"}, torch.bfloat16, ROUNDED_LAST),  # float32 inputs: computed in float32
        ({"dtype": "bfloat16", "out_dtype": "float32"}, torch.float32, ROUNDED_FIRST),
        ({}, torch.float32, None),  # the inputs' dtype, float32 arithmetic
    ],
)
def test_dtype_computes_and_out_dtype_stores(constant_fine_tunes, tmp_path, fields, stored, value):
    out = tmp_path / "out"
    moerge.merge(merge_method="linear", models=constant_fine_tunes, out=out, **fields)
    tensors, cfg_dtype = merged(out)
    want = value if value is not None else (torch.tensor(1.0045) + torch.tensor(1.0035)).item() / 2
    for name, t in tensors.items():
        assert t.dtype == stored, name
        torch.testing.assert_close(t.float(), torch.full_like(t.float(), want), rtol=0, atol=2.5e-7)
    assert cfg_dtype == (fields.get("out_dtype") or fields.get("dtype") or "float32")


def test_out_dtype_is_read_from_yaml(constant_fine_tunes, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: linear\nmodels: {json.dumps(constant_fine_tunes)}\nout_dtype: float16\n")
    moerge.merge(str(cfg), tmp_path / "out")
    tensors, cfg_dtype = merged(tmp_path / "out")
    assert {t.dtype for t in tensors.values()} == {torch.float16} and cfg_dtype == "float16"
