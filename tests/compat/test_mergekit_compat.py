"""Peer agreement: moerge vs mergekit 0.1.5 on the same tiny models and the same YAML configs.

Runs when mergekit is installed in the side venv ``.venv-mergekit`` (``./dev compat`` creates it in ~10 s: a
venv that sees the core venv's packages through a ``.pth`` file, plus mergekit and the three small packages it
lacks; ``MOERGE_MERGEKIT_VENV`` may name another side venv) and is skipped otherwise.

It builds a tiny Llama base and three perturbed fine-tunes (with a tokenizer, absolute paths, as mergekit
needs), runs every config through mergekit (`mergekit_driver.py`, one process) and through ``moerge.merge``, and
compares every tensor, the stored dtypes and config.json's dtype. Deterministic methods must agree to float32
round-off. The random methods (DARE, DELLA) are compared exactly with injected masks (both tools' Bernoulli draw
replaced by the same fixed mask, `mergekit_driver.fixed_mask`), and DARE also with each tool's own RNG,
statistically: the kept fraction and the regression slope of the merged task vector on Σwᵢτᵢ, each within 5σ of
its expectation (σ from the Bernoulli variance).

Where moerge reads a mergekit spelling differently on purpose, the config carries a ``moerge`` override (applied
to moerge's copy of the YAML only) and the reason: ``rescale: true`` is the paper's 1/p here and mergekit's L1
rescale is ``rescale: l1`` (docs/merging.md, "Differences from mergekit").
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def mergekit_python() -> Path | None:
    """The side venv's interpreter (``MOERGE_MERGEKIT_VENV``, default ``.venv-mergekit``), when mergekit is
    installed there."""
    venv = REPO / os.environ.get("MOERGE_MERGEKIT_VENV", ".venv-mergekit")
    py = venv / "bin" / "python"
    if py.exists() and any(venv.glob("lib/python3*/site-packages/mergekit/__init__.py")):
        return py
    return None


PY = mergekit_python()
pytestmark = [
    pytest.mark.skipif(
        PY is None, reason="mergekit is not installed in .venv-mergekit; `./dev compat` installs it (~10 s)"
    ),
    pytest.mark.filterwarnings("ignore::moerge.errors.ConfigWarning"),  # "linear, unused per-model density"
]


@functools.cache
def _driver():
    spec = importlib.util.spec_from_file_location("mergekit_driver", HERE / "mergekit_driver.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    out["lora"] = write_adapter(root / "lora", hidden=64, seed=7).resolve()
    # fine-tunes whose tokenizers add tokens (mergekit reads real tokenizer files): tok1's ids of <A>, <B> equal
    # tok0's, tok2 adds <C> before <A>, so aligning tok0 to tok2's vocabulary permutes rows
    for i, added in enumerate((["<A>", "<B>"], ["<A>", "<B>", "<C>"], ["<C>", "<A>"])):
        out[f"tok{i}"] = with_added_tokens(out[f"ft{i}"], root / f"tok{i}", added, seed=200 + i)
    return out


def with_added_tokens(src: Path, dst: Path, tokens: list[str], seed: int) -> Path:
    """A copy of the model ``src`` whose tokenizer adds the special ``tokens``, with random new rows in its
    embeddings and LM head and ``vocab_size`` grown to match."""
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    tok.save_pretrained(str(dst))
    sd = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = torch.cat([sd[k], torch.randn(len(tokens), sd[k].shape[1], generator=g)])
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = sd["lm_head.weight"].shape[0]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst.resolve()


def write_adapter(folder: Path, hidden: int, seed: int) -> Path:
    """A rank-4 PEFT LoRA adapter on both layers' q_proj and v_proj of the tiny Llama."""
    from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
    from moerge.experts.peft_io import write_peft_folder

    g = torch.Generator().manual_seed(seed)
    lora = {
        f"model.layers.{i}.self_attn.{m}": LoraModule(
            A=0.1 * torch.randn(4, hidden, generator=g),
            B=0.1 * torch.randn(hidden, 4, generator=g),
            alpha=8.0,
        )
        for i in range(2)
        for m in ("q_proj", "v_proj")
    }
    write_peft_folder(Expert(metadata=ExpertMetadata(name="lora", base_model="tiny"), lora=lora), folder)
    return folder


def state(folder: Path) -> dict[str, torch.Tensor]:
    from moerge.merging.folders import CheckpointReader

    with CheckpointReader(folder) as r:
        return {k: r.get(k).float() for k in r.names()}


