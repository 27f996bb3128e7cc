"""mergekit YAMLs that moerge used to read differently or refuse: per-model filters falling through to the
global value, per-model parameters a method does not use, multislerp's ``normalize_weights``, per-model
``epsilon``/``gamma``, and PEFT's TIES variant. Each against a dense reference written out here (or PEFT)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import moerge
from moerge.errors import ConfigWarning
from moerge.merging.registry import get_method, merge_tensor, validate_params


def sd(folder):
    return load_file(str(folder / "model.safetensors"))


def test_a_per_model_filter_without_catch_all_falls_through_to_the_global_value(model_dirs, tmp_path):
    """mergekit resolves a parameter from the model's settings, then the global ones, then the default
    (``ConfigReader.parameter_sources``): ft0's weight is 3 on mlp tensors and the global 0.5 elsewhere."""
    cfg = {
        "merge_method": "linear",
        "parameters": {"weight": 0.5},
        "models": [
            {"model": str(model_dirs["ft0"]), "parameters": {"weight": [{"filter": "mlp", "value": 3.0}]}},
            {"model": str(model_dirs["ft1"]), "parameters": {"weight": 1.0}},
        ],
    }
    moerge.merge(cfg, tmp_path / "out")
    got, a, b = sd(tmp_path / "out"), sd(model_dirs["ft0"]), sd(model_dirs["ft1"])
    for k, t in got.items():
        w0 = 3.0 if "mlp" in k else 0.5
        torch.testing.assert_close(t, (w0 * a[k] + 1.0 * b[k]) / (w0 + 1.0), rtol=0, atol=1e-6)


def test_a_global_filter_without_match_gives_the_default():
    spec = get_method("ties")
    g, pm = validate_params(spec, {"density": [{"filter": "mlp", "value": 0.3}]}, [{}, {}])
    from moerge.merging.registry import resolve_params

    _, on_attn = resolve_params(spec, g, pm, "model.layers.0.self_attn.q_proj.weight", 2)
    _, on_mlp = resolve_params(spec, g, pm, "model.layers.0.mlp.up_proj.weight", 2)
    assert [p["density"] for p in on_attn] == [1.0, 1.0] and [p["density"] for p in on_mlp] == [0.3, 0.3]


def test_per_model_parameters_a_method_does_not_use_are_ignored_with_one_warning(model_dirs, tmp_path):
    fts = [str(model_dirs[f"ft{i}"]) for i in range(2)]
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": fts[0], "parameters": {"weight": 0.25, "density": 0.5, "normalize": False}},
            {"model": fts[1], "parameters": {"weight": 0.75, "density": 0.5}},
        ],
    }
    with pytest.warns(ConfigWarning) as caught:
        moerge.merge(cfg, tmp_path / "out")
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert (
        "density (models 0, 1: not a parameter of it)" in msg
        and "normalize (models 0: set globally only)" in msg
    )
    got, a, b = sd(tmp_path / "out"), sd(model_dirs["ft0"]), sd(model_dirs["ft1"])
    for k, t in got.items():
        torch.testing.assert_close(t, 0.25 * a[k] + 0.75 * b[k], rtol=0, atol=1e-6)


