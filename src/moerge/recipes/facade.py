"""`attach`: a library's experts put into a model (in place) and routed by a recipe — the facade over
`moerge.model` (injection, the routed model) and the recipe registry. `prepare_signatures` computes what a
recipe needs from the experts' data.

    routed = moerge.attach(model, library, "arrow", k=2)
    out = routed(input_ids=ids)
    model = moerge.detach(routed)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from moerge.errors import MoergeError
from moerge.experts.expert import Expert
from moerge.model.routed import MoErgedModel, detach, inject
from moerge.recipes.recipe import BuildContext, Recipe, Routing, Rows
from moerge.recipes.registry import get_recipe
from moerge.routing.call import CallOwner
from moerge.routing.router import Router

__all__ = ["attach", "detach", "prepare_signatures", "resolve_experts"]


def resolve_experts(library_or_experts: Any, names: Sequence[str] | None = None) -> tuple[list[Expert], Any]:
    """``(experts, library or None)`` from an `ExpertLibrary`, a library path, or a list of `Expert`."""
    from moerge.experts.library import ExpertLibrary

    if isinstance(library_or_experts, (str, bytes)) or hasattr(library_or_experts, "__fspath__"):
        library_or_experts = ExpertLibrary.open(library_or_experts)
    if isinstance(library_or_experts, ExpertLibrary):
        lib = library_or_experts
        chosen = list(names) if names is not None else lib.names(kind="lora")
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
    **options: Any,
) -> MoErgedModel:
    """Attach a library's experts to ``model`` (in place) and route among them with ``recipe``.

    ``library_or_experts``: an `ExpertLibrary`, its path, or a list of `Expert`. ``recipe``: a recipe name
    (``moerge recipes`` lists them) or `Recipe`; ``options`` are that recipe's options (e.g. ``k=2``,
    ``aggregation="factor"``), validated by the recipe. ``experts`` restricts to named experts;
    ``target_modules`` to some modules (PEFT's forms: names or suffixes, or a regex string). ``router``
    bypasses the recipe with a ready `Router` (its only option is ``aggregation``). ``tokenizer``/``embedder``
    serve routers that embed inputs; embedders are made only for recipes that use one. Raises
    `RecipeNotApplicableError` when the recipe cannot run on this library (e.g. missing signatures).
    """
    expert_list, library = resolve_experts(library_or_experts, experts)
    ctx = BuildContext(
        model=model, experts=expert_list, library=library, tokenizer=tokenizer, embedder=embedder,
        embedders=embedders if embedders is not None else {},
    )  # fmt: skip
    if router is not None:
        routing = _custom_routing(router, options)
        rec, opts = None, None
    else:
        rec = get_recipe(recipe)
        opts = rec.parse_options(options)
        rec.check_applicable(ctx, options=opts)
        if rec.builder is None:  # the base recipe: no expert layers
            return MoErgedModel(model, {}, ctx.names, None, "output", CallOwner(), rec, opts, tokenizer)
    layers, owner = inject(model, expert_list, target_modules)
    ctx.modules = list(layers)
    if rec is not None:
        try:
            routing = rec.build(ctx, opts)
        except BaseException:
            detach(MoErgedModel(model, layers, ctx.names, None, "output", owner))
            raise
    return MoErgedModel(
        model, layers, ctx.names, routing.router, routing.aggregation, owner, rec, opts, tokenizer
    )


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
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> list[str]:
    """Compute, into ``library``, every signature ``recipe`` needs and its experts lack, from each expert's
    data (``{expert: training rows}``: ``{"prompt", "completion"}`` or ``{"text"}``). Experts without data are
    left without (the recipe then reports them). ``experts``: names in the library, or `Expert` objects already
    loaded from it (default: every LoRA expert). Returns one line per signature computed."""
    rec = get_recipe(recipe)
    opts = rec.parse_options(options)
    if experts is not None and all(isinstance(e, Expert) for e in experts):
        expert_list = list(experts)
    else:
        expert_list, _ = resolve_experts(library, experts)
    ctx = BuildContext(
        model=model, experts=expert_list, library=library, tokenizer=tokenizer, embedder=embedder,
        embedders=embedders if embedders is not None else {}, progress=progress,
    )  # fmt: skip
    done = []
    for sig, missing in rec.missing_signatures(ctx, opts):
        have = {n: data[n][: sig.max_rows] for n in missing if data.get(n)}
        if not have:
            continue
        ctx.describe(f"computing {sig.kind} for {len(have)} experts")
        sig.compute(ctx, opts, have)
        done.append(f"computed {sig.kind} for {len(have)} experts from their training data")
    return done
