"""`attach`: a library's experts put into a model (in place) and routed by a recipe — the facade over
`moerge.model` (injection, the routed model) and the recipe registry. `prepare_signatures` computes what a
recipe needs from the experts' data.

    routed = moerge.attach(model, library, "arrow", k=2)
    out = routed(input_ids=ids)
    model = moerge.detach(routed)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from moerge.errors import ExpertNotFoundError, MoergeError, RecipeNotApplicableError
from moerge.experts.expert import Expert
from moerge.experts.library import ExpertRef
from moerge.model.routed import MoErgedModel, PagingConfig, Unrouted, detach, inject, inject_paged
from moerge.recipes.progress import SignatureProgress, as_progress
from moerge.recipes.recipe import BuildContext, BuiltModel, Recipe, Routing, Rows, TargetData
from moerge.recipes.registry import get_recipe
from moerge.routing.call import CallOwner
from moerge.routing.router import Router

__all__ = ["PagingConfig", "attach", "detach", "prepare_signatures", "resolve_experts"]


def resolve_experts(
    library_or_experts: Any, names: Sequence[str] | None = None, *, paging: PagingConfig | None = None
) -> tuple[list[Any], Any]:
    """``(experts, library or None)`` from an `ExpertLibrary` (or an `ArtifactOverlay` over one), a library
    path, or a list of `Expert`; ``names`` picks a subset, in that order. Where ``paging`` pages these experts
    (a local library, enough experts), they come as `moerge.experts.library.ExpertRef` (weights not loaded)."""
    from moerge.experts.artifacts import ArtifactOverlay
    from moerge.experts.library import ExpertLibrary

    if isinstance(library_or_experts, (str, bytes)) or hasattr(library_or_experts, "__fspath__"):
        library_or_experts = ExpertLibrary.open(library_or_experts)
    if isinstance(library_or_experts, (ExpertLibrary, ArtifactOverlay)):
        lib = library_or_experts
        chosen = list(names) if names is not None else lib.names(kind="lora")
        absent = [n for n in chosen if n not in lib]
        if absent:
            held = ", ".join(lib.names()) or "none"
            raise ExpertNotFoundError(
                f"library {lib.url} has no expert {', '.join(map(repr, absent))} (it holds: {held}); "
                "check the names given to experts= / --experts"
            )
        if paging is not None and paging.pages(len(chosen), lib.storage.local_path("") is not None):
            return lib.refs(chosen), lib
        return [lib.get(n) for n in chosen], lib
    experts = list(library_or_experts)
    if names is not None:
        by = {e.name: e for e in experts}
        missing = [n for n in names if n not in by]
        if missing:
            raise MoergeError(f"experts {missing} are not among the given experts ({sorted(by)})")
        experts = [by[n] for n in names]
    return experts, None


def attach(
    model: Any,
    library_or_experts: Any,
    recipe: str | Recipe = "uniform",
    *,
    experts: Sequence[str] | None = None,
    target_modules: str | Sequence[str] | None = None,
    router: Router | None = None,
    tokenizer: Any = None,
    embedder: Any = None,
    embedders: dict[str, Any] | None = None,
    target: TargetData | None = None,
    unrouted: Unrouted = "refuse",
    paging: PagingConfig | None = None,
    **options: Any,
) -> MoErgedModel:
    """Attach a library's experts to ``model`` (in place) and route among them with ``recipe``.

    ``library_or_experts``: an `ExpertLibrary`, its path, or a list of `Expert`. ``recipe``: a recipe name
    (``moerge recipes`` lists them) or `Recipe`; ``options`` are that recipe's options (e.g. ``k=2``,
    ``aggregation="factor"``), validated by the recipe. ``experts`` restricts to named experts;
    ``target_modules`` to some modules (PEFT's forms: names or suffixes, or a regex string). ``router``
    bypasses the recipe with a ready `Router` (its only option is ``aggregation``). ``tokenizer``/``embedder``
    serve routers that embed inputs; embedders are made only for recipes that use one. ``target`` is the
    target task's data for recipes that learn from it (`TargetData`). Raises
    `RecipeNotApplicableError` when the recipe cannot run on this library (e.g. missing signatures).
    ``unrouted``: what to do with dense experts' updates that no expert layer routes (norms, embeddings):
    ``"refuse"`` or ``"average"`` (added statically, undone by ``detach``; `moerge.model.routed.inject`).
    ``paging`` (`PagingConfig`; default: automatic from 2,048 experts of a local library) keeps the experts'
    factors on disk — memory-mapped stacked factors written once as library artifacts — and reads per call
    only the experts routed to (docs/scaling.md).
    """
    paging = paging if paging is not None else PagingConfig()
    expert_list, library = resolve_experts(library_or_experts, experts, paging=paging)
    paged = bool(expert_list) and isinstance(expert_list[0], ExpertRef)
    ctx = BuildContext(
        model=model, experts=expert_list, library=library, tokenizer=tokenizer, embedder=embedder,
        embedders=embedders if embedders is not None else {}, target=target,
    )  # fmt: skip
    if router is not None:
        routing = _custom_routing(router, options)
        rec, opts = None, None
    else:
        rec = get_recipe(recipe)
        rec.refuse_models()
        opts = rec.parse_options(options)
        # the user-data check against the data given; without any, a recipe that needs it says how to pass it
        # (`BuildContext.require_target`) when its builder asks
        rec.check_applicable(ctx, user_data=target.mode if target is not None else "full", options=opts)
        if rec.model_builder is not None:
            raise RecipeNotApplicableError(
                f"recipe {rec.name!r} builds a whole model rather than routing the experts attached to yours: "
                f"use moerge.recipes.build_model(model, library, {rec.name!r}, ...)"
            )
        if rec.builder is None:  # the base recipe: no expert layers
            return MoErgedModel(model, {}, ctx.names, None, "output", CallOwner(), rec, opts, tokenizer)
    if paged:
        if any(getattr(e, "kind", "lora") == "dense" for e in expert_list):
            raise RecipeNotApplicableError(
                "paged expert factors hold LoRA experts only; attach dense experts with paging=PagingConfig(mode='off')"
            )
        from moerge.experts.stacked import ensure_stacked_factors

        factors = ensure_stacked_factors(getattr(library, "library", library), ctx.names)
        layers, owner = inject_paged(model, factors, target_modules, paging.cache_experts)
    else:
        layers, owner = inject(model, expert_list, target_modules, unrouted=unrouted)
    ctx.modules = list(layers)
    if rec is not None:
        try:
            routing = rec.build(ctx, opts)
            if routing.aggregation == "factor" and any(e.kind == "dense" for e in expert_list):
                raise RecipeNotApplicableError(
                    f"recipe {rec.name!r} mixes LoRA factors (factor aggregation), and dense experts (full "
                    "fine-tunes' ΔW) have none; extract LoRA experts from them (moerge library extract) to run it"
                )
        except BaseException:
            detach(MoErgedModel(model, layers, ctx.names, None, "output", owner))
            raise
    return MoErgedModel(
        model, layers, ctx.names, routing.router, routing.aggregation, owner, rec, opts, tokenizer
    )


def build_model(
    model: Any,
    library_or_experts: Any,
    recipe: str | Recipe,
    *,
    experts: Sequence[str] | None = None,
    tokenizer: Any = None,
    embedder: Any = None,
    embedders: dict[str, Any] | None = None,
    target: TargetData | None = None,
    **options: Any,
) -> BuiltModel:
    """Build the whole model a model-building recipe makes from ``model`` (left unchanged) and the experts
    (WEMoE, Branch-Train-MiX, Twin-Merging …: `Recipe.model_builder`). Arguments as in `attach`."""
    expert_list, library = resolve_experts(library_or_experts, experts)
    ctx = BuildContext(
        model=model, experts=expert_list, library=library, tokenizer=tokenizer, embedder=embedder,
        embedders=embedders if embedders is not None else {}, target=target,
    )  # fmt: skip
    rec = get_recipe(recipe)
    if rec.model_builder is None:
        raise RecipeNotApplicableError(
            f"recipe {rec.name!r} routes the experts attached to a model: use moerge.recipes.attach(model, "
            f"library, {rec.name!r}, ...)"
        )
    opts = rec.parse_options(options)
    rec.check_applicable(ctx, user_data=target.mode if target is not None else "full", options=opts)
    ctx.recipe = rec.name
    return rec.model_builder(ctx, opts)


@dataclass(frozen=True)
class _SignatureJob:
    recipe: str
    options: dict[str, Any]
    kind: str
    library: str
    expert: str
    rows: list[dict[str, str]]


def _compute_signature(job: _SignatureJob, shared: tuple[Any, Any]) -> str:
    """One expert's signature in an executor's worker (module-level: it is pickled); stored in the library."""
    from moerge.experts.library import ExpertLibrary

    portable, tokenizer = shared
    model = portable.load() if portable is not None else None
    rec = get_recipe(job.recipe)
    opts = rec.parse_options(job.options)
    library = ExpertLibrary.open(job.library)
    sig = next(s for s in rec.signatures if s.kind == job.kind)
    ctx = BuildContext(model=model, experts=[library.get(job.expert)], library=library, tokenizer=tokenizer,
                       recipe=rec.name)  # fmt: skip
    sig.compute(ctx, opts, {job.expert: job.rows})
    return job.expert


def _compute_elsewhere(executor, rec, opts, model, tokenizer, library, todo, bar, done) -> list:
    """The per-expert signatures of ``todo`` as executor tasks; returns what is left to compute here."""
    from moerge.backbones.loading import PortableModel
    from moerge.executor import get_executor

    url = getattr(library, "url", None)
    if url is None or type(library).__name__ != "ExpertLibrary":
        raise MoergeError(
            "computing signatures on another executor needs an ExpertLibrary (opened from its folder or URL), "
            "which the workers open themselves"
        )
    jobs = [
        _SignatureJob(rec.name, opts.model_dump(), sig.kind, url, name, list(rows))
        for sig, have in todo if sig.scope == "expert" for name, rows in have.items()
    ]  # fmt: skip
    if jobs:
        bar.start(f"{len(jobs)} signatures on {executor}")
        get_executor(executor).map(_compute_signature, jobs, shared=(PortableModel(model) if model is not None else None, tokenizer),
                                   on_done=lambda i, r: bar.steps(i + 1, len(jobs)))  # fmt: skip
        bar.finish()
    for sig, have in todo:
        if sig.scope == "expert":
            source = "their training data" if sig.needs_data else "their weights"
            done.append(f"computed {sig.kind} for {len(have)} experts from {source} ({executor})")
    return [(s, h) for s, h in todo if s.scope == "library"]


def _custom_routing(router: Router, options: dict[str, Any]) -> Routing:
    aggregation = options.pop("aggregation", "output")
    if options:
        raise MoergeError(
            f"attach(router=...) takes no recipe options (got {', '.join(sorted(options))}); only aggregation"
        )
    if aggregation not in ("output", "parameter", "factor"):
        raise MoergeError(f"aggregation {aggregation!r} is not one of output, parameter, factor")
    return Routing(router, aggregation)


def prepare_signatures(
    recipe: str | Recipe,
    model: Any,
    tokenizer: Any,
    library: Any,
    data: dict[str, Rows],
    *,
    experts: Sequence[str] | Sequence[Expert] | None = None,
    embedder: Any = None,
    embedders: dict[str, Any] | None = None,
    progress: SignatureProgress | Callable[[str], None] | None = None,
    weights: bool = True,
    executor: str = "local",
    **options: Any,
) -> list[str]:
    """Compute, into ``library``, every signature ``recipe`` needs and its experts lack, from each expert's
    data (``{expert: training rows}``: ``{"prompt", "completion"}`` or ``{"text"}``). Experts without data are
    left without (the recipe then reports them). ``experts``: names in the library, or `Expert` objects already
    loaded from it (default: every LoRA expert). ``weights``: also compute the signatures made from the weights
    alone (Arrow prototypes; otherwise made when the recipe is attached). Each signature is computed one
    expert at a time, reported to ``progress`` (a `SignatureProgress`, or a ``describe(text)`` callable).
    ``executor="ray"`` computes the per-expert signatures as Ray tasks, each storing its artifact in the library
    (given by its URL, so a worker can open it; library-level ones are computed here). Returns one line per
    signature computed."""
    rec = get_recipe(recipe)
    opts = rec.parse_options(options)
    if experts is not None and all(isinstance(e, Expert) for e in experts):
        expert_list = list(experts)
    else:
        expert_list, _ = resolve_experts(library, experts)
    bar = as_progress(progress)
    ctx = BuildContext(
        model=model, experts=expert_list, library=library, tokenizer=tokenizer, embedder=embedder,
        embedders=embedders if embedders is not None else {}, progress=bar.describe, steps=bar.steps,
        recipe=rec.name,
    )  # fmt: skip
    todo = []
    for sig, missing in rec.missing_signatures(ctx, opts, weights=weights):
        rows = {n: data.get(n, [])[: sig.max_rows] if sig.needs_data else [] for n in missing}
        have = {n: r for n, r in rows.items() if r or not sig.needs_data}
        if have:
            todo.append((sig, have))
    # a library-scope signature is computed once from every expert's data, and only when all have some
    todo = [(s, h) for s, h in todo if s.scope == "expert" or len(h) == len(ctx.names)]
    bar.add(sum(len(have) if sig.scope == "expert" else 1 for sig, have in todo))
    done = []
    if executor != "local":
        todo = _compute_elsewhere(executor, rec, opts, model, tokenizer, library, todo, bar, done)
    for sig, have in todo:
        if sig.scope == "library":
            bar.start(f"{sig.kind} · {len(have)} experts")
            sig.compute(ctx, opts, have)
            bar.finish()
            done.append(f"computed {sig.kind} for the {len(have)} experts from their training data")
            continue
        for name, rows in have.items():
            bar.start(f"{sig.kind} · {name}")
            sig.compute(ctx, opts, {name: rows})
            bar.finish()
        source = "their training data" if sig.needs_data else "their weights"
        done.append(f"computed {sig.kind} for {len(have)} experts from {source}")
    return done
