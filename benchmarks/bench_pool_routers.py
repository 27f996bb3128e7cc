"""Quality of the pool's query routers on the synthetic learnable pool (`moerge.pool.synthetic`), against a
uniformly random member, the best single member and the oracle per-query choice; mean over seeds.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_pool_routers.py [--seeds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from moerge.bench.report import markdown_table
from moerge.bench.results_doc import write_tables
from moerge.pool.query import choose
from moerge.pool.synthetic import TOPICS, routed_quality, split, synthetic_pool
from moerge.recipes.registry import get_recipe


class BagOfTopics:
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[float(t in s) for t in TOPICS] + [0.1] for s in texts])


def main(seeds: int = 3, json_path: Path | None = None) -> None:
    t0 = time.perf_counter()
    names = ["zooter", "routoo", "benchmark_knn", "description_router"]
    rows: dict[str, list[float]] = {n: [] for n in ["random", "best single", *names, "oracle"]}
    costs: dict[str, list[float]] = {n: [] for n in names}
    for seed in range(seeds):
        train, test = split(synthetic_pool(600, seed=seed))
        q = test.quality
        rows["random"].append(float(q.mean()))
        rows["best single"].append(float(q.mean(0).max()))
        rows["oracle"].append(float(q.max(1).values.mean()))
        for name in names:
            recipe = get_recipe(name)
            router = recipe.query_router(
                recipe.parse_options({"seed": seed} if name in ("zooter", "routoo") else {})
            )
            if name == "description_router":
                router.embedder = BagOfTopics()
            picks = choose(router.fit(train).scores(test.features, test.texts), test.costs)
            rows[name].append(routed_quality(q, picks))
            costs[name].append(float(test.costs[picks].mean()))
    header = ["router", "quality", "mean cost"]
    table = [
        [name, f"{sum(values) / seeds:.3f}", f"{sum(costs[name]) / seeds:.2f}" if name in costs else ""]
        for name, values in rows.items()
    ]
    print(markdown_table(header, table))
    if json_path is not None:
        print(
            f"wrote {write_tables(json_path, {'routers': (header, table)}, time.perf_counter() - t0)}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the table, the command and the environment as JSON (docs/results/NAME/tables.json "
        "feeds a page's <!-- results: NAME/routers --> block; python -m moerge.bench.results_doc)",
    )
    args = ap.parse_args()
    main(args.seeds, args.json)