def stored(folder: Path) -> tuple[dict[str, str], str | None]:
    """Each tensor's stored safetensors dtype, and config.json's dtype."""
    from moerge.merging.folders import CheckpointReader

    with CheckpointReader(folder) as r:
        dtypes = {k: r.dtype(k) for k in r.names()}
    cfg = json.loads((folder / "config.json").read_text())
    return dtypes, cfg.get("torch_dtype", cfg.get("dtype"))


W = [0.3, 0.5, 0.2]


def configs(m: dict[str, Path]) -> dict[str, dict]:
    """name → {"yaml": the mergekit config, optional "moerge": parameter overrides, "inject_masks",
    "statistical"}."""
    fts = [str(m[f"ft{i}"]) for i in range(3)]
    base = str(m["base"])

    def models(**per):
        return [{"model": f, "parameters": {"weight": wi, **per}} for f, wi in zip(fts, W)]

    def c(method, *, with_base=True, params=None, mods=None, dtype="float32", **extra):
        y = {"merge_method": method, "dtype": dtype}
        if "slices" in extra:
            y["slices"] = extra.pop("slices")
        else:
            y["models"] = mods if mods is not None else models()
        if with_base:
            y["base_model"] = base
        if params:
            y["parameters"] = params
        return {"yaml": y, **extra}

    toks = [str(m[f"tok{i}"]) for i in range(3)]
    out = {
        "linear": c("linear", with_base=False),
        "task_arithmetic": c("task_arithmetic", params={"lambda": 0.7}),
        "ties": c("ties", params={"normalize": True}, mods=models(density=0.4)),
        "dare_linear (own RNGs)": c("dare_linear", mods=models(density=0.3), statistical=True),
        "dare_linear, density 1": c("dare_linear", mods=models(density=1.0)),
        "dare_linear (injected masks)": c(
            "dare_linear", mods=models(density=0.3), inject_masks=True, moerge={"rescale": "l1"}
        ),
        "dare_ties (injected masks)": c(
            "dare_ties", mods=models(density=0.5), inject_masks=True, moerge={"rescale": "l1"}
        ),
        "della (injected masks, per-model epsilon)": c(
            "della",
            params={"normalize": True},
            mods=[
                {"model": f, "parameters": {"weight": wi, "density": 0.5, "epsilon": e}}
                for f, wi, e in zip(fts, W, (0.1, 0.2, 0.05))
            ],
            inject_masks=True,
            moerge={"rescale": "l1"},
        ),
        "della_linear (injected masks)": c(
            "della_linear",
            params={"epsilon": 0.1},
            mods=models(density=0.6),
            inject_masks=True,
            moerge={"rescale": "l1"},
        ),
        "breadcrumbs (per-model gamma)": c(
            "breadcrumbs",
            mods=[
                {"model": f, "parameters": {"weight": wi, "density": 0.6, "gamma": g}}
                for f, wi, g in zip(fts, W, (0.01, 0.05, 0.1))
            ],
        ),
        "breadcrumbs_ties": c("breadcrumbs_ties", params={"gamma": 0.02}, mods=models(density=0.5)),
        "slerp": c("slerp", mods=[{"model": base}, {"model": fts[0]}], params={"t": 0.3}),
        "slerp, gradients and filters": c(
            "slerp",
            mods=[{"model": base}, {"model": fts[1]}],
            params={
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
        ),
        "ties, weight gradient": c(
            "ties",
            mods=[
                {"model": f, "parameters": {"weight": [wi, 1 - wi], "density": 0.5}} for f, wi in zip(fts, W)
            ],
        ),
        # per-model filters without a catch-all fall through to the global value (was: the method default)
        "ties, per-model filter + global value": c(
            "ties",
            params={"density": 0.7, "weight": 0.4},
            mods=[
                {
                    "model": fts[0],
                    "parameters": {"density": [{"filter": "mlp", "value": 0.2}], "weight": 1.0},
                },
                {"model": fts[1], "parameters": {"weight": [{"filter": "self_attn", "value": 2.0}]}},
                {"model": fts[2]},
            ],
        ),
        # per-model parameters linear does not take: mergekit ignores them, moerge warns and ignores them
        "linear, unused per-model density": c("linear", with_base=False, mods=models(density=0.5)),
        "model_stock": c("model_stock", mods=[{"model": f} for f in fts]),
        "model_stock, filter_wise": c(
            "model_stock", mods=[{"model": f} for f in fts], params={"filter_wise": True}
        ),
        "multislerp": c("multislerp"),
        "multislerp, normalize_weights false": c("multislerp", params={"normalize_weights": False}),
        "nearswap": c("nearswap", mods=[{"model": base}, {"model": fts[0]}], params={"t": 0.01}),
        "sce": c("sce", mods=[{"model": f} for f in fts]),
        "sce, select_topk 0.3": c("sce", mods=[{"model": f} for f in fts], params={"select_topk": 0.3}),
        "karcher": c("karcher", with_base=False, mods=[{"model": f} for f in fts]),
        "nuslerp": c("nuslerp", with_base=False, mods=models()[:2]),
        "nuslerp, base, row-wise": c(
            "nuslerp", mods=models()[:2], params={"nuslerp_flatten": False, "nuslerp_row_wise": True}
        ),
        "nuslerp, rows": c("nuslerp", with_base=False, mods=models()[:2], params={"nuslerp_flatten": False}),
        "arcee_fusion": c("arcee_fusion", mods=[{"model": base}, {"model": fts[2]}]),
        # slices: frankenmerges and per-range merges (num_hidden_layers is compared too)
        "passthrough slices (frankenmerge)": c(
            "passthrough",
            with_base=False,
            mods=None,
            slices=[
                {"sources": [{"model": fts[0], "layer_range": [0, 2]}]},
                {"sources": [{"model": fts[1], "layer_range": [1, 2]}]},
                {"sources": [{"model": fts[2], "layer_range": [0, 1], "parameters": {"scale": 0.5}}]},
            ],
        ),
        "slerp over slices, t per slice and gradient": c(
            "slerp",
            mods=None,
            params={"t": 0.3},
            slices=[
                {
                    "sources": [
                        {"model": base, "layer_range": [0, 1]},
                        {"model": fts[1], "layer_range": [0, 1]},
                    ],
                    "parameters": {"t": [{"filter": "mlp", "value": 0.9}]},
                },
                {
                    "sources": [
                        {"model": base, "layer_range": [0, 2]},
                        {"model": fts[1], "layer_range": [0, 2]},
                    ],
                    "parameters": {"t": [0.1, 0.8]},
                },
            ],
        ),
        "ties over slices, per-source density": c(
            "ties",
            mods=None,
            slices=[
                {
                    "sources": [
                        {"model": base, "layer_range": [1, 2]},
                        {
                            "model": fts[0],
                            "layer_range": [1, 2],
                            "parameters": {"weight": 0.6, "density": 0.3},
                        },
                        {
                            "model": fts[2],
                            "layer_range": [0, 1],
                            "parameters": {"weight": 0.4, "density": 0.7},
                        },
                    ]
                },
                {
                    "sources": [
                        {"model": base, "layer_range": [0, 2]},
                        {
                            "model": fts[0],
                            "layer_range": [0, 2],
                            "parameters": {"weight": 1.0, "density": 0.5},
                        },
                        {
                            "model": fts[2],
                            "layer_range": [0, 2],
                            "parameters": {"weight": 1.0, "density": 0.5},
                        },
                    ]
                },
            ],
        ),
        # model+lora: the adapter merged into the model's weights first (PEFT's merge_and_unload in mergekit)
        "linear, model+lora": c(
            "linear",
            with_base=False,
            mods=[
                {"model": f"{fts[0]}+{m['lora']}", "parameters": {"weight": 0.7}},
                {"model": fts[1], "parameters": {"weight": 0.3}},
            ],
        ),
        "task_arithmetic, base+lora": c(
            "task_arithmetic",
            mods=[
                {"model": f"{base}+{m['lora']}", "parameters": {"weight": 1.0}},
                {"model": fts[1], "parameters": {"weight": 0.5}},
            ],
            params={"lambda": 0.5},
        ),
        # dtype is the compute dtype, out_dtype the stored one (default: dtype, else the inputs')
        "ties, dtype bfloat16": c(
            "ties", params={"normalize": True}, mods=models(density=0.4), dtype="bfloat16"
        ),
        "task_arithmetic, dtype bfloat16": c("task_arithmetic", params={"lambda": 0.7}, dtype="bfloat16"),
        "task_arithmetic, out_dtype bfloat16": c(
            "task_arithmetic", params={"lambda": 0.7}, out_dtype="bfloat16"
        ),
        "linear, dtype bfloat16, out_dtype float32": c(
            "linear", with_base=False, dtype="bfloat16", out_dtype="float32"
        ),
        # output tokenizers: inputs' embeddings and LM heads aligned to it (a token only tok1 has comes from
        # tok1, one tok0 and tok1 have but the base lacks is their mean); the saved vocabularies are compared too
        "task_arithmetic, tokenizer_source union": c(
            "task_arithmetic",
            mods=[{"model": t, "parameters": {"weight": w}} for t, w in zip(toks[:2], W)],
            tokenizer_source="union",
        ),
        "ties, tokenizer_source base": c(
            "ties",
            mods=[{"model": t, "parameters": {"weight": w, "density": 0.5}} for t, w in zip(toks[:2], W)],
            tokenizer_source="base",
        ),
        "task_arithmetic, tokenizer_source a model": c(
            "task_arithmetic",
            mods=[{"model": t, "parameters": {"weight": w}} for t, w in zip(toks[::2], W)],
            tokenizer_source=toks[2],
        ),
        # mergekit walks the inputs as a Python set, so ids of tokens that several models add in different
        # orders vary with the hash seed: here tok0's added tokens are a prefix of tok1's, so the union is fixed
        "task_arithmetic, tokenizer: per-token sources, force, padding": c(
            "task_arithmetic",
            mods=[{"model": t, "parameters": {"weight": w}} for t, w in zip(toks[:2], W)],
            tokenizer={
                "source": "union",
                "pad_to_multiple_of": 8,
                "tokens": {
                    "<new>": {"source": {"kind": "zero"}},
                    "<A>": {"source": {"kind": "model_token", "model": toks[1], "token": "<C>"}},
                    "x": {"source": toks[0], "force": True},
                    "<B>": {"source": toks[1]},
                },
            },
        ),
    }
    for cfg in out.values():
        for key in ("out_dtype", "tokenizer_source", "tokenizer"):
            if key in cfg:
                cfg["yaml"][key] = cfg.pop(key)
    return out


def saved_vocab(folder: Path) -> tuple[dict[str, int], int]:
    """The saved tokenizer's vocabulary (token → id) and config.json's vocab_size."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    return vocab, json.loads((folder / "config.json").read_text())["vocab_size"]


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
        "zero_z": (frac - q) / math.sqrt(q * (1 - q) / total),
    }


def moerge_fixed_mask(p: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """moerge draws all N models' masks at once (``p`` is ``[N, *rows]``): the driver's mask, per model."""
    u = _driver().fixed_uniform(p[0].numel()).reshape(p.shape[1:])
    return (u < p).to(p.dtype)


def compare(name: str, case: dict, mk: Path, mo: Path, base_sd: dict, fts: list[dict]) -> dict:
    a, b = state(mk), state(mo)
    if set(a) != set(b):
        return {"ok": False, "error": f"tensor names differ: {sorted(set(a) ^ set(b))[:4]}"}
    if (
        max(
            float((a[k] - base_sd[k]).abs().max())
            for k in a
            if k in base_sd and a[k].shape == base_sd[k].shape
        )
        == 0
    ):
        return {"ok": False, "error": "mergekit's output equals the base: nothing was merged"}
    if case.get("statistical"):
        smk, smo = (
            dare_statistics(a, base_sd, fts, case["yaml"]),
            dare_statistics(b, base_sd, fts, case["yaml"]),
        )
        good = all(abs(s[z]) < 5 for s in (smk, smo) for z in ("slope_z", "zero_z"))
        r = {"ok": good, "detail": f"statistical: mergekit {smk}, moerge {smo}"}
    else:
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        scale = max(float(a[k].abs().max()) for k in a)
        r = {"ok": diff <= 1e-5 * max(scale, 1.0), "max_abs_diff": diff, "detail": f"max |Δ| {diff:.2e}"}
    (dt_mk, cfg_mk), (dt_mo, cfg_mo) = stored(mk), stored(mo)
    layers_mk, layers_mo = (
        json.loads((f / "config.json").read_text())["num_hidden_layers"] for f in (mk, mo)
    )
    if layers_mk != layers_mo:
        r["ok"] = False
        r["detail"] += f"; num_hidden_layers mergekit {layers_mk}, moerge {layers_mo}"
    if "tokenizer_source" in case["yaml"] or "tokenizer" in case["yaml"]:
        vocab_mk, vocab_mo = (saved_vocab(f) for f in (mk, mo))
        if vocab_mk != vocab_mo:
            r["ok"] = False
            diff = sorted(set(vocab_mk[0].items()) ^ set(vocab_mo[0].items()))[:4]
            r["detail"] += f"; tokenizers differ: {diff}, vocab_size {vocab_mk[1]} vs {vocab_mo[1]}"
        else:
            r["detail"] += f"; same vocabulary ({len(vocab_mk[0])} tokens, vocab_size {vocab_mk[1]})"
    if dt_mk != dt_mo or cfg_mk != cfg_mo:
        r["ok"] = False
        r["detail"] += (
            f"; stored dtypes mergekit {sorted(set(dt_mk.values()))} (config {cfg_mk}), "
            f"moerge {sorted(set(dt_mo.values()))} (config {cfg_mo})"
        )
    return r


def _numpy_engine_runs(cfg: dict) -> bool:
    """Whether ``engine: auto`` runs this config on the numpy engine."""
    from moerge.merging.api import plan
    from moerge.merging.config import load_config
    from moerge.merging.numpy_engine import why_not

    config = load_config(cfg)
    if config.slices is not None:  # slices: merged by moerge.merging.slices on the torch engine
        return False
    spec, planned, _, _ = plan(config)
    return why_not(spec, planned) is None


def record_results(cases: dict[str, dict], wall_s: float) -> None:
    """With ``MOERGE_COMPAT_RESULTS=PATH`` (``docs/results/mergekit-compat/tables.json``), write every case's
    outcome there: docs/merging.md's agreement table is generated from it (``python -m moerge.bench.results_doc``)."""
    path = os.environ.get("MOERGE_COMPAT_RESULTS")
    if not path:
        return
    from moerge.bench.results_doc import write_tables

    code = "from importlib.metadata import version; print(version('mergekit'))"
    mk_version = subprocess.run([str(PY), "-c", code], capture_output=True, text=True).stdout.strip()
    header = [
        "config (the same YAML in both tools)",
        "moerge engine",
        f"max abs diff vs mergekit {mk_version}",
        "agrees",
    ]
    rows = [
        [
            label,
            c["engine"],
            "statistical (see the test)" if c["max_abs_diff"] is None else f"{c['max_abs_diff']:.1e}",
            "yes" if c["ok"] else "NO",
        ]
        for label, c in cases.items()
    ]
    write_tables(Path(path), {"cases": (header, rows)}, wall_s)


def test_moerge_agrees_with_mergekit_on_the_same_yaml(tmp_path, monkeypatch):
    import moerge

    root = tmp_path.resolve()
    m = build_models(root)
    cases = configs(m)
    jobs = []
    for name, case in cases.items():
        slug = "".join(ch if ch.isalnum() else "_" for ch in name)
        case["slug"] = slug
        (root / f"{slug}.yaml").write_text(yaml.safe_dump(case["yaml"]))
        jobs.append(
            {
                "yaml": str(root / f"{slug}.yaml"),
                "out": str(root / f"mk_{slug}"),
                "inject_masks": bool(case.get("inject_masks")),
            }
        )
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [str(PY), str(HERE / "mergekit_driver.py"), str(root / "jobs.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mk_results = json.loads((root / "results.json").read_text())

    base_sd = state(m["base"])
    fts = [state(m[f"ft{i}"]) for i in range(3)]
    report, failed, recorded = [], [], {}
    started = time.perf_counter()
    for name, case in cases.items():
        slug = case["slug"]
        mk = mk_results[str(root / f"{slug}.yaml")]
        if "error" in mk:
            failed.append(f"{name}: mergekit failed: {mk['error']}")
            continue
        cfg = copy.deepcopy(case["yaml"])
        cfg.setdefault("parameters", {}).update(case.get("moerge", {}))
        # engine auto (numpy where it can run the merge), and then the torch engine too on those configs
        on_numpy = _numpy_engine_runs(cfg)
        engines = ["auto", "torch"] if on_numpy else ["auto"]
        for engine in engines:
            label, out = (
                (name, root / f"mo_{slug}")
                if engine == "auto"
                else (f"{name} [torch engine]", root / f"mo_{slug}_torch")
            )
            with monkeypatch.context() as mp:
                if case.get("inject_masks"):
                    mp.setattr(torch, "bernoulli", moerge_fixed_mask)
                t0 = time.perf_counter()
                moerge.merge({**cfg, "engine": engine}, out)
                t_mo = time.perf_counter() - t0
            r = compare(name, case, root / f"mk_{slug}", out, base_sd, fts)
            report.append(
                f"{label:45} {'PASS' if r['ok'] else 'FAIL'} {r['detail']} ({mk['seconds']:.2f} s vs {t_mo:.2f} s)"
            )
            if not r["ok"]:
                failed.append(f"{label}: {r['detail']}")
            used = "numpy" if engine == "auto" and on_numpy else "torch"
            recorded[label] = {"ok": r["ok"], "max_abs_diff": r.get("max_abs_diff"), "engine": used}
    print("\n".join(report), file=sys.stderr)
    record_results(recorded, time.perf_counter() - started)
    assert not failed, "\n".join(failed)
