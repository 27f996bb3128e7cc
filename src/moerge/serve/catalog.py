"""What a server serves: one base model with every expert's factors injected once, and a router per model
name built on those same layers (one model copy in memory whatever the number of recipes).

Model names: ``base`` (no expert), each expert's name (the ``single_expert`` recipe), each recipe with its
default options, and recipe variants ``recipe:key=value,...`` (e.g. ``arrow:k=2,granularity=example``),
built on first use and kept (the ``max_variants`` most recently used).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moerge.errors import MalformedConfigError, MoergeError, RecipeNotApplicableError, UnknownNameError
from moerge.model.routed import inject
from moerge.recipes.recipe import BuildContext, Recipe
from moerge.recipes.registry import get_recipe, list_recipes
from moerge.routing.call import Aggregation
from moerge.routing.router import Router

BASE = "base"


class ModelNotFoundError(UnknownNameError):
    """A request names a model the server does not serve (HTTP 404)."""


@dataclass(frozen=True)
class Route:
    """How one request is routed: the model name asked for, the recipe's router (None: the base model alone)
    and how the selected experts combine."""

    name: str
    router: Router | None
    aggregation: Aggregation = "output"


def parse_model_name(name: str) -> tuple[str, dict[str, Any]]:
    """``"arrow:k=2,granularity=example"`` → ``("arrow", {"k": 2, "granularity": "example"})`` (values read as
    YAML scalars, as ``-o KEY=VALUE`` is)."""
    import yaml

    head, _, rest = name.partition(":")
    options: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise MalformedConfigError(
                f"model {name!r}: {pair!r} is not key=value (write recipe:key=value,key=value)"
            )
        options[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return head.strip(), options


class Catalog:
    """The served model: ``model`` (its expert layers injected once), ``tokenizer``, the experts' names, and
    the routes by model name (`resolve`)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        library: Any,
        *,
        experts: Sequence[str] | None = None,
        recipes: dict[str, dict[str, Any]] | None = None,
        max_variants: int = 16,
    ):
        from moerge.recipes.facade import resolve_experts

        expert_list, lib = resolve_experts(library, experts)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.ctx = BuildContext(model=model, experts=expert_list, library=lib, tokenizer=tokenizer)
        if getattr(model, "moerge_base_fingerprint", None) is None:
            from moerge.experts.fingerprint import fingerprint_model

            # the base model's own key, taken before injection renames its parameters, so that base-model
            # embedders find the centroids `moerge library prepare` stored for it
            model.moerge_base_fingerprint = fingerprint_model(model)
        layers, self.owner = inject(model, expert_list)
        self.ctx.modules = list(layers)
        self.expert_names: list[str] = self.ctx.names
        self.num_experts = len(self.expert_names)
        self._lock = threading.Lock()
        self._built: OrderedDict[tuple[str, str], Route] = OrderedDict()
        self._max_variants = max_variants
        self.recipes: dict[str, tuple[Recipe, Any]] = {}  # served recipes with their default options
        self.skipped: dict[str, str] = {}  # recipe -> why it is not served
        chosen = recipes if recipes is not None else {r.name: {} for r in list_recipes()}
        for name, options in chosen.items():
            rec = get_recipe(name)
            if rec.composes == "models":  # Co-LLM, CALM: two whole models, not this model's experts
                if recipes is not None:
                    rec.refuse_models()
                self.skipped[rec.name] = f"composes two whole models (run it with {rec.entry})"
                continue
            if rec.builder is None:
                continue  # the base recipe: served as "base"
            try:
                opts = rec.parse_options(options)
            except MalformedConfigError as err:
                if recipes is not None:
                    raise
                self.skipped[rec.name] = str(err)  # e.g. single_expert: served by each expert's name
                continue
            why = self._why_not(rec, opts)
            if why is None:
                self.recipes[rec.name] = (rec, opts)
            elif recipes is not None:  # asked for by name: refuse rather than leave it out
                raise RecipeNotApplicableError(f"recipe {rec.name!r} cannot be served: {why}")
            else:
                self.skipped[rec.name] = why

    @classmethod
    def load(cls, base_model: str, library: Any, **kwargs: Any) -> Catalog:
        """Load the base model (a transformers folder, .gguf or hub id) and attach ``library``'s experts."""
        from moerge.backbones.loading import load_base_model

        model, tokenizer = load_base_model(base_model, fingerprint=False)
        return cls(model, tokenizer, library, **kwargs)

    def _why_not(self, rec: Recipe, opts: Any) -> str | None:
        if rec.needs_inputs:
            return f"its router needs {', '.join(rec.needs_inputs)} with every call"
        try:
            rec.check_applicable(self.ctx, options=opts)
        except MoergeError as err:
            return str(err)
        return None

    # ------------------------------------------------------------------ names
    def names(self) -> list[str]:
        """Every model name served: base, the experts, the recipes (variants are built on request)."""
        return [BASE, *self.expert_names, *self.recipes]

    def resolve(self, name: str, routing: dict[str, Any] | None = None) -> Route:
        """The route for model ``name`` with the request's recipe options ``routing`` (over the name's own).
        Raises `ModelNotFoundError` for a name not served, `MalformedConfigError` for a bad option."""
        if name == BASE and not routing:
            return Route(BASE, None)
        if name in self.expert_names:
            if routing:
                raise MalformedConfigError(f"model {name!r} is one expert: it takes no routing options")
            return self._route(name, "single_expert", {"expert": name})
        head, options = parse_model_name(name)
        if head not in self.recipes:
            raise ModelNotFoundError(
                f"model {name!r} is not served; GET /v1/models lists the names (base, the experts, the "
                f"recipes{', and recipe:key=value variants' if self.recipes else ''})"
            )
        rec, defaults = self.recipes[head]
        merged = {**defaults.model_dump(exclude_unset=True), **options, **(routing or {})}
        return self._route(name, head, merged)

    def _route(self, name: str, recipe: str, options: dict[str, Any]) -> Route:
        rec = get_recipe(recipe)
        opts = rec.parse_options(options)  # MalformedConfigError names an unknown or invalid option
        key = (rec.name, opts.model_dump_json())
        with self._lock:
            route = self._built.get(key)
            if route is None:
                why = self._why_not(rec, opts)
                if why is not None:
                    raise RecipeNotApplicableError(f"model {name!r}: {why}")
                routing = rec.build(self.ctx, opts)
                if routing.router.follows_forwards:  # e.g. Token-Level Adaptation
                    raise RecipeNotApplicableError(
                        f"model {name!r}: recipe {rec.name!r} re-decides its experts as the text grows, "
                        "recomputing every token without a KV cache, which batched serving does not do; use "
                        "`moerge generate` for it"
                    )
                route = Route(name, routing.router, routing.aggregation)
                self._built[key] = route
                while len(self._built) > self._max_variants + len(self.recipes) + self.num_experts:
                    self._built.popitem(last=False)
            self._built.move_to_end(key)
            return route
