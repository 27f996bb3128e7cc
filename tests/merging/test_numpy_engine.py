"""The numpy engine (`moerge.merging.numpy_engine`): linear and task-arithmetic merges without torch, checked
against the sums written out in float64 here and against the torch engine on the same configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import moerge
from moerge.errors import MalformedConfigError, NonFiniteWeightsError
from moerge.merging.numpy_engine import to_stored

REPO = Path(__file__).resolve().parents[2]
W = [0.3, 0.5, 0.2]


def state(folder: Path) -> dict[str, torch.Tensor]:
    from moerge.merging.folders import CheckpointReader

    with CheckpointReader(folder) as r:
        return {k: r.get(k) for k in r.names()}


def cfg(model_dirs, method: str, **extra) -> dict:
    c = {
        "merge_method": method,
        "models": [
            {"model": str(model_dirs[f"ft{i}"]), "parameters": {"weight": w}} for i, w in enumerate(W)
        ],
        **extra,
    }
    if method == "task_arithmetic":
        c["base_model"] = str(model_dirs["base"])
    return c


def both_engines(c: dict, tmp_path: Path) -> tuple[dict, dict]:
    a = moerge.merge({**c, "engine": "numpy"}, tmp_path / "np")
    b = moerge.merge({**c, "engine": "torch"}, tmp_path / "torch")
    return state(a), state(b)


def assert_close_to_torch_engine(ours: dict, theirs: dict) -> None:
    """Equal names, dtypes and shapes; values within float32 round-off of each other (the engines sum the models
    in the same order except at a few columns of torch's vectorised sum)."""
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        torch.testing.assert_close(ours[k].float(), theirs[k].float(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_equals_the_weighted_average_written_out(model_dirs, tmp_path, normalize):
    c = cfg(model_dirs, "linear", parameters={"normalize": normalize})
    ours, theirs = both_engines(c, tmp_path)
    fts = [state(model_dirs[f"ft{i}"]) for i in range(3)]
    for k, v in ours.items():
        ref = sum(w * ft[k].double() for w, ft in zip(W, fts))
        if normalize:
            ref = ref / sum(W)
        torch.testing.assert_close(v.double(), ref, rtol=1e-6, atol=1e-7)
    assert_close_to_torch_engine(ours, theirs)


def test_task_arithmetic_with_lambda_normalize_and_gradients(model_dirs, tmp_path):
    """θ₀ + λ Σ wᵢτᵢ / Σ wᵢ, with a per-model weight that is a gradient over the layers and a filtered value."""
    c = cfg(model_dirs, "task_arithmetic", parameters={"lambda": 0.7, "normalize": True})
    c["models"][0]["parameters"]["weight"] = [0.1, 0.9]  # layer 0 → 0.1, layer 1 → 0.9, elsewhere 0.1
    c["models"][1]["parameters"]["weight"] = [{"filter": "mlp", "value": 2.0}, {"value": 0.5}]
    ours, theirs = both_engines(c, tmp_path)
    base, fts = state(model_dirs["base"]), [state(model_dirs[f"ft{i}"]) for i in range(3)]
    for k, v in ours.items():
        w0 = 0.9 if ".layers.1." in k else 0.1
        w = [w0, 2.0 if "mlp" in k else 0.5, W[2]]
        tau = sum(wi * (ft[k].double() - base[k].double()) for wi, ft in zip(w, fts)) / sum(w)
        torch.testing.assert_close(v.double(), base[k].double() + 0.7 * tau, rtol=1e-6, atol=1e-6)
    assert_close_to_torch_engine(ours, theirs)


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16"])
def test_stored_dtypes_round_as_torch_does(model_dirs, tmp_path, out_dtype):
    c = cfg(model_dirs, "linear", out_dtype=out_dtype)
    ours, theirs = both_engines(c, tmp_path)
    assert {v.dtype for v in ours.values()} == {getattr(torch, out_dtype)}
    assert json.loads((tmp_path / "np" / "config.json").read_text())["torch_dtype"] == out_dtype
    assert_close_to_torch_engine(ours, theirs)
    # the cast itself, on values that round up, down, to even, overflow and underflow: equal to torch's
    x = torch.cat(
        [torch.randn(10_000) * 10.0 ** torch.randint(-40, 39, (10_000,)), torch.tensor([3e38, -0.0])]
    )
    x = x.float()
    st = {"bfloat16": "BF16", "float16": "F16"}[out_dtype]
    got = to_stored(x.numpy(), st)
    want = x.to(getattr(torch, out_dtype))
    assert np.array_equal(got.view(np.uint16), want.view(torch.int16).numpy().view(np.uint16))


def test_low_precision_inputs_are_widened_exactly(model_dirs, tmp_path):
    """Fine-tunes stored in bfloat16 and float16 (mixed): read into float32 exactly, stored as the base's dtype."""
    dirs = {}
    for i, dt in enumerate([torch.bfloat16, torch.float16, torch.bfloat16]):
        d = tmp_path / f"ft{i}"
        d.mkdir()
        for f in model_dirs[f"ft{i}"].iterdir():
            if f.name != "model.safetensors":
                (d / f.name).write_bytes(f.read_bytes())
        sd = load_file(str(model_dirs[f"ft{i}"] / "model.safetensors"))
        save_file({k: v.to(dt) for k, v in sd.items()}, str(d / "model.safetensors"))
        dirs[f"ft{i}"] = d
    dirs["base"] = model_dirs["base"]
    c = cfg(dirs, "task_arithmetic", parameters={"lambda": 0.5})
    ours, theirs = both_engines(c, tmp_path / "out")
    base, fts = state(model_dirs["base"]), [state(dirs[f"ft{i}"]) for i in range(3)]
    for k, v in ours.items():
        assert v.dtype == torch.float32  # the base's
        tau = sum(w * (ft[k].double() - base[k].double()) for w, ft in zip(W, fts))
        torch.testing.assert_close(v.double(), base[k].double() + 0.5 * tau, rtol=1e-6, atol=1e-6)
    assert_close_to_torch_engine(ours, theirs)


def test_sharded_output_matches_the_torch_engine_layout(model_dirs, tmp_path):
    c = cfg(model_dirs, "linear", shard_size="20KB")
    ours, theirs = both_engines(c, tmp_path)
    index = json.loads((tmp_path / "np" / "model.safetensors.index.json").read_text())
    assert index == json.loads((tmp_path / "torch" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_close_to_torch_engine(ours, theirs)
    card = (tmp_path / "np" / "README.md").read_text()
    assert "merge_method: linear" in card and str(model_dirs["ft0"]) in card


def test_a_linear_merge_never_imports_torch(model_dirs, tmp_path):
    """The point of the engine: the merge, from the CLI, runs without loading torch (1.5 s of a small merge)."""
    (tmp_path / "linear.yaml").write_text(json.dumps(cfg(model_dirs, "linear")))
    code = (
        "import sys; from moerge.cli import main; sys.argv = ['moerge', 'merge', sys.argv[1], sys.argv[2], "
        "'--no-progress']\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "linear.yaml"), str(out)], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-2000:]
    fts = [state(model_dirs[f"ft{i}"]) for i in range(3)]
    for k, v in state(out).items():
        ref = sum(w * ft[k].double() for w, ft in zip(W, fts)) / sum(W)
        torch.testing.assert_close(v.double(), ref, rtol=1e-6, atol=1e-7)


def test_numpy_engine_refuses_what_it_cannot_run(model_dirs, tmp_path):
    for c, why in [
        (cfg(model_dirs, "ties", base_model=str(model_dirs["base"])), "merge method 'ties'"),
        (cfg(model_dirs, "linear", dtype="bfloat16"), "computing in bfloat16"),
        (cfg(model_dirs, "task_arithmetic", tokenizer_source="base"), "an output tokenizer"),
    ]:
        with pytest.raises(MalformedConfigError, match=f"engine: numpy cannot run this merge \\({why}"):
            moerge.merge({**c, "engine": "numpy"}, tmp_path / "never")
        assert not (tmp_path / "never").exists()


def test_cli_engine_numpy_on_ties_is_one_error_line(model_dirs, tmp_path):
    (tmp_path / "ties.yaml").write_text(
        json.dumps(cfg(model_dirs, "ties", base_model=str(model_dirs["base"])))
    )
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "moerge",
            "merge",
            str(tmp_path / "ties.yaml"),
            str(tmp_path / "o"),
            "--engine",
            "numpy",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: engine: numpy cannot run this merge"), p.stderr


def test_nan_input_is_named_and_nothing_is_written(model_dirs, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dirs["ft1"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(bad / "model.safetensors"))
    key = sorted(sd)[3]
    sd[key][0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"))
    c = cfg(model_dirs, "linear")
    c["models"][1]["model"] = str(bad)
    with pytest.raises(NonFiniteWeightsError, match=rf"{bad}: tensor {key} holds NaN"):
        moerge.merge({**c, "engine": "numpy"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]  # no temporary sibling left behind
