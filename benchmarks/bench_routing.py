"""Routing speed: tokens/s of base, base + one LoRA (PEFT), moerge Arrow top-k, and PEFT Arrow
(`create_arrow_model`), on Llama-style models of ~5M and ~25M parameters, prefill and decode (KV cache).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_routing.py --quick      # a couple of minutes
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_routing.py              # E ∈ {8,32,128}, k ∈ {1,2,4}, both models
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_routing.py --models 25M --experts 32 --k 2   # one group

Configurations of one (model, E) group are timed round-robin, each keeping its fastest of ``repeats`` runs
(the machine is shared: round-robin spreads load changes over all, the minimum is the least disturbed).
Experts are random rank-8 LoRAs on q/v/o/gate/up/down with non-zero B. Prints every row, then the ratio
table (moerge Arrow top-2 over 32 experts vs PEFT Arrow, and its cost vs base + one LoRA); ``--out`` saves JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {
    "5M": dict(hidden_size=256, num_hidden_layers=6, intermediate_size=688, num_attention_heads=4),
    "25M": dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1376, num_attention_heads=8),
}


def build_model(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False, **MODELS[size])
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def make_experts(model, num: int, r: int = 8, seed: int = 0):
    from moerge.experts.expert import Expert, ExpertMetadata, LoraModule

    gen = torch.Generator().manual_seed(seed)
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in TARGETS]
    out = []
    for i in range(num):
        lora = {}
        for n in names:
            lin = model.get_submodule(n)
            A = torch.randn(r, lin.in_features, generator=gen) / lin.in_features**0.5
            B = torch.randn(lin.out_features, r, generator=gen) * 0.02
            lora[n] = LoraModule(A, B, alpha=2 * r)
        out.append(Expert(ExpertMetadata(name=f"e{i:03d}"), lora=lora))
    return out


@torch.no_grad()
def prefill_time(call, ids) -> float:
    t = time.perf_counter()
    call(ids, None)
    return time.perf_counter() - t


@torch.no_grad()
def decode_time(call, prompt, steps: int) -> float:
    from transformers import DynamicCache

    out = call(prompt, DynamicCache())
    nxt = out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = call(nxt, out.past_key_values)
        nxt = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t


def measure_group(calls: dict, args) -> dict[str, dict[str, float]]:
    """Round-robin over the configurations (so load changes hit all alike); the fastest of ``repeats`` runs."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (args.batch, args.prefill_len), generator=gen)
    prompt = ids[:, : args.prompt_len]
    best = {name: [float("inf"), float("inf")] for name in calls}
    for rep in range(args.repeats + 1):  # the first round warms up
        for name, call in calls.items():
            p, d = prefill_time(call, ids), decode_time(call, prompt, args.steps)
            if rep:
                best[name] = [min(best[name][0], p), min(best[name][1], d)]
    return {
        name: {
            "prefill_tok_s": args.batch * args.prefill_len / p,
            "decode_tok_s": args.batch * args.steps / d,
        }
        for name, (p, d) in best.items()
    }


def hf_call(model):
    return lambda ids, cache: model(input_ids=ids, past_key_values=cache, use_cache=cache is not None)