def test_the_cli_prints_the_ignored_parameters_as_one_warning_line(model_dirs, tmp_path, capsys):
    from moerge.cli import app
    from moerge.cli.common import run_app

    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        f"merge_method: linear\nmodels:\n  - model: {model_dirs['ft0']}\n    parameters: {{weight: 1, gamma: 0.1}}\n"
        f"  - model: {model_dirs['ft1']}\n"
    )
    assert run_app(app, ["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "gamma" in lines[0], lines


def multislerp_reference(x, w, normalize):
    """mergekit's multislerp written out (``merge_methods/multislerp.py``) for base-free inputs."""
    w = w / w.sum() if normalize else w
    flat = x.reshape(x.shape[0], -1).double()
    norms = flat.norm(dim=1)
    mean = sum(wi * f / (n + 1e-8) for wi, f, n in zip(w.double(), flat, norms))
    return (mean / mean.norm() * (norms * w.double()).sum()).reshape(x.shape[1:]).float()


@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_reads_mergekits_normalize_weights(normalize, model_dirs, tmp_path):
    fts = [model_dirs[f"ft{i}"] for i in range(2)]
    cfg = {
        "merge_method": "multislerp",
        "parameters": {"normalize_weights": normalize},
        "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, (0.6, 0.9))],
    }
    moerge.merge(cfg, tmp_path / "out")
    got, a, b = sd(tmp_path / "out"), sd(fts[0]), sd(fts[1])
    for k, t in got.items():
        ref = multislerp_reference(torch.stack([a[k], b[k]]), torch.tensor([0.6, 0.9]), normalize)
        torch.testing.assert_close(t, ref, rtol=1e-5, atol=1e-6)


def ref_breadcrumbs(v: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    flat = v.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: -abs(flat[i]))
    n_top, n_keep = int(gamma * len(flat)), int(density * len(flat))
    out = [0.0] * len(flat)
    for i in order[n_top : n_top + n_keep]:
        out[i] = flat[i]
    return torch.tensor(out).reshape(v.shape)


def test_breadcrumbs_takes_gamma_per_model():
    x = torch.randn(2, 12, 10, generator=torch.Generator().manual_seed(0))
    per = [{"weight": 1.0, "density": 0.5, "gamma": 0.1}, {"weight": 2.0, "density": 0.3, "gamma": 0.2}]
    spec = get_method("breadcrumbs")
    g, pm = validate_params(spec, {}, per)
    got = merge_tensor(spec, x.clone(), base=torch.zeros(12, 10), global_params=g, per_model=pm)
    want = ref_breadcrumbs(x[0], 0.5, 0.1) + 2.0 * ref_breadcrumbs(x[1], 0.3, 0.2)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("eps", [(0.3, 0.05), (0.05, 0.3)])
def test_della_takes_epsilon_per_model(eps):
    """Model 0's entries in the lowest quarter of magnitudes are kept with probability ≈ density − ε₀ + ε₀/4
    (the mean of MagPrune's linear ramp there); model 1 is zero so the merged tensor is model 0's kept part."""
    rows, n, density = 40, 2000, 0.5
    x = torch.zeros(2, rows, n)
    x[0] = torch.randn(rows, n, generator=torch.Generator().manual_seed(1))
    spec = get_method("della")
    per = [{"weight": 1.0, "density": density, "epsilon": e} for e in eps]
    g, pm = validate_params(spec, {"sign": None, "normalize": False, "rescale": "none"}, per)
    got = merge_tensor(spec, x.clone(), base=torch.zeros(rows, n), global_params=g, per_model=pm, seed=3)
    low = x[0].abs() <= x[0].abs().quantile(0.25, dim=1, keepdim=True)
    kept = float((got[low] != 0).float().mean())
    expected = density - eps[0] + 2 * eps[0] * 0.125  # mean normalised rank of the lowest quarter is 1/8
    sigma = (expected * (1 - expected) / int(low.sum())) ** 0.5
    assert abs(kept - expected) < 5 * sigma + 2e-3, (kept, expected)


@pytest.mark.parametrize("sign", ["mass", "count"])
def test_ties_peft_variant_equals_peft_merge_utils(sign):
    from peft.utils.merge_utils import ties as peft_ties

    x = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(5))
    w = [0.7, -0.4, 1.5]
    spec = get_method("ties")
    g, pm = validate_params(
        spec, {"variant": "peft", "sign": sign}, [{"weight": wi, "density": 0.4} for wi in w]
    )
    got = merge_tensor(spec, x.clone(), base=torch.zeros(16, 8), global_params=g, per_model=pm)
    method = "total" if sign == "mass" else "frequency"
    want = peft_ties(list(x), torch.tensor(w), density=0.4, majority_sign_method=method)
    torch.testing.assert_close(got, want)
    default = merge_tensor(
        spec, x.clone(), base=torch.zeros(16, 8), global_params={**g, "variant": "mergekit"}, per_model=pm
    )
    assert (default - want).abs().max() > 1e-3  # the two definitions differ for these weights


def ref_ties_whole_model(base, fts, weights, density):
    """TIES as the paper: one magnitude threshold per model over all its task-vector entries, then the weighted
    disjoint mean (mergekit's weighting). Written with plain sorts over the concatenated task vector."""
    keys = sorted(base)
    taus = [{k: ft[k] - base[k] for k in keys} for ft in fts]
    kept = []
    for tau in taus:
        flat = torch.cat([tau[k].flatten() for k in keys]).abs()
        k = int(density * flat.numel())
        thr = flat.sort(descending=True).values[k - 1]
        kept.append({n: torch.where(tau[n].abs() >= thr, tau[n], 0.0) for n in keys})
    out = {}
    for n in keys:
        w = torch.tensor(weights).reshape(-1, *[1] * base[n].ndim)
        stacked = torch.stack([kp[n] for kp in kept]) * w
        elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agree = (stacked.sign() == elected) & (stacked != 0)
        num = (stacked * agree).sum(0)
        den = (w * agree).sum(0)
        out[n] = base[n] + num / torch.where(den == 0, 1.0, den)
    return out


def test_ties_trims_over_the_whole_model_with_trim_model(model_dirs, tmp_path):
    fts = [model_dirs[f"ft{i}"] for i in range(3)]
    w = [0.5, 1.0, 0.8]
    cfg = {
        "merge_method": "ties",
        "base_model": str(model_dirs["base"]),
        "parameters": {"trim": "model", "density": 0.3},
        "models": [{"model": str(f), "parameters": {"weight": wi}} for f, wi in zip(fts, w)],
    }
    moerge.merge(cfg, tmp_path / "out")
    got = sd(tmp_path / "out")
    base = sd(model_dirs["base"])
    want = ref_ties_whole_model(base, [sd(f) for f in fts], w, 0.3)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    per_tensor = moerge.merge({**cfg, "parameters": {"density": 0.3}}, tmp_path / "per-tensor")
    assert any((sd(per_tensor)[k] - got[k]).abs().max() > 1e-4 for k in got)  # the two trims differ here


def test_model_thresholds_equal_the_kth_largest_magnitude_by_sort(model_dirs):
    """The two-pass threshold equals the k-th largest |τ| found by sorting, for several densities."""
    from moerge.merging.checkpoint import model_thresholds
    from moerge.merging.folders import CheckpointReader

    readers = [CheckpointReader(model_dirs[f"ft{i}"]) for i in range(2)]
    base = CheckpointReader(model_dirs["base"])
    keys = base.names()
    dens = [0.05, 0.77]
    thr = model_thresholds(readers, base, keys, dens)
    for i, r in enumerate(readers):
        flat = torch.cat([(r.get(k).float() - base.get(k).float()).abs().flatten() for k in keys])
        k = int(dens[i] * flat.numel())
        assert thr[i] == flat.sort(descending=True).values[k - 1]


def test_passthrough_slices_stack_layers_and_the_model_loads(model_dirs, tmp_path):
    """A frankenmerge: layers [0, 2) of ft0 then layer 1 of ft1; embeddings from ft0, norm and head from ft1."""
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(model_dirs["ft0"]), "layer_range": [0, 2]}]},
            {
                "sources": [
                    {"model": str(model_dirs["ft1"]), "layer_range": [1, 2], "parameters": {"scale": 2.0}}
                ]
            },
        ],
    }
    moerge.merge(cfg, tmp_path / "out")
    got, a, b = sd(tmp_path / "out"), sd(model_dirs["ft0"]), sd(model_dirs["ft1"])
    want = {k: v for k, v in a.items() if "layers." not in k and "embed" in k}
    want |= {k: 2.0 * v for k, v in b.items() if "layers." not in k and "embed" not in k}
    want |= {k: v for k, v in a.items() if "layers." in k}
    want |= {k.replace("layers.1.", "layers.2."): 2.0 * v for k, v in b.items() if "layers.1." in k}
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    import json

    from transformers import AutoModelForCausalLM

    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 3
    model(torch.tensor([[1, 2, 3]]))


