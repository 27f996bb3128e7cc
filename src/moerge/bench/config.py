"""The benchmark's configuration: `BenchConfig` (one object for the Python API, YAML and `moerge bench` flags),
the merge baselines' parameters, and methods named as ``recipe:key=value,...``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moerge.errors import MalformedConfigError
from moerge.train.full import FullTrainConfig


def _grid(start: float, stop: float, step: float) -> list[float]:
    n = int(round((stop - start) / step)) + 1
    return [round(start + i * step, 6) for i in range(n)]


class MergeBaseline(BaseModel):
    """One static-merge baseline: a registered merge method (`moerge.merging.registry`, plugins included), its
    fixed parameters and the grid tuned on the held-in tasks' validation split.

    ``grid`` maps parameter names to the values tried; each grid point overrides ``params``. ``scale`` (λ, the
    multiplier of the merged task vector, θ₀ + λ·τ) is tuned the cheap way: each other grid point is merged once
    with ``scale`` 1 and folded into the weights at every λ, which equals merging with ``scale`` λ for every
    built-in method (each multiplies its merged delta by ``scale``). With a grid and ``tune``, the row ``name``
    is the tuned merge and ``name:untuned`` keeps ``params``; without a grid, ``name`` is the merge with
    ``params``. Names and values are checked against the method's parameters when the config is made."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="a registered merge method (`moerge merge --help` / docs/merging.md)")
    name: str | None = Field(None, description="the row's name (default: the method's)")
    params: dict[str, Any] = Field(
        default_factory=dict, description="fixed parameters; the untuned row's values (method defaults else)"
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="parameter → values tried on validation data (empty: not tuned)"
    )
    description: str | None = Field(None, description="what the row is, for the report (default: the method)")

    @property
    def label(self) -> str:
        return self.name or self.method

    @model_validator(mode="after")
    def _check(self) -> MergeBaseline:
        check_merge_baseline(self)
        return self


def check_merge_baseline(m: MergeBaseline, n_models: int | None = None) -> None:
    """Refuse an unknown method, parameter or value (through the merge registry's own validation), naming the
    fix; with ``n_models``, also a method that cannot merge that many experts."""
    from moerge.merging.registry import get_method, validate_params

    where = f"merges: {m.label}"
    if not m.label or ":" in m.label:
        raise MalformedConfigError(f"{where}: a merge baseline's name must be non-empty and without ':'")
    for key, values in m.grid.items():
        if not values:
            raise MalformedConfigError(f"{where}: grid.{key} is empty; give at least one value or drop it")
    spec = get_method(m.method)
    n = n_models if n_models is not None else max(spec.min_models, min(2, spec.max_models or 2))
    points = [dict(zip(m.grid, vals)) for vals in _product(list(m.grid.values()))] or [{}]
    for point in points:
        validate_params(spec, {**m.params, **point}, [{} for _ in range(n)], where=where)


def _product(lists: list[list[Any]]) -> list[tuple[Any, ...]]:
    import itertools

    return list(itertools.product(*lists)) if lists else []


def default_merges() -> list[MergeBaseline]:
    """The three static merges of the survey's baselines, tuned as their papers tune them: the uniform average
    (model soup); task arithmetic with λ ∈ {0.1, …, 1.0}, the authors' grid (prateeky2806/ties-merging README,
    ``task-vector_linear+0.1+1.01+0.1``), untuned λ 0.4 (Ilharco et al.: 0.3–0.5); TIES with λ ∈ {0.1, …, 1.0,
    1.2, 1.5, 2.0, 2.5} — the authors' range (``linear+0.8+2.51+0.1``) coarsened above 1 and extended down to 0.1,
    since merging many LoRA experts needs smaller λ (on the synthetic suite λ 0.3 beat λ 1 at every density) —
    and density 0.2 (the authors' ``topk20``), 0.5, 1.0; untuned density 0.2, λ 1."""
    return [
        MergeBaseline(method="linear", name="uniform_merge", params={"normalize": True},
                      description="uniform average of the experts' ΔW (model soup)"),
        MergeBaseline(method="task_arithmetic", params={"scale": 0.4}, grid={"scale": _grid(0.1, 1.0, 0.1)},
                      description="θ₀ + λ Σ ΔWᵢ"),
        MergeBaseline(method="ties", params={"density": 0.2, "scale": 1.0},
                      grid={"density": [0.2, 0.5, 1.0], "scale": [*_grid(0.1, 1.0, 0.1), 1.2, 1.5, 2.0, 2.5]},
                      description="TIES"),
    ]  # fmt: skip