def run(args) -> list[dict]:
    from peft import ArrowConfig, LoraConfig, create_arrow_model, get_peft_model

    from moerge.experts.peft_io import write_peft_folder
    from moerge.recipes.facade import attach

    rows = []
    for size in args.models:
        base = build_model(size)
        nparams = sum(p.numel() for p in base.parameters())
        print(f"# model {size}: {nparams / 1e6:.1f}M parameters", flush=True)
        one = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False),
        ).eval()
        all_experts = make_experts(base, max(args.experts))
        for E in args.experts:
            experts = all_experts[:E]
            calls = {("base", None): hf_call(base), ("base+1 LoRA", None): hf_call(one)}
            for k in args.k:
                calls[("moerge Arrow", k)] = hf_call(
                    attach(copy.deepcopy(base), experts, recipe="arrow", k=k)
                )
            with tempfile.TemporaryDirectory() as tmp:
                peft_ks = [k for k in args.k if args.peft_all or (E, k) in args.peft_pairs]
                if peft_ks:
                    paths = [
                        str(write_peft_folder(e, Path(tmp) / e.name, with_metadata=False)) for e in experts
                    ]
                for k in peft_ks:
                    pm = create_arrow_model(
                        copy.deepcopy(base), paths, ArrowConfig(top_k=k, rng_seed=0)
                    ).eval()
                    calls[("PEFT Arrow", k)] = hf_call(pm)
                results = measure_group(calls, args)
            for (config, k), res in results.items():
                row = {
                    "model": size,
                    "config": config,
                    "E": E
                    if config in ("moerge Arrow", "PEFT Arrow")
                    else (1 if config == "base+1 LoRA" else 0),
                    "k": k,
                    "group_E": E,
                    **res,
                }
                rows.append(row)
                print(
                    f"{size:>4} E={E:<4} {config:<13} k={k!s:>4}  prefill {res['prefill_tok_s']:9.0f} tok/s"
                    f"  decode {res['decode_tok_s']:8.1f} tok/s",
                    flush=True,
                )
            del calls
    return rows


def ratio_table(rows: list[dict], E: int = 32, k: int = 2) -> list[dict]:
    out = []
    for size in sorted({r["model"] for r in rows}, key=lambda s: int(s.rstrip("M"))):
        group = {(r["config"], r["k"]): r for r in rows if r["model"] == size and r["group_E"] == E}
        m, p = group.get(("moerge Arrow", k)), group.get(("PEFT Arrow", k))
        one, base = group.get(("base+1 LoRA", None)), group.get(("base", None))
        for phase in ("prefill", "decode"):
            key = f"{phase}_tok_s"
            row = {"model": size, "phase": phase}
            if m and p:
                row["moerge_vs_peft_arrow_speedup"] = m[key] / p[key]
            if m and one:
                row["moerge_cost_vs_base_plus_1_lora"] = one[key] / m[key]
            if m and base:
                row["moerge_cost_vs_base"] = base[key] / m[key]
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5M model, E ∈ {8, 32}, PEFT Arrow at k=2 only")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), help="override the model sizes")
    ap.add_argument("--experts", nargs="+", type=int, help="override E")
    ap.add_argument("--k", nargs="+", type=int, help="override k")
    ap.add_argument(
        "--peft-k", nargs="+", type=int, help="k values at which to run PEFT Arrow (default: all)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write rows and ratios as JSON")
    args = ap.parse_args()
    overrides = {key: getattr(args, key) for key in ("models", "experts", "k")}
    if args.quick:
        args.models, args.experts, args.k = ["5M"], [8, 32], [1, 2, 4]
        args.peft_pairs, args.peft_all = {(8, 2), (32, 2)}, False
        args.batch, args.prefill_len, args.prompt_len, args.steps = 4, 64, 16, 16
    else:
        args.models, args.experts, args.k = ["5M", "25M"], [8, 32, 128], [1, 2, 4]
        args.peft_pairs, args.peft_all = set(), True
        args.batch, args.prefill_len, args.prompt_len, args.steps = 8, 64, 16, 16
    for key, value in overrides.items():
        if value:
            setattr(args, key, value)
    if args.peft_k:
        args.peft_pairs, args.peft_all = {(e, k) for e in args.experts for k in args.peft_k}, False
    print(
        f"# torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    print(
        f"# batch {args.batch}, prefill {args.prefill_len} tokens, decode {args.steps} steps after a "
        f"{args.prompt_len}-token prompt, best of {args.repeats}"
    )
    rows = run(args)
    ratios = ratio_table(rows)
    print(
        "\n| model | phase | moerge Arrow top-2/32 ÷ PEFT Arrow (tok/s, target ≥ 3) | cost vs base+1 LoRA "
        "(target ≤ 1.5) | cost vs base |"
    )
    print("|---|---|---|---|---|")
    for r in ratios:
        cells = [
            f"{r[key]:.2f}×" if key in r else "–"
            for key in (
                "moerge_vs_peft_arrow_speedup",
                "moerge_cost_vs_base_plus_1_lora",
                "moerge_cost_vs_base",
            )
        ]
        print(f"| {r['model']} | {r['phase']} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
