"""The benchmark's configuration: `BenchConfig` (one object for the Python API, YAML and `moerge bench` flags),
the merge baselines' parameters, and methods named as ``recipe:key=value,...``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moerge.errors import MalformedConfigError


def _grid(start: float, stop: float, step: float) -> list[float]:
    n = int(round((stop - start) / step)) + 1
    return [round(start + i * step, 6) for i in range(n)]


class MergeBaselineConfig(BaseModel):
    """The static-merge baselines. Tuned as their papers tune them: λ (and TIES' density) chosen on the held-in
    tasks' validation split. Grids: task arithmetic λ ∈ {0.1, …, 1.0}, the authors' (prateeky2806/ties-merging
    README, ``task-vector_linear+0.1+1.01+0.1``); TIES λ ∈ {0.1, …, 1.0, 1.2, 1.5, 2.0, 2.5}: the authors'
    range (``linear+0.8+2.51+0.1``) coarsened above 1 and extended down to 0.1, since merging many LoRA experts
    needs smaller λ (on the synthetic suite λ 0.3 beat λ 1 at every density), and density 0.2 (the authors'
    ``topk20``) with 0.5 and 1.0. The untuned defaults are
    reported as extra rows (``task_arithmetic:untuned``, ``ties:untuned``)."""

    model_config = ConfigDict(extra="forbid")

    tune: bool = Field(True, description="choose λ / density on the held-in validation split")
    task_arithmetic_scales: list[float] = Field(
        default_factory=lambda: _grid(0.1, 1.0, 0.1), description="λ grid for task arithmetic"
    )
    ties_scales: list[float] = Field(
        default_factory=lambda: [*_grid(0.1, 1.0, 0.1), 1.2, 1.5, 2.0, 2.5], description="λ grid for TIES"
    )
    ties_densities: list[float] = Field(
        default_factory=lambda: [0.2, 0.5, 1.0],
        description="density grid for TIES (the authors' default: 0.2)",
    )
    validation_limit: int = Field(
        32, ge=1, description="validation examples per held-in task used for tuning"
    )
    task_arithmetic_scale: float = Field(
        0.4, gt=0, description="untuned λ of θ₀ + λ Σ τᵢ (Ilharco et al.: 0.3–0.5)"
    )
    ties_density: float = Field(
        0.2, gt=0, le=1, description="untuned fraction of each task vector kept (TIES: 20%)"
    )
    ties_scale: float = Field(1.0, gt=0, description="untuned λ applied to the TIES merge (TIES: ≈1)")


class BenchConfig(BaseModel):
    """What `run_bench` runs and how. The same object drives the Python API, YAML and `moerge bench` flags."""

    model_config = ConfigDict(extra="forbid")

    recipes: list[str] | None = Field(
        None,
        description='methods as "recipe" or "recipe:key=value,key=value" (None: every registered recipe that '
        "no baseline covers, plus the variants each recipe declares, e.g. per-example routing)",
    )
    baselines: list[str] | None = Field(
        None, description="baselines to run (None: every registered one, `moerge.bench.baselines`)"
    )
    batch_size: int = Field(64, ge=1)
    limit: int | None = Field(None, ge=1, description="eval examples per task (None: all)")
    user_data: Literal["zero-shot", "few-shot", "full"] = "zero-shot"
    prepare_artifacts: bool = Field(
        True,
        description="compute missing routing artifacts (gates, centroids) from the suite's training data",
    )
    merges: MergeBaselineConfig = Field(default_factory=MergeBaselineConfig)
    premise: bool = Field(
        True, description="measure each zero-shot router's premise on the suite (moerge.bench.premise)"
    )
    cache_prefix: bool = Field(
        True,
        description="when every expert (baselines' included) adapts only decoder layers K…, run the layers below "
        "once per evaluated row and reuse them across methods (exact: moerge.train.prefix.cached_prefix)",
    )
    min_oracle_gap: dict[str, float] = Field(
        default_factory=lambda: {"exact_match": 0.1, "nll": 0.01},
        description="normalised quality is left undefined where the oracle beats the base by less than this "
        "(per metric: accuracy points, nats per token), since the ratio would amplify noise",
    )
    device: str = "cpu"
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads during the run (None: leave as is; 1 is fastest for tiny models)",
    )
    progress: bool = True


@dataclass(frozen=True)
class RecipeSpec:
    """One routed method: a label (as given), the recipe name and its options."""

    label: str
    recipe: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_method(text: str) -> RecipeSpec:
    """``"arrow"`` or ``"arrow:k=2,granularity=example"`` → `RecipeSpec` (values read as YAML scalars)."""
    import yaml

    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise MalformedConfigError(
                f"method {text!r}: option {part!r} is not key=value (e.g. arrow:k=2,temperature=0.5)"
            )
        options[key.strip()] = yaml.safe_load(value.strip())
    if not name.strip():
        raise MalformedConfigError(f"method {text!r} names no recipe; `moerge recipes` lists them")
    return RecipeSpec(text.strip(), name.strip().replace("-", "_"), options)
