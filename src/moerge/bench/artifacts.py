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
    data (`moerge.recipes.facade.prepare_signatures`), into ``run.library`` (the run's artifacts folder over
    the user's library unless told to write into it). Experts without training data in the suite are left
    without, so their recipes report not applicable. With a progress display, a bar counts the (signature,
    expert) computations, named as it goes, and a second one the steps of the current one (gate training).
    Returns one note per signature computed."""
    from moerge.recipes.facade import prepare_signatures
    from moerge.recipes.progress import RichSignatureProgress

    data = {e.name: expert_training_rows(run.suite, e.name) for e in run.experts}
    bar = RichSignatureProgress(run.progress) if run.progress is not None else None
    done: list[str] = []
    from moerge.errors import RecipeNotApplicableError
    from moerge.recipes.registry import get_recipe

    for spec in specs:  # a signature computed for one spec is found present by the next that needs it
        try:
            get_recipe(spec.recipe).check_experts(run.experts, spec.options)
        except RecipeNotApplicableError:
            continue  # reported when the recipe runs
        run.describe(f"artifacts for {spec.label}")
        done += prepare_signatures(
            spec.recipe, run.model, run.tokenizer, run.library, data, experts=run.experts,
            embedders=run.embedders, progress=bar, weights=False, **spec.options,
        )  # fmt: skip
    if bar is not None:
        bar.close()
    return done