def test_slices_and_models_together_are_refused(model_dirs, tmp_path):
    from moerge.errors import MalformedConfigError

    with pytest.raises(MalformedConfigError, match="either models or slices"):
        moerge.merge(
            {
                "merge_method": "passthrough",
                "models": [str(model_dirs["ft0"])],
                "slices": [{"sources": [{"model": str(model_dirs["ft0"]), "layer_range": [0, 1]}]}],
            },
            tmp_path / "out",
        )


def test_model_plus_lora_merges_the_adapter_into_the_weights_first(model_dirs, lora_experts, tmp_path):
    """mergekit's ``model+lora``: the model's weights with W + (alpha/r)·B·A on every adapted module."""
    from moerge.experts.peft_io import write_peft_folder

    adapter = write_peft_folder(lora_experts[1], tmp_path / "adapter")
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": f"{model_dirs['ft0']}+{adapter}", "parameters": {"weight": 0.25}},
            {"model": str(model_dirs["ft1"]), "parameters": {"weight": 0.75}},
        ],
    }
    moerge.merge(cfg, tmp_path / "out")
    got, a, b = sd(tmp_path / "out"), sd(model_dirs["ft0"]), sd(model_dirs["ft1"])
    lora = lora_experts[1].lora
    for k in got:
        module = k.removesuffix(".weight")
        wa = a[k] + (lora[module].alpha / 4) * lora[module].B @ lora[module].A if module in lora else a[k]
        torch.testing.assert_close(got[k], 0.25 * wa + 0.75 * b[k], rtol=1e-6, atol=1e-6)
    assert any(k.removesuffix(".weight") in lora for k in got)


