"""The benchmark runner: a suite, its expert library and a list of recipes → one table of who wins, at what cost.

    from moerge.bench.runner import BenchConfig, run_bench
    results = run_bench(suite, BenchConfig(recipes=["arrow", "arrow:granularity=example"]))
    results.summary()                      # one row per method: quality per split/condition, routing, cost

Every method goes the same way: build a model once (a recipe attached to the base model, or a merge folded into
its weights), then for each task and batch of eval examples run one teacher-forced forward pass (no grad) and
score the logits — exact match (every token of a target span is the argmax given the true prefix, which is
exactly whether greedy decoding reproduces the span) or negative log-likelihood per target token — and, for
routed models, the routing weights each layer gave each token (`moerge.bench.evaluate`). A new recipe needs no
change here: it is a recipe name plus options; the signatures it needs are computed through its own
`Signature.compute` (`moerge.bench.artifacts`).

Baselines (`moerge.bench.baselines`, a registry) always run unless deselected. A recipe that cannot run in a
setting (its taxonomy record rules out a held-out split, a user-data regime, or the library lacks the
signatures it needs) is reported as not applicable, with the reason.

Routing is judged against labels aligned with the *predicted* token: the weights at position ``t`` (which
produce the prediction of token ``t+1``) are compared with the label of token ``t+1``. Example-level routers
only see the unscored part of each example (the prompt and the inputs of every segment, never the answers);
examples whose every character is scored (perplexity texts) are routed on the whole text.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from moerge.bench.artifacts import prepare_artifacts
from moerge.bench.baselines import BASELINES, covered_recipes, get_baselines, selected_merges
from moerge.bench.config import (
    BenchConfig,
    MergeBaseline,
    MergeBaselineConfig,
    RecipeSpec,
    check_merge_baseline,
    parse_method,
)
from moerge.bench.evaluate import BenchRun, evaluate, mode_label, target_data, timed
from moerge.bench.metrics import peak_memory
from moerge.bench.results import BenchResults, MethodResult, TaskResult, normalize
from moerge.bench.subjects import BuiltSubject, RoutedSubject
from moerge.errors import LibraryError, MoergeError, RecipeNotApplicableError

__all__ = [
    "BenchConfig",
    "BenchResults",
    "MergeBaseline",
    "MergeBaselineConfig",
    "default_methods",
    "run_bench",
]

GENERALIZATION = {"held_in": "in-distribution", "held_out": "out-of-distribution"}
PREMISE_ROWS = 128  # training rows per expert for the premise diagnostics (≤ 2048 target tokens are kept)


def default_methods() -> list[RecipeSpec]:
    """Every registered recipe no baseline covers (pool recipes aside: they route among a pool's whole models),
    plus the variants each recipe declares (e.g. per-example routing for per-token recipes, so both are compared
    on the same experts)."""
    from moerge.recipes.registry import list_recipes

    covered = covered_recipes()
    out = []
    for r in list_recipes():
        if r.key in covered or r.kind in ("pool", "compose"):  # whole models: the pool suite / their own API
            continue
        out.append(RecipeSpec(r.name, r.key))
        for variant in r.variants():
            label = r.name + ":" + ",".join(f"{k}={v}" for k, v in variant.items())
            out.append(RecipeSpec(label, r.key, dict(variant)))
    return out


def check_methods(specs: Sequence[RecipeSpec]) -> None:
    """Refuse unknown recipes and bad options before anything runs."""
    from moerge.recipes.registry import get_recipe

    for spec in specs:
        rec = get_recipe(spec.recipe)
        rec.refuse_models()
        rec.parse_options(spec.options)


# ---------------------------------------------------------------------------------------------- recipes
def recipe_mode(rec: Any) -> str:
    """The user-data mode a recipe runs in: its taxonomy record's (``multiple`` counts as zero-shot: no data)."""
    mode = rec.taxonomy.user_data
    return mode if mode in ("few-shot", "full") else "zero-shot"


def run_recipe(run: BenchRun, spec: RecipeSpec) -> None:
    """Attach ``spec``'s recipe and evaluate every split its taxonomy record allows: once for every task when it
    is zero-shot, or once per task with that task's `TargetData` (few-shot / full, as its record declares),
    evaluated on that task only."""
    from moerge.recipes.facade import attach, build_model, detach
    from moerge.recipes.registry import get_recipe

    rec = get_recipe(spec.recipe)
    opts = rec.parse_options(spec.options)
    mode = recipe_mode(rec)
    meta = MethodResult(
        name=spec.label, kind="recipe", recipe=rec.name, options=opts.model_dump(), routed=True,
        taxonomy=rec.taxonomy_for(opts), description=rec.summary, user_data=mode_label(mode, run.config),

    )  # fmt: skip
    ctx = run.build_context()
    runnable: list[Any] = []
    results: list[TaskResult] = []
    if rec.kind == "pool":
        reason = (f"recipe {rec.name!r} routes each query to one whole model of a pool: run it on the pool suite "
                  "(moerge bench --suite pool)")  # fmt: skip
        run.record(meta, run.skipped(spec.label, list(run.suite.tasks), "not_applicable", reason), None)
        return
    for split in ("held_in", "held_out"):
        tasks = run.tasks_for(split)
        if not tasks:
            continue
        try:
            if mode not in run.config.user_data:
                raise RecipeNotApplicableError(
                    f"recipe {rec.name!r} needs {mode} target data, and this run serves "
                    f"{', '.join(run.config.user_data)} (add {mode} to user_data / --user-data)"
                )
            rec.check_applicable(ctx, user_data=mode, generalization=GENERALIZATION[split], options=opts)
            runnable += tasks
        except RecipeNotApplicableError as e:
            results += run.skipped(spec.label, tasks, "not_applicable", str(e))
    # zero-shot: one build for every task; few-shot / full: one build per task, with that task's data
    builds: list[tuple[list[Any], Any]] = []
    if mode == "zero-shot":
        builds = [(runnable, None)] if runnable else []
    else:
        for task in runnable:
            data = target_data(task, mode, run.config)
            if data is None:
                results += run.skipped(spec.label, [task], "not_applicable",
                                       f"task {task.name!r} has no target data (a `target` split) for {mode} use")  # fmt: skip
            else:
                builds.append(([task], data))
    make = build_model if rec.builds_model else attach
    # dense experts' norm / embedding updates (a full fine-tune with params="all") cannot be routed per module:
    # every routed method gets their mean statically (moerge.model.routed.inject); a no-op for LoRA experts
    extra: dict[str, Any] = {} if rec.builds_model else {"unrouted": "average"}
    train_s: list[float] = []
    with peak_memory(run.config.device) as mem:
        for tasks, data in builds:
            try:
                routed, build_s = timed(
                    lambda data=data, make=make: make(
                        run.model,
                        run.library,
                        rec,
                        experts=run.names,
                        tokenizer=run.tokenizer,
                        embedders=run.embedders,
                        target=data,
                        **extra,
                        **opts.model_dump(),
                    )  # fmt: skip
                )
            except RecipeNotApplicableError as e:
                results += run.skipped(spec.label, tasks, "not_applicable", str(e))
                continue
            except MoergeError as e:
                results += run.skipped(spec.label, tasks, "error", f"{type(e).__name__}: {e}")
                continue
            meta.build_s += build_s
            if rec.builds_model:  # a whole new model (WEMoE, BTX …): the base model was not touched
                subject: Any = BuiltSubject(routed)
                meta.expert_flops_per_token = subject.flops
                train_s.append(float(routed.train_seconds))
                meta.trainable_parameters = max(
                    meta.trainable_parameters or 0, int(routed.trainable_parameters)
                )
                results += evaluate(run, subject, spec.label, tasks)
                del routed, subject
                continue
            try:
                subject = RoutedSubject(routed)
                meta.expert_flops_per_token = subject.flops
                router = routed.router
                train_s.append(float(getattr(router, "train_seconds", 0.0) or 0.0))
                meta.trainable_parameters = max(
                    meta.trainable_parameters or 0, int(getattr(router, "trainable_parameters", 0) or 0)
                )
                results += evaluate(run, subject, spec.label, tasks)
            finally:
                detach(routed)
    if train_s:
        meta.router_train_s = sum(train_s) / len(train_s)
    order = {t.name: i for i, t in enumerate(run.suite.tasks)}
    results.sort(key=lambda r: order[r.task])
    if results and all(r.status != "ok" for r in results):
        meta.status, meta.reason = (
            results[0].status,
            "; ".join(dict.fromkeys(r.reason for r in results if r.reason)),
        )
    run.record(meta, results, mem)


def measure_run_premise(run: BenchRun, specs: Sequence[RecipeSpec]) -> Any:
    """Premise diagnostics of the run's experts on their training data in the suite, against the signatures of
    the per-token zero-shot recipes (with the options the run uses); None, with a note, where not measurable."""
    from moerge.bench.artifacts import expert_training_rows
    from moerge.bench.premise import measure_premise

    options = {}
    for spec in specs:
        options.setdefault(spec.recipe, spec.options)
    run.describe("premise diagnostics")
    data = {e.name: expert_training_rows(run.suite, e.name) for e in run.experts}
    try:
        return measure_premise(run.model, run.tokenizer, data, run.experts, run.library, max_rows=PREMISE_ROWS,
                               options=options)  # fmt: skip
    except MoergeError as e:
        run.notes.append(f"premise diagnostics not measured: {e}")
        return None


def run_recipes_elsewhere(
    run: BenchRun, specs: Sequence[RecipeSpec], *, given_model: Any, library_url: str
) -> None:
    """Each recipe as a task of ``run.config.executor`` (Ray): a worker runs `run_bench` for that recipe alone —
    no baselines, no premise, the artifacts this run prepared read from the same folder — and its method and
    task results join this run's (normalised here, with the baselines)."""
    from moerge.backbones.loading import PortableModel
    from moerge.executor import get_executor

    config = run.config
    folder = getattr(run.library, "folder", None)  # the overlay this run's artifacts went to
    worker_config = config.model_copy(
        update=dict(
            baselines=[], premise=False, prepare_artifacts=False, progress=False, executor="local",
            artifacts_dir=str(folder) if folder is not None else config.artifacts_dir,
        )
    )  # fmt: skip
    portable = PortableModel(given_model) if given_model is not None else None
    jobs = [
        _RecipeJob(run.suite, worker_config.model_copy(update={"recipes": [s.label]}), portable,
                   run.tokenizer if given_model is not None else None, library_url, run.names)
        for s in specs
    ]  # fmt: skip
    run.describe(f"{len(specs)} recipes on {config.executor}")
    parts = get_executor(config.executor).map(
        _run_recipe_job, jobs, on_done=lambda i, r: run.advance(len(run.suite.tasks))
    )
    for part in parts:
        run.methods += part.methods
        run.results += part.results
        run.notes += part.notes


@dataclass(frozen=True)
class _RecipeJob:
    suite: Any
    config: BenchConfig
    model: Any
    tokenizer: Any
    library: str
    experts: list[str]


def _run_recipe_job(job: _RecipeJob) -> BenchResults:
    """One recipe's `run_bench` in an executor's worker (module-level: it is pickled)."""
    from moerge.experts.library import ExpertLibrary

    model = job.model.load() if job.model is not None else None
    return run_bench(job.suite, job.config, model=model, tokenizer=job.tokenizer,
                     library=ExpertLibrary.open(job.library), experts=job.experts)  # fmt: skip


# ---------------------------------------------------------------------------------------------- entry point
def run_bench(
    suite: Any,
    config: BenchConfig | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    library: Any = None,
    baselines_library: Any = None,
    experts: Sequence[str] | None = None,
) -> BenchResults:
    """Run every baseline and recipe of ``config`` on ``suite`` and return the measurements.

    The base model, tokenizer and libraries default to the suite's own (``suite.load_base()``,
    ``suite.open_library()``, ``suite.baselines``); ``experts`` (or ``config.experts``) restricts the experts
    (default: the suite's expert list, which is also the order of its routing labels). Unknown recipes, bad
    recipe options and unknown baselines are refused before anything runs.

    The library is only read: routing artifacts the run computes go to ``config.artifacts_dir`` (default
    `moerge.experts.artifacts.default_artifacts_dir`), unless ``config.write_artifacts``.
    """
    import torch

    config = config or BenchConfig()
    t_start = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    specs = [parse_method(m) for m in config.recipes] if config.recipes is not None else default_methods()
    check_methods(specs)
    baselines = get_baselines(config.baselines, [m.label for m in config.merges.methods])
    given_model = model
    if model is None:
        model, tok = suite.load_base()
        tokenizer = tokenizer or tok
    if tokenizer is None:
        raise MoergeError("run_bench: pass the tokenizer along with a loaded model")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(config.device)
    if library is None and config.expert_library == "full":
        from moerge.bench.suites.build import build_full_library

        library = build_full_library(suite, config.full_finetune, progress=config.progress)
    if library is None:
        library = suite.open_library()
    if baselines_library is None and getattr(suite, "baselines", None):
        from moerge.experts.library import ExpertLibrary

        baselines_library = ExpertLibrary.open(suite.baselines)
    kind = "dense" if config.expert_library == "full" else "lora"
    names = list(experts or config.experts or suite.experts or library.names(kind=kind))
    absent = [n for n in names if n not in library]
    if absent:
        chosen = "were chosen" if experts or config.experts else f"are named by suite {suite.name!r}"
        raise LibraryError(
            f"experts {absent} {chosen}, but library {library.url} lacks them (it holds: "
            f"{', '.join(library.names()) or 'none'})"
        )
    expert_list = [library.get(n) for n in names]
    if any(b.name == "merges" for b in baselines):
        for m in selected_merges(config):
            check_merge_baseline(m, n_models=len(names))
    library_url = library.url
    if not config.write_artifacts:
        from moerge.experts.artifacts import ArtifactOverlay, default_artifacts_dir

        library = ArtifactOverlay(library, config.artifacts_dir or default_artifacts_dir(library))

    run = BenchRun(suite, config, model, tokenizer, library, expert_list, baselines_library)
    with _threads(config.threads), _progress(config.progress) as progress, _frozen_prefix(run) as prefix:
        n_tasks = len(suite.tasks)
        n_evals = sum(n_tasks * b.passes(run) for b in baselines) + n_tasks * len(specs)
        run.progress = progress
        if progress is not None:
            run.ptask = progress.add_task("benchmark", total=n_evals)
        if config.prepare_artifacts:
            done = prepare_artifacts(run, specs)
            run.notes += done
            if done and not config.write_artifacts:
                run.notes.append(
                    f"routing artifacts computed by this run are kept in {library.folder} (library "
                    f"{library.url} was not modified; write_artifacts / --write-artifacts stores them in it)"
                )
        premise = measure_run_premise(run, specs) if config.premise else None
        for b in baselines:
            run.describe(b.name)
            b.run(run)
        if config.executor == "local" or len(specs) < 2:
            for spec in specs:
                run.describe(spec.label)
                run_recipe(run, spec)
        else:
            run_recipes_elsewhere(run, specs, given_model=given_model, library_url=library_url)
        run.describe("done")
    if prefix is not None:
        run.notes.append(
            f"decoder layers 0–{prefix_start(run) - 1} ran once per distinct input row and were reused by every "
            f"method ({prefix.misses} rows computed, {prefix.hits} reused): every expert adapts only later layers"
        )
    normalize(run.results, config.min_oracle_gap)
    run.notes += [
        f"normalised quality is undefined on {t.name}: the oracle beats the base by less than "
        f"{config.min_oracle_gap.get(t.metric, 0)} ({t.metric}); raw scores are shown"
        for t in suite.tasks
        if t.experts
        and all(r.normalized is None for r in run.results if r.task == t.name and r.method == "oracle")
        and any(r.method == "oracle" and r.task == t.name and r.status == "ok" for r in run.results)
    ]
    for b in baselines:
        if b.finalize is not None:
            b.finalize(run)
    _order(run)
    return BenchResults(
        suite=suite.name,
        experts=names,
        tasks=[
            {
                "name": t.name,
                "split": t.split,
                "condition": t.condition,
                "metric": t.metric,
                "ceiling": t.ceiling,
                "experts": list(t.experts),
                "examples": len(t.eval[: config.limit] if config.limit else t.eval),
            }
            for t in suite.tasks
        ],  # fmt: skip
        methods=run.methods,
        results=run.results,
        config=config.model_dump(mode="json"),
        environment={
            "started": started,
            "suite_hash": suite_hash(suite),
            "moerge": _version("moerge"),
            "transformers": _version("transformers"),
            "torch": torch.__version__,
            "threads": config.threads or torch.get_num_threads(),
            "device": config.device,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        wall_s=time.perf_counter() - t_start,
        notes=run.notes,
        premise=premise.to_dict() if premise is not None else None,
    )


def suite_hash(suite: Any) -> str:
    """The first 16 hex digits of the SHA-256 of what a suite evaluates and trains on (its tasks, expert order and
    info; not where its files lie), so two runs' reports say whether they ran the same suite."""
    data = suite.model_dump_json(include={"name", "tasks", "experts", "info"})
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _order(run: BenchRun) -> None:
    """Methods in a fixed order: the baselines as listed (the merges in their configured order, a tuned merge
    before its untuned row), then recipes, then single experts (the sort is stable: recipes keep their order)."""
    rank = {n: (i, 0) for i, n in enumerate(BASELINES)}
    merges = rank.get("merges", (len(rank), 0))[0]
    rank.update({m.label: (merges, j) for j, m in enumerate(run.config.merges.methods)})
    kinds = {"baseline": 0, "recipe": 1, "single": 2}
    run.methods.sort(
        key=lambda m: (
            kinds[m.kind],
            rank.get(m.name.split(":")[0], (len(BASELINES), 0)),
            m.name if m.kind == "baseline" else "",
        )
    )


def prefix_start(run: BenchRun) -> int:
    """The lowest decoder layer any expert of the run adapts (the library's and the baselines'): 0 when one is
    dense, adapts a module outside the decoder layers, or the model has no layer list."""
    from moerge.train.prefix import first_layer

    experts = list(run.experts)
    if run.baselines_library is not None:
        experts += [run.baselines_library.get(n) for n in run.baselines_library.names()]
    if not experts or any(e.kind != "lora" for e in experts):
        return 0
    return first_layer(run.model, set().union(*(e.lora for e in experts))) or 0


def _frozen_prefix(run: BenchRun) -> Any:
    """`moerge.train.prefix.cached_prefix` over the layers no method changes (``BenchConfig.cache_prefix``)."""
    from moerge.train.prefix import cached_prefix

    return cached_prefix(run.model, prefix_start(run) if run.config.cache_prefix else 0)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from moerge.progress import shown, stderr_console

    if not shown():  # not a terminal: no bar (a log would get only its last state)
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr_console(), transient=False,
    ) as p:  # fmt: skip
        yield p
