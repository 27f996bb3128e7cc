"""PWE MoE's Pareto front against task-arithmetic interpolation, on two held-in tasks of the synthetic suite.

PWE MoE (moerge.recipes.weight_ensembling) is trained once on the two tasks' experts and their training data;
each preference r = (1 − a, a) then folds into one dense model. The baseline interpolates the two task vectors,
θ₀ + s·((1 − a)·τ_A + a·τ_B), for the same a (s = ``--ta-scale``). Each point is the mean NLL per target token
on each task's eval examples (lower is better on both axes). Writes a PNG plot and the points as JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pwe_moe_pareto.py [--tasks A,B] [--steps 200] \\
        [--points 6] [--out docs/img/pwe_moe_pareto.png]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from moerge.bench.metrics import target_nll
from moerge.bench.suites.synthetic import SyntheticSuiteConfig, build_synthetic_suite
from moerge.model.routed import weight_deltas
from moerge.model.weight_ensembling import fold_preferences, set_preference
from moerge.recipes.recipe import BuildContext
from moerge.recipes.weight_ensembling import PweMoeOptions, build_pwe_model, train_pwe


def nll(model, tokenizer, task, limit: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for b in task.eval_batches(tokenizer, 32, experts=[], limit=limit):
            s, c = target_nll(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels)
            total, count = total + s, count + c
    return total / max(1, count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=None, help="two held-in tasks (default: the first two)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--points", type=int, default=6)
    ap.add_argument("--limit", type=int, default=64, help="eval examples per task")
    ap.add_argument("--ta-scale", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path("docs/img/pwe_moe_pareto.png"))
    args = ap.parse_args()

    suite = build_synthetic_suite(SyntheticSuiteConfig(progress=False))
    model, tok = suite.load_base()
    model.eval()
    library = suite.open_library()
    held = [t for t in suite.tasks if t.held_in]
    names = args.tasks.split(",") if args.tasks else [t.name for t in held[:2]]
    tasks = [next(t for t in held if t.name == n) for n in names]
    experts = [library.get(t.oracle_expert) for t in tasks]
    ctx = BuildContext(model=model, experts=experts, tokenizer=tok)

    o = PweMoeOptions(steps=args.steps, lr=args.lr)
    pwe = build_pwe_model(ctx, o)
    rows = [t.training_rows() for t in tasks]
    losses = train_pwe(pwe, tok, rows, o)

    tvs = [weight_deltas(model, e) for e in experts]
    points = []
    for i in range(args.points):
        a = i / (args.points - 1)
        r = torch.tensor([1 - a, a])
        set_preference(pwe, r)
        dense = fold_preferences(copy.deepcopy(pwe))
        ta = copy.deepcopy(model)
        params = dict(ta.named_parameters())
        with torch.no_grad():
            for key in set(tvs[0]) | set(tvs[1]):
                for w, tv in zip((1 - a, a), tvs, strict=True):
                    if key in tv:
                        params[key].add_(args.ta_scale * w * tv[key].to(params[key].dtype))
        points.append({
            "a": a,
            "pwe_moe": [nll(dense, tok, t, args.limit) for t in tasks],
            "task_arithmetic": [nll(ta, tok, t, args.limit) for t in tasks],
        })  # fmt: skip
        print(json.dumps(points[-1]))
    base = [nll(model, tok, t, args.limit) for t in tasks]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for key, style in (("pwe_moe", "o-"), ("task_arithmetic", "s--")):
        ax.plot([p[key][0] for p in points], [p[key][1] for p in points], style, label=key)
    ax.plot([base[0]], [base[1]], "k^", label="base")
    ax.set_xlabel(f"NLL on {names[0]}")
    ax.set_ylabel(f"NLL on {names[1]}")
    ax.set_title("PWE MoE front vs task-arithmetic interpolation")
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(args.out)
    summary = {"tasks": names, "base": base, "points": points, "train_loss_first_last": [losses[0], losses[-1]],
               "options": o.model_dump()}  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