def test_multi_stage_yaml_uses_named_stages_and_caches_them(model_dirs, tmp_path):
    """Two documents (mergekit-multi): a named soup, then task arithmetic over it and ft2. A second run finds
    both cached; editing only the final stage re-runs only it."""
    from moerge.merging.multi import merge_multi

    f = {k: str(v) for k, v in model_dirs.items()}
    stage = f"name: soup\nmerge_method: linear\nmodels: [{f['ft0']}, {f['ft1']}]\n"
    final = f"merge_method: task_arithmetic\nbase_model: {f['base']}\nmodels: [soup, {f['ft2']}]\nparameters: {{lambda: LAM}}\n"
    cfg = tmp_path / "multi.yaml"
    cfg.write_text(stage + "---\n" + final.replace("LAM", "0.5"))
    moerge.merge(str(cfg), tmp_path / "out")
    got, base = sd(tmp_path / "out"), sd(model_dirs["base"])
    a, b, c = (sd(model_dirs[k]) for k in ("ft0", "ft1", "ft2"))
    for k in got:
        soup = (a[k] + b[k]) / 2
        torch.testing.assert_close(
            got[k], base[k] + 0.5 * ((soup - base[k]) + (c[k] - base[k])), rtol=0, atol=1e-6
        )
    assert (tmp_path / "out.stages" / "soup" / "model.safetensors").is_file()
    seen = []
    merge_multi(cfg, tmp_path / "out", on_stage=lambda n, what: seen.append((n, what)))
    assert seen == [("soup", "cached"), ("final", "cached")]
    cfg.write_text(stage + "---\n" + final.replace("LAM", "0.25"))
    seen.clear()
    merge_multi(cfg, tmp_path / "out", on_stage=lambda n, what: seen.append((n, what)))
    assert seen == [("soup", "cached"), ("final", "merged")]
    got = sd(tmp_path / "out")
    k = next(iter(got))
    soup = (a[k] + b[k]) / 2
    torch.testing.assert_close(
        got[k], base[k] + 0.25 * ((soup - base[k]) + (c[k] - base[k])), rtol=0, atol=1e-6
    )


def test_the_model_card_lists_the_inputs_and_its_yaml_reproduces_the_merge(model_dirs, tmp_path):
    import yaml

    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(model_dirs["ft0"]), "layer_range": [0, 1]}]},
            {"sources": [{"model": str(model_dirs["ft2"]), "layer_range": [1, 2]}]},
        ],
    }
    moerge.merge(cfg, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert (
        front["base_model"] == [str(model_dirs["ft0"]), str(model_dirs["ft2"])] and "merge" in front["tags"]
    )
    recipe = card.split("```yaml\n")[1].split("```")[0]
    (tmp_path / "again.yaml").write_text(recipe)
    moerge.merge(str(tmp_path / "again.yaml"), tmp_path / "again")
    a, b = sd(tmp_path / "out"), sd(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
