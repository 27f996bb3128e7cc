"""Routing signatures the benchmark computes where the library lacks them: the runner plays the contributors,
computing each recipe's data signatures (PHATGOOSE gates, centroids, …) from each expert's training data in
the suite, through the signature's own ``compute`` — it needs to know no kind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moerge.bench.config import RecipeSpec
from moerge.bench.evaluate import BenchRun
from moerge.errors import MoergeError


def expert_training_rows(suite: Any, expert: str) -> list[dict[str, str]]:
    """Training rows (``{"prompt", "completion"}`` or ``{"text"}``) of the held-in task(s) whose expert is
    ``expert``: the contributor's data, in the order the expert saw it."""
    return [ex.as_training_row() for t in suite.tasks if t.held_in and t.experts and t.experts[0] == expert
            for ex in t.train]  # fmt: skip


def prepare_artifacts(run: BenchRun, specs: Sequence[RecipeSpec]) -> list[str]:
    """Compute the signatures the recipes of ``specs`` need and the library lacks, from each expert's training
    data. Experts without training data in the suite are left without, so their recipes report not
    applicable. Returns one note per signature computed."""
    from moerge.recipes.registry import get_recipe

    ctx = run.build_context()
    data = {e.name: expert_training_rows(run.suite, e.name) for e in run.experts}
    done: list[str] = []
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        try:
            rec = get_recipe(spec.recipe)
            opts = rec.parse_options(spec.options)
        except MoergeError:
            continue  # reported when the recipe runs
        for sig, missing in rec.missing_signatures(ctx, opts):
            key = (sig.kind, repr(sorted(sig.config(opts, ctx).items())))
            if key in seen:
                continue
            seen.add(key)
            have = {n: data[n][: sig.max_rows] for n in missing if data.get(n)}
            if not have:
                continue
            run.describe(f"computing {sig.kind} for {len(have)} experts")
            sig.compute(ctx, opts, have)
            done.append(f"computed {sig.kind} for {len(have)} experts from their training data")
    return done