class MergeBaselineConfig(BaseModel):
    """The static-merge baselines (`MergeBaseline`, any registered merge method) and how they are tuned. The
    default: uniform average, task arithmetic and TIES (`default_merges`), the last two tuned on validation
    data with their untuned defaults kept as extra rows (``task_arithmetic:untuned``, ``ties:untuned``)."""

    model_config = ConfigDict(extra="forbid")

    methods: list[MergeBaseline] = Field(default_factory=default_merges, description="the merges, in order")
    tune: bool = Field(True, description="tune each merge's grid on the held-in validation split")
    validation_limit: int = Field(
        32, ge=1, description="validation examples per held-in task used for tuning"
    )

    @model_validator(mode="before")
    @classmethod
    def _old_fields(cls, data: Any) -> Any:
        old = {"task_arithmetic_scales", "ties_scales", "ties_densities", "task_arithmetic_scale",
               "ties_density", "ties_scale"}  # fmt: skip
        if isinstance(data, dict) and old & set(data):
            raise MalformedConfigError(
                f"merges: {', '.join(sorted(old & set(data)))} are gone; give the merges as a list, e.g. "
                "merges: {methods: [{method: ties, params: {density: 0.2, scale: 1.0}, "
                "grid: {density: [0.2, 0.5], scale: [0.3, 1.0]}}]} (docs/benchmark.md)"
            )
        return data

    @model_validator(mode="after")
    def _unique(self) -> MergeBaselineConfig:
        labels = [m.label for m in self.methods]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise MalformedConfigError(f"merges: two merges are named {', '.join(twice)}; give each a name")
        return self


UserData = Literal["zero-shot", "few-shot", "full"]
USER_DATA_MODES: tuple[UserData, ...] = ("zero-shot", "few-shot", "full")


class TargetLoraConfig(BaseModel):
    """The ``lora_target`` baseline: a LoRA trained on the same target examples a few-shot / full recipe gets
    (`moerge.train.train_expert` with these settings, per task), folded into the weights."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(40, ge=1, description="optimizer steps per task")
    lr: float = Field(1e-2, gt=0)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(64, ge=2)
    rank: int = Field(4, ge=1)
    alpha: float = Field(8.0, gt=0)
    seed: int = 0


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
    user_data: list[UserData] = Field(
        default_factory=lambda: list(USER_DATA_MODES),
        description="the user-data modes this run serves: each recipe runs in the mode its taxonomy record "
        "declares (zero-shot recipes get no data; few-shot ones `few_shot` labelled examples of the task; full "
        "ones the task's whole target split) when that mode is listed, and is reported not applicable otherwise. "
        "A single mode (the old form) means it and every cheaper one",
    )
    few_shot: int = Field(
        20, ge=1, description="labelled examples per task for few-shot recipes and baselines (5, 20, 200 …)"
    )
    lora_target: TargetLoraConfig = Field(default_factory=TargetLoraConfig)
    experts: list[str] | None = Field(
        None,
        description="route over these experts of the library only, in this order (None: the suite's expert "
        "list, or every LoRA expert of the library)",
    )
    prepare_artifacts: bool = Field(
        True,
        description="compute missing routing artifacts (gates, centroids) from the suite's training data",
    )
    artifacts_dir: str | None = Field(
        None,
        description="folder the run stores the routing artifacts it computes in (None: "
        "$MOERGE_CACHE/artifacts/<library>); the library's own artifacts are read first",
    )
    write_artifacts: bool = Field(
        False,
        description="store computed routing artifacts in the expert library itself (default: never modify it)",
    )
    merges: MergeBaselineConfig = Field(default_factory=MergeBaselineConfig)
    expert_library: Literal["lora", "full"] = Field(
        "lora",
        description="the experts every method runs on: the suite's LoRA library, or `full`: one full fine-tune "
        "per held-in task (dense task vectors, same names; built beside the suite on first use and cached, "
        "`moerge.bench.suites.build.build_full_library`)",
    )
    full_finetune: FullTrainConfig = Field(
        default_factory=lambda: FullTrainConfig(
            steps=200, lr=1e-3, batch_size=16, seq_len=32, warmup_steps=10
        ),
        description="how the `full` library's experts are trained (its hash names the cached library)",
    )
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
    executor: Literal["local", "ray"] = Field(
        "local",
        description="run the recipes one after another here (local) or each as a Ray task (ray; baselines, "
        "premise and artifact preparation stay here). Results are the same either way",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads during the run (None: leave as is; 1 is fastest for tiny models)",
    )
    progress: bool = True

    @field_validator("user_data", mode="before")
    @classmethod
    def _one_mode(cls, value: Any) -> Any:
        """The old single value: that mode and the cheaper ones (``few-shot`` → zero-shot and few-shot)."""
        if isinstance(value, str):
            if value not in USER_DATA_MODES:
                raise MalformedConfigError(
                    f"user_data: {value!r} is not one of {', '.join(USER_DATA_MODES)}; give a list of them, e.g. "
                    "user_data: [zero-shot, few-shot]"
                )
            return list(USER_DATA_MODES[: USER_DATA_MODES.index(value) + 1])
        return value

    @field_validator("user_data")
    @classmethod
    def _some_mode(cls, value: list[str]) -> list[str]:
        if not value:
            raise MalformedConfigError("user_data: list at least one of zero-shot, few-shot, full")
        return list(dict.fromkeys(value))


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
