"""The benchmark's baselines as a registry, like recipes: each is one decorated function that evaluates a
reference model on every task and records it. ``covers`` names the recipes whose numbers a baseline already
gives (they are not run again as routed recipes by default).

- ``base``: the base model; ``oracle``: each target token from its ground-truth expert (the reference for
  normalised quality); ``label_routing``: per-token, per-module routing fed the labels;
- ``best_single``: every expert alone, the best per split chosen after the fact (an optimistic baseline);
- ``merges``: static merges of every expert folded into the weights, as configured (`BenchConfig.merges`; by
  default ``uniform_merge``, ``task_arithmetic`` and ``ties``, the last two tuned on validation data);
- ``multitask``: the LoRA the suite ships trained on the union of the held-in data.

A new baseline is one ``@baseline("name")`` function ``fn(run: BenchRun) -> None`` that calls ``run.record``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moerge.bench.evaluate import BenchRun, evaluate, timed
from moerge.bench.metrics import label_weights, peak_memory
from moerge.bench.results import MethodResult, TaskResult
from moerge.bench.subjects import LabelRouter, OracleSubject, PlainSubject, RoutedSubject, folded
from moerge.errors import MoergeError, UnknownNameError


@dataclass(frozen=True)
class Baseline:
    """A registered baseline: ``run(run)`` evaluates and records it; ``finalize(run)`` runs once every
    method has been evaluated and normalised (e.g. picking the best single expert)."""

    name: str
    run: Callable[[BenchRun], None]
    covers: tuple[str, ...] = ()
    finalize: Callable[[BenchRun], None] | None = None
    passes: Callable[[BenchRun], int] = lambda run: 1  # evaluations of every task (the progress bar's total)


BASELINES: dict[str, Baseline] = {}  # in the order the report shows them


def baseline(
    name: str,
    *,
    covers: tuple[str, ...] = (),
    finalize: Callable[[BenchRun], None] | None = None,
    passes: Callable[[BenchRun], int] = lambda run: 1,
) -> Callable[[Callable[[BenchRun], None]], Callable[[BenchRun], None]]:
    """Register ``fn(run)`` as baseline ``name``."""

    def wrap(fn: Callable[[BenchRun], None]) -> Callable[[BenchRun], None]:
        if name in BASELINES:
            raise MoergeError(f"a baseline named {name!r} is already registered")
        BASELINES[name] = Baseline(name, fn, covers, finalize, passes)
        return fn

    return wrap


def get_baselines(names: list[str] | None, merges: Sequence[str] = ()) -> list[Baseline]:
    """The baselines ``names`` asks for (None: all), in registry order; unknown names are refused. The names of
    the configured merges (``merges``) select the ``merges`` baseline."""
    if names is None:
        return list(BASELINES.values())
    unknown = [n for n in names if n not in BASELINES and n not in merges]
    if unknown:
        raise UnknownNameError(
            f"unknown baselines {unknown}; known: {', '.join([*BASELINES, *merges])} (merges are configured "
            "in BenchConfig.merges, docs/benchmark.md)"
        )
    wanted = set(names) | ({"merges"} if set(names) & set(merges) else set())
    return [b for n, b in BASELINES.items() if n in wanted]


def covered_recipes() -> frozenset[str]:
    """Recipes whose numbers some baseline gives."""
    return frozenset(r for b in BASELINES.values() for r in b.covers)


def _one_expert_flops(routed: Any) -> float:
    """2 × multiply-adds per token of one expert in every adapted module (its LoRA, or a dense expert's ΔW)."""
    total = 0.0
    for la in routed.expert_layers.values():
        dense = getattr(la, "num_dense", 0)
        total += 2 * la.d_in * la.d_out if dense else 2 * la.rank * (la.d_in + la.d_out)
    return total


# ---------------------------------------------------------------------------------------------- references
@baseline("base", covers=("base",))
def run_base(run: BenchRun) -> None:
    meta = MethodResult(
        name="base", kind="baseline", description="the base model alone", expert_flops_per_token=0.0
    )
    with peak_memory(run.config.device) as mem:
        results = evaluate(run, PlainSubject(run.model), "base", run.tasks_for())
    run.record(meta, results, mem)


@baseline("oracle", covers=("oracle",))
def run_oracle(run: BenchRun) -> None:
    from moerge.recipes.facade import attach, detach

    meta = MethodResult(
        name="oracle",
        kind="baseline",
        routed=True,
        description="each target token predicted by the model of its ground-truth expert(s) (a held-in task's "
        "own expert; each segment's or character's own expert held-out; the base where none): the reference "
        "for normalised quality",
    )
    with peak_memory(run.config.device) as mem:
        routed, meta.build_s = timed(lambda: attach(run.model, run.experts, unrouted="average"))
        try:
            meta.expert_flops_per_token = _one_expert_flops(routed)
            results = evaluate(run, OracleSubject(routed), "oracle", run.tasks_for())
        finally:
            detach(routed)
    run.record(meta, results, mem)


@baseline("label_routing")
def run_label_routing(run: BenchRun) -> None:
    from moerge.recipes.facade import attach, detach

    meta = MethodResult(
        name="label_routing",
        kind="baseline",
        routed=True,
        description="per-token, per-module routing fed the ground-truth labels (position t uses token t+1's "
        "experts, equally weighted): how far perfect per-token module-level routing gets",
    )
    with peak_memory(run.config.device) as mem:
        routed, meta.build_s = timed(
            lambda: attach(run.model, run.experts, router=LabelRouter(), unrouted="average")
        )
        try:
            subject = RoutedSubject(routed, lambda b, t: {"extra": {"label_weights": label_weights(b)}})
            meta.expert_flops_per_token = subject.flops
            results = evaluate(run, subject, "label_routing", run.tasks_for())
        finally:
            detach(routed)
    run.record(meta, results, mem)


# ---------------------------------------------------------------------------------------------- single experts
def pick_best_single(run: BenchRun) -> None:
    """``best_single``: per split, the single expert with the best mean normalised (else raw) quality."""
    singles = [m for m in run.methods if m.kind == "single"]
    if not singles:
        return
    meta = MethodResult(name="best_single", kind="baseline", description="", routed=False)
    chosen: dict[str, str] = {}
    results: list[TaskResult] = []
    for split in ("held_in", "held_out"):
        if not run.tasks_for(split):
            continue
        best, best_key = None, None
        for m in singles:
            rs = [r for r in run.results if r.method == m.name and r.split == split and r.status == "ok"]
            key = _goodness(rs)
            if key is not None and (best_key is None or key > best_key):
                best, best_key = m, key
        if best is None:
            continue
        chosen[split] = best.name.removeprefix("single:")
        for r in run.results:
            if r.method == best.name and r.split == split:
                results.append(r.model_copy(update={"method": "best_single"}))
        meta.expert_flops_per_token = best.expert_flops_per_token
        meta.build_s += best.build_s
    meta.description = (
        "the best single expert per split, chosen after the fact ("
        + ", ".join(f"{s}: {n}" for s, n in chosen.items())
        + ")"
    )
    meta.options = {"chosen": chosen}
    meta.eval_s = sum(r.wall_s for r in results)
    meta.peak_memory_mb = max((m.peak_memory_mb or 0.0 for m in singles), default=None)
    run.methods.append(meta)
    run.results.extend(results)


def _goodness(rs: list[TaskResult]) -> float | None:
    """Mean normalised quality if defined, else mean raw quality (higher is better; NLL negated)."""
    if not rs:
        return None
    norm = [r.normalized for r in rs if r.normalized is not None]
    if norm:
        return sum(norm) / len(norm)
    return sum((r.score if r.metric == "exact_match" else -r.score) for r in rs if r.score is not None) / len(
        rs
    )


@baseline(
    "best_single", covers=("single_expert",), finalize=pick_best_single, passes=lambda run: len(run.experts)
)
def run_singles(run: BenchRun) -> None:
    """Every expert alone on every task (one attach; explicit one-hot weights per call)."""
    from moerge.recipes.facade import attach, detach

    E = len(run.experts)
    routed, build_s = timed(lambda: attach(run.model, run.experts, unrouted="average"))
    try:
        for i, name in enumerate(run.names):
            meta = MethodResult(
                name=f"single:{name}", kind="single", routed=False, description=f"expert {name} alone",
                build_s=build_s / E,
            )  # fmt: skip
            onehot = torch.zeros(E)
            onehot[i] = 1.0

            def inputs(b: Any, t: Any, w: torch.Tensor = onehot) -> dict[str, Any]:
                return {"weights": w.expand(len(b.examples), -1).clone()}

            with peak_memory(run.config.device) as mem:
                subject = RoutedSubject(routed, inputs)
                results = evaluate(run, subject, meta.name, run.tasks_for())
            meta.expert_flops_per_token = _one_expert_flops(routed)
            for r in results:  # explicit weights are not routing decisions
                r.routing_accuracy = r.routing_entropy = r.mean_weights = r.layer_weights = None
            run.record(meta, results, mem)
    finally:
        detach(routed)


# ---------------------------------------------------------------------------------------------- static merges
def _merged(run: BenchRun, name: str, method: str, params: dict[str, Any]) -> Any:
    """A static merge of every expert (dense ΔW per module) with ``method``."""
    from moerge.merging.api import merge
    from moerge.merging.registry import get_method

    expert_name = name.replace(":", "-")  # an expert name, not a method label
    extra: dict[str, Any] = {}
    if get_method(method).stats:  # Fisher / RegMean: the contributors' statistics, stored in the library
        from moerge.bench.suites.build import STATS_CONFIG

        extra = {"library": run.library.url, "stats_config": STATS_CONFIG}
    return merge(
        merge_method=method, experts=run.experts, lora_mode="dense", parameters=params, name=expert_name,
        **extra,
    )  # fmt: skip


def run_merge(run: BenchRun, name: str, method: str, params: dict[str, Any], description: str,
              scale: float = 1.0, extra: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Evaluate ``scale`` × a static merge of every expert, folded into the base weights."""
    meta = MethodResult(name=name, kind="baseline", description=description, expert_flops_per_token=0.0,
                        options={"merge_method": method, **params, **(extra or {})})  # fmt: skip
    with peak_memory(run.config.device) as mem:
        try:
            merged, meta.build_s = timed(lambda: _merged(run, name, method, params))
        except MoergeError as e:
            run.record(meta, run.skipped(name, run.tasks_for(), "error", str(e)), mem)
            return
        with folded(run.model, merged, scale) as model:
            results = evaluate(run, PlainSubject(model), name, run.tasks_for())
    run.record(meta, results, mem)


def validation_tasks(run: BenchRun) -> tuple[list[Any], str]:
    """The held-in tasks' validation examples as tasks to score (``(tasks, source)``); a suite without a
    validation split falls back to the last training examples (seen by the experts; said in the report)."""
    limit = run.config.merges.validation_limit
    held_in = run.tasks_for("held_in")
    if any(t.validation for t in held_in):
        return [t.model_copy(update={"name": f"{t.name}/validation", "eval": t.validation[:limit]})
                for t in held_in if t.validation], "validation"  # fmt: skip
    return [t.model_copy(update={"name": f"{t.name}/train-tail", "eval": t.train[-limit:]})
            for t in held_in if t.train], "training examples (no validation split)"  # fmt: skip


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a grid's values, the first key varying slowest."""
    combos: list[dict[str, Any]] = [{}]
    for key, values in grid.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def tune_merge(
    run: BenchRun, name: str, method: str, settings: list[dict[str, Any]], scales: list[float]
) -> tuple[dict[str, Any], float, list[dict[str, Any]], str] | None:
    """Choose the merge's settings and λ on held-in validation data: the best mean quality (exact match, or
    −NLL for NLL tasks), ties broken by the lower mean NLL per target token. λ scales the merged task vector
    (θ₀ + λ·τ_merged), so each setting is merged once (with ``scale`` 1 where the method has one) and folded at
    every λ. Returns ``(settings, λ, every grid point's scores, data source)``, or None without validation data."""
    from moerge.merging.registry import get_method

    tasks, source = validation_tasks(run)
    if not tasks:
        return None
    unit = {"scale": 1.0} if "scale" in get_method(method).params else {}
    grid: list[dict[str, Any]] = []
    best: tuple[tuple[float, float], dict[str, Any], float] | None = None
    for params in settings:
        merged = _merged(run, name, method, {**params, **unit})
        for lam in scales:
            with folded(run.model, merged, lam) as model:
                rs = evaluate(run, PlainSubject(model), name, tasks, counted=False)
            quality = sum(r.score if r.metric == "exact_match" else -r.score for r in rs) / len(rs)
            nll = sum(r.target_nll for r in rs) / len(rs)
            grid.append({**params, "scale": lam, "quality": quality, "nll": nll})
            key = (quality, -nll)
            if best is None or key > best[0]:
                best = (key, params, lam)
    assert best is not None
    return best[1], best[2], grid, source


def _describe(values: dict[str, Any]) -> str:
    """``λ = 0.4, density 0.2``: a merge's parameters for the report (λ first)."""
    parts = [f"λ = {values['scale']}"] if "scale" in values else []
    return ", ".join(parts + [f"{k} {v}" for k, v in values.items() if k != "scale"])


def run_configured_merge(run: BenchRun, m: Any) -> None:
    """One `moerge.bench.config.MergeBaseline`: the tuned row (``name``) and the untuned one (``name:untuned``)
    when it has a grid and tuning is on, else one row with its fixed parameters."""
    from moerge.merging.registry import get_method

    name, method = m.label, m.method
    label = m.description or f"{method} merge ({get_method(method).paper})"
    tune = run.config.merges.tune and bool(m.grid)
    if not tune:
        text = (
            label
            if not m.params or not m.grid
            else f"{label} with its default {_describe(m.params)} (not tuned)"
        )
        run_merge(run, name, method, dict(m.params), text)
        return
    run.describe(f"{name}: tuning on validation data")
    grid = {k: v for k, v in m.grid.items() if k != "scale"}
    fixed = {k: v for k, v in m.params.items() if k != "scale"}
    settings = [{**fixed, **p} for p in grid_points(grid)]
    scales = list(m.grid.get("scale", [1.0]))
    try:
        tuned = tune_merge(run, name, method, settings, scales)
    except MoergeError as e:
        tuned = None
        run.notes.append(f"{name}: tuning failed ({e}); only the untuned row is shown")
    if tuned is None:
        run.record(
            MethodResult(name=name, kind="baseline", description=f"{label}, tuned"),
            run.skipped(name, run.tasks_for(), "not_applicable", "no held-in validation or training data to tune on"),
        )  # fmt: skip
    else:
        params, lam, points, source = tuned
        unit = {"scale": 1.0} if "scale" in get_method(method).params else {}
        chosen = {k: v for k, v in params.items() if k in m.grid}
        text = f"{label} with {_describe({'scale': lam, **chosen})} chosen on held-in {source}"
        run_merge(run, name, method, {**params, **unit}, text, scale=lam,
                  extra={"tuned": {"scale": lam, **chosen, "on": source, "grid": points}})  # fmt: skip
    run_merge(run, f"{name}:untuned", method, dict(m.params),
              f"{label} with its default {_describe(m.params)} (not tuned)")  # fmt: skip


def selected_merges(config: Any) -> list[Any]:
    """The configured merges a run evaluates: all of them, unless ``config.baselines`` names some (or
    ``merges``, for all)."""
    wanted = config.baselines
    methods = list(config.merges.methods)
    if wanted is None or "merges" in wanted:
        return methods
    return [m for m in methods if m.label in wanted]


def _merge_passes(run: BenchRun) -> int:
    tune = run.config.merges.tune
    return sum(2 if tune and m.grid else 1 for m in selected_merges(run.config) + data_merges(run))


@baseline("merges", covers=("uniform",), passes=_merge_passes)
def run_merges(run: BenchRun) -> None:
    """The static merges of `BenchConfig.merges` (default: uniform average, task arithmetic, TIES), each of
    every expert folded into the base weights."""
    for m in selected_merges(run.config) + data_merges(run):
        run.describe(m.label)
        run_configured_merge(run, m)


def data_merges(run: BenchRun) -> list[Any]:
    """On the full-fine-tune library, whose build stores each contributor's Fisher and Gram statistics
    (`moerge.bench.suites.build.full_expert_stats`), the data-aware merges too: Fisher merging and RegMean
    (α = 0.9, the paper's default), untuned, as their papers run them; unless the run's merges name them."""
    from moerge.bench.config import MergeBaseline

    if run.config.expert_library != "full":
        return []
    wanted = run.config.baselines
    have = {m.method for m in run.config.merges.methods}
    out = [MergeBaseline(method="fisher"), MergeBaseline(method="regmean", params={"alpha": 0.9})]
    return [
        m for m in out if m.method not in have and (wanted is None or "merges" in wanted or m.label in wanted)
    ]


# ---------------------------------------------------------------------------------------------- multitask
@baseline("multitask")
def run_multitask(run: BenchRun) -> None:
    meta = MethodResult(name="multitask", kind="baseline", expert_flops_per_token=0.0,
                        description="a LoRA trained on the union of the held-in tasks' data, folded in")  # fmt: skip
    lib = run.baselines_library
    if lib is None or "multitask" not in lib:
        reason = "the suite ships no multitask expert (it needs the experts' shared data)"
        meta.status, meta.reason = "not_applicable", reason
        run.record(meta, run.skipped("multitask", run.tasks_for(), "not_applicable", reason))
        return
    with peak_memory(run.config.device) as mem:
        expert, meta.build_s = timed(lambda: lib.get("multitask"))
        with folded(run.model, expert) as model:
            results = evaluate(run, PlainSubject(model), "multitask", run.tasks_for())
    run.record(meta, results, mem)


# ---------------------------------------------------------------------------------------------- the target data
def _target_skip(run: BenchRun, meta: MethodResult) -> bool:
    """Record ``meta`` as not applicable when the run serves no few-shot data; True if so."""
    if "few-shot" in run.config.user_data:
        return False
    reason = "this run serves no few-shot target data (add few-shot to user_data / --user-data)"
    meta.status, meta.reason = "not_applicable", reason
    run.record(meta, run.skipped(meta.name, run.tasks_for(), "not_applicable", reason))
    return True


@baseline("lora_target")
def run_lora_target(run: BenchRun) -> None:
    """Per task, a LoRA trained on the same few-shot examples the few-shot recipes get (`BenchConfig.lora_target`
    settings, on the modules the experts adapt), folded into the weights and evaluated on that task: the
    cheapest use of the same data with gradients."""
    import time

    from moerge.bench.evaluate import mode_label, target_data
    from moerge.train.lora import TrainConfig, train_expert

    cfg = run.config.lora_target
    meta = MethodResult(
        name="lora_target", kind="baseline", user_data=mode_label("few-shot", run.config),
        expert_flops_per_token=0.0,
        description=f"a rank-{cfg.rank} LoRA trained per task on its {run.config.few_shot} target examples "
        f"({cfg.steps} steps, lr {cfg.lr}), folded into the weights",
    )  # fmt: skip
    if _target_skip(run, meta):
        return
    modules = sorted({m for e in run.experts for m in e.lora}) or None
    train = TrainConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seq_len=cfg.seq_len, rank=cfg.rank,
                        alpha=cfg.alpha, seed=cfg.seed, target_modules=modules, progress=False)  # fmt: skip
    results: list[TaskResult] = []
    seconds: list[float] = []
    with peak_memory(run.config.device) as mem:
        for task in run.tasks_for():
            data = target_data(task, "few-shot", run.config)
            if data is None:
                results += run.skipped(
                    meta.name, [task], "not_applicable", f"task {task.name!r} has no target data"
                )
                continue
            run.describe(f"lora_target: {task.name}")
            t0 = time.perf_counter()
            try:
                expert = train_expert(
                    run.model, run.tokenizer, list(data.rows), train, name=f"target-{task.name}"
                )
            except MoergeError as e:
                results += run.skipped(meta.name, [task], "error", f"{type(e).__name__}: {e}")
                continue
            seconds.append(time.perf_counter() - t0)
            meta.trainable_parameters = sum(lm.A.numel() + lm.B.numel() for lm in expert.lora.values())
            with folded(run.model, expert) as model:
                results += evaluate(run, PlainSubject(model), meta.name, [task])
    meta.build_s = sum(seconds)
    meta.router_train_s = sum(seconds) / len(seconds) if seconds else None
    run.record(meta, results, mem)


def prompted(task: Any, shots: Sequence[Any], sep: str = " ") -> Any:
    """``task`` with ``shots`` (examples) prepended to every eval example's text, joined by ``sep``; the targets
    and routing spans move with the text (the prompt itself is neither scored nor labelled)."""
    from moerge.bench.suites.format import Example, RoutingSpan

    prefix = "".join(ex.text + sep for ex in shots)
    n = len(prefix)
    examples = [
        Example(text=prefix + ex.text, targets=[(s + n, e + n) for s, e in ex.targets],
                routing=[RoutingSpan(start=r.start + n, end=r.end + n, experts=r.experts) for r in ex.routing])
        for ex in task.eval
    ]  # fmt: skip
    return task.model_copy(update={"eval": examples})


@baseline("few_shot_prompt")
def run_few_shot_prompt(run: BenchRun) -> None:
    """The base model with the task's few-shot examples prepended to every prompt (in-context learning), where
    the prompted examples fit the base model's context (``max_position_embeddings``); not applicable elsewhere."""
    from moerge.bench.evaluate import mode_label

    k = run.config.few_shot
    meta = MethodResult(
        name="few_shot_prompt", kind="baseline", user_data=mode_label("few-shot", run.config),
        expert_flops_per_token=0.0, router_train_s=0.0, trainable_parameters=0,
        description=f"the base model with the task's {k} target examples prepended to each input (in-context)",
    )  # fmt: skip
    if _target_skip(run, meta):
        return
    limit = getattr(getattr(run.model, "config", None), "max_position_embeddings", None)
    results: list[TaskResult] = []
    with peak_memory(run.config.device) as mem:
        for task in run.tasks_for():
            shots = task.target_examples()[:k]
            if not shots:
                results += run.skipped(
                    meta.name, [task], "not_applicable", f"task {task.name!r} has no target data"
                )
                continue
            copy = prompted(task, shots)
            longest = max(len(run.tokenizer(ex.text, add_special_tokens=False)["input_ids"]) + 1
                          for ex in copy.eval[: run.config.limit])  # fmt: skip
            if limit is not None and longest > limit:
                results += run.skipped(
                    meta.name, [task], "not_applicable",
                    f"the few-shot prompt of {task.name} is longer than the base model's context "
                    "(max_position_embeddings)",
                )  # fmt: skip
                continue
            results += evaluate(run, PlainSubject(run.model), meta.name, [copy])
    run.record(meta, results, mem)
