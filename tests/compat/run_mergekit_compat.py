"""Peer agreement: moerge vs mergekit on the same tiny models and the same YAML configs.

One command (from the repo root):

    .venv/bin/python tests/compat/run_mergekit_compat.py

It creates ``.venv-mergekit`` (``pip install -c constraints.txt torch==2.13.0 mergekit``, ~5 min, once) unless it
exists, builds a tiny Llama base and three perturbed fine-tunes (each saved with a tokenizer, absolute paths, as
mergekit needs), runs ``mergekit-yaml`` for linear, task_arithmetic, ties, dare_linear and slerp (plus
model_stock, multislerp and mergekit's per-tensor parameters: gradients over layers and name filters), runs
``moerge.merge`` on the same YAML, and compares every tensor. Deterministic methods must agree to
float32 round-off. DARE draws its masks from different RNG streams in the two tools, so it is compared
statistically: the kept fraction and the regression slope of the merged task vector on Σwᵢτᵢ, each within 5σ of
its expectation with σ derived from the Bernoulli variance. Exits 1 on any disagreement.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-mergekit"
MERGEKIT_YAML = VENV / "bin" / "mergekit-yaml"


def ensure_mergekit() -> None:
    if MERGEKIT_YAML.exists():
        return
    print(f"creating {VENV} with mergekit (takes ~5 min) …", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [
            str(VENV / "bin" / "pip"),
            "install",
            "-q",
            "-c",
            str(REPO / "constraints.txt"),
            "torch==2.13.0",
            "mergekit",
        ],
        check=True,
    )


def build_models(root: Path) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file

    from moerge.backbones.tiny import save_tiny_model

    base = save_tiny_model(
        root / "base", hidden_size=64, intermediate_size=128, num_layers=2, seed=0
    ).resolve()
    out = {"base": base}
    sd = load_file(str(base / "model.safetensors"))
    for i in range(3):
        d = root / f"ft{i}"
        shutil.copytree(base, d)
        g = torch.Generator().manual_seed(100 + i)
        save_file(
            {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.items()},
            str(d / "model.safetensors"),
            metadata={"format": "pt"},
        )
        out[f"ft{i}"] = d.resolve()
    return out


def state(folder: Path) -> dict[str, torch.Tensor]:
    from moerge.merging.checkpoint import CheckpointReader

    with CheckpointReader(folder) as r:
        return {k: r.get(k).float() for k in r.names()}


def stored(folder: Path) -> tuple[dict[str, str], str | None]:
    """Each tensor's stored safetensors dtype, and config.json's ``torch_dtype``."""
    from moerge.merging.checkpoint import CheckpointReader

    with CheckpointReader(folder) as r:
        dtypes = {k: r.dtype(k) for k in r.names()}
    cfg = json.loads((folder / "config.json").read_text())
    return dtypes, cfg.get("torch_dtype", cfg.get("dtype"))


def configs(m: dict[str, Path]) -> dict[str, dict]:
    fts = [str(m[f"ft{i}"]) for i in range(3)]
    w = [0.3, 0.5, 0.2]
    base = str(m["base"])
    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": f, "parameters": {"weight": wi}} for f, wi in zip(fts, w)],
            "dtype": "float32",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"lambda": 0.7},
            "models": [{"model": f, "parameters": {"weight": wi}} for f, wi in zip(fts, w)],
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "parameters": {"normalize": True},
            "models": [{"model": f, "parameters": {"weight": wi, "density": 0.4}} for f, wi in zip(fts, w)],
            "dtype": "float32",
        },
        "dare_linear": {
            "merge_method": "dare_linear",
            "base_model": base,
            "models": [{"model": f, "parameters": {"weight": wi, "density": 0.3}} for f, wi in zip(fts, w)],
            "dtype": "float32",
        },
        "dare_linear_density1": {
            "merge_method": "dare_linear",
            "base_model": base,
            "models": [{"model": f, "parameters": {"weight": wi, "density": 1.0}} for f, wi in zip(fts, w)],
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": fts[0]}],
            "parameters": {"t": 0.3},
            "dtype": "float32",
        },
        "slerp_gradient_filters": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": fts[1]}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float32",
        },
        "ties_weight_gradient": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": f, "parameters": {"weight": [wi, 1 - wi], "density": 0.5}} for f, wi in zip(fts, w)
            ],
            "dtype": "float32",
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": f} for f in fts],
            "dtype": "float32",
        },
        "multislerp": {
            "merge_method": "multislerp",
            "base_model": base,
            "models": [{"model": f, "parameters": {"weight": wi}} for f, wi in zip(fts, w)],
            "dtype": "float32",
        },
        # dtype is the compute dtype, out_dtype the stored one (default: dtype, else the inputs')
        "ties, dtype bfloat16": {
            "merge_method": "ties",
            "base_model": base,
            "parameters": {"normalize": True},
            "models": [{"model": f, "parameters": {"weight": wi, "density": 0.4}} for f, wi in zip(fts, w)],
            "dtype": "bfloat16",
        },
        "task_arithmetic, dtype bfloat16": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"lambda": 0.7},
            "models": [{"model": f, "parameters": {"weight": wi}} for f, wi in zip(fts, w)],
            "dtype": "bfloat16",
        },
        "task_arithmetic, out_dtype bfloat16": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"lambda": 0.7},
            "models": [{"model": f, "parameters": {"weight": wi}} for f, wi in zip(fts, w)],
            "dtype": "float32",
            "out_dtype": "bfloat16",
        },
        "linear, dtype bfloat16, out_dtype float32": {
            "merge_method": "linear",
            "models": [{"model": f, "parameters": {"weight": wi}} for f, wi in zip(fts, w)],
            "dtype": "bfloat16",
            "out_dtype": "float32",
        },
    }


def dare_statistics(out: dict, base: dict, fts: list[dict], cfg: dict) -> dict:
    """Kept fraction and regression slope of the merged task vector on Σ wᵢτᵢ, as z-scores."""
    w = [m["parameters"]["weight"] for m in cfg["models"]]
    p = cfg["models"][0]["parameters"]["density"]
    num = den = var = 0.0
    zero = total = 0
    for k, b in base.items():
        taus = [ft[k] - b for ft in fts]
        ta = sum(wi * t for wi, t in zip(w, taus)).double()
        d = (out[k] - b).double()
        num += float((d * ta).sum())
        den += float((ta * ta).sum())
        var += float((ta**2 * sum(wi**2 * t.double() ** 2 for wi, t in zip(w, taus)) * (1 - p) / p).sum())
        zero += int((d == 0).sum())
        total += d.numel()
    slope, sigma = num / den, math.sqrt(var) / den
    q = (1 - p) ** len(w)  # all N masks drop the entry
    frac = zero / total
    return {
        "slope": slope,
        "slope_z": (slope - 1) / sigma,
        "zero_fraction": frac,
        "zero_fraction_expected": q,
        "zero_z": (frac - q) / math.sqrt(q * (1 - q) / total),
    }


def main() -> int:
    ensure_mergekit()
    import moerge

    results = {}
    ok = True
    with tempfile.TemporaryDirectory(prefix="moerge-compat-") as tmp:
        root = Path(tmp).resolve()
        m = build_models(root)
        base_sd = state(m["base"])
        fts = [state(m[f"ft{i}"]) for i in range(3)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        for name, cfg in configs(m).items():
            slug = name.replace(", ", "_").replace(" ", "_")
            path = root / f"{slug}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            t0 = time.time()
            proc = subprocess.run(
                [str(MERGEKIT_YAML), str(path), str(root / f"mk_{slug}"), "--random-seed", "0"],
                capture_output=True,
                text=True,
                env=env,
            )
            t_mk = time.time() - t0
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-3000:])
                results[name] = {"ok": False, "error": "mergekit failed"}
                ok = False
                continue
            t0 = time.time()
            moerge.merge(path, root / f"mo_{slug}")
            t_mo = time.time() - t0
            a, b = state(root / f"mk_{slug}"), state(root / f"mo_{slug}")
            if set(a) != set(b):
                results[name] = {"ok": False, "error": f"tensor names differ: {sorted(set(a) ^ set(b))[:4]}"}
                ok = False
                continue
            moved = max(float((a[k] - base_sd[k]).abs().max()) for k in a)
            if moved == 0:
                results[name] = {
                    "ok": False,
                    "error": "mergekit's output equals the base: nothing was merged",
                }
                ok = False
                continue
            if name == "dare_linear":
                smk, smo = dare_statistics(a, base_sd, fts, cfg), dare_statistics(b, base_sd, fts, cfg)
                good = all(abs(s[z]) < 5 for s in (smk, smo) for z in ("slope_z", "zero_z"))
                results[name] = {"ok": good, "comparison": "statistical", "mergekit": smk, "moerge": smo}
            else:
                diff = max(float((a[k] - b[k]).abs().max()) for k in a)
                scale = max(float(a[k].abs().max()) for k in a)
                good = diff <= 1e-5 * max(scale, 1.0)
                differing = sum(int((a[k] != b[k]).sum()) for k in a)
                total = sum(a[k].numel() for k in a)
                results[name] = {
                    "ok": good,
                    "comparison": "exact",
                    "max_abs_diff": diff,
                    "differing": [differing, total],
                }
            (dt_mk, cfg_mk), (dt_mo, cfg_mo) = stored(root / f"mk_{slug}"), stored(root / f"mo_{slug}")
            results[name]["stored"] = sorted(set(dt_mo.values()))
            results[name]["config_dtype"] = cfg_mo
            if dt_mk != dt_mo or cfg_mk != cfg_mo:
                results[name]["ok"] = False
                results[name]["error"] = (
                    f"stored dtypes mergekit {sorted(set(dt_mk.values()))} (config {cfg_mk}), "
                    f"moerge {sorted(set(dt_mo.values()))} (config {cfg_mo})"
                )
            results[name].update({"mergekit_s": round(t_mk, 2), "moerge_s": round(t_mo, 2)})
            ok &= results[name]["ok"]
    print(f"{'method':42} {'result':6} {'comparison':12} detail")
    for name, r in results.items():
        if r.get("comparison") == "statistical":
            detail = (
                f"slope mk {r['mergekit']['slope']:.4f} (z {r['mergekit']['slope_z']:+.2f}), "
                f"moerge {r['moerge']['slope']:.4f} (z {r['moerge']['slope_z']:+.2f}); zero frac mk "
                f"{r['mergekit']['zero_fraction']:.4f} moerge {r['moerge']['zero_fraction']:.4f} "
                f"(expected {r['moerge']['zero_fraction_expected']:.4f})"
            )
        else:
            detail = f"max |Δ| {r.get('max_abs_diff', float('nan')):.2e}" if "error" not in r else r["error"]
            if "differing" in r and "error" not in r:
                detail += f", {r['differing'][0]} of {r['differing'][1]} entries differ"
        if "stored" in r and "error" not in r:
            detail += f"; stored {'/'.join(r['stored'])}, config {r['config_dtype']}"
        print(f"{name:42} {'PASS' if r['ok'] else 'FAIL':6} {r.get('comparison', '-'):12} {detail}")
    print(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
