"""Routing signatures the benchmark computes where the library lacks them: the runner plays the contributors,
computing each recipe's data signatures (PHATGOOSE gates, centroids, …) from each expert's training data in
the suite, through the signature's own ``compute`` — it needs to know no kind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moerge.bench.config import RecipeSpec
from moerge.bench.evaluate import BenchRun


def expert_training_rows(suite: Any, expert: str) -> list[dict[str, str]]:
    """Training rows (``{"prompt", "completion"}`` or ``{"text"}``) of the held-in task(s) whose expert is
    ``expert``: the contributor's data, in the order the expert saw it."""
    return [ex.as_training_row() for t in suite.tasks if t.held_in and t.experts and t.experts[0] == expert
            for ex in t.train]  # fmt: skip


def prepare_artifacts(run: BenchRun, specs: Sequence[RecipeSpec]) -> list[str]:
    """Compute the signatures the recipes of ``specs`` need and the library lacks, from each expert's training
    data (`moerge.recipes.facade.prepare_signatures`). Experts without training data in the suite are left
    without, so their recipes report not applicable. Returns one note per signature computed."""
    from moerge.recipes.facade import prepare_signatures

    data = {e.name: expert_training_rows(run.suite, e.name) for e in run.experts}
    done: list[str] = []
    for spec in specs:  # a signature computed for one spec is found present by the next that needs it
        done += prepare_signatures(
            spec.recipe, run.model, run.tokenizer, run.library, data, experts=run.experts,
            embedders=run.embedders, progress=run.describe, **spec.options,
        )  # fmt: skip
    return done
