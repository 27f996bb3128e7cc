"""`Recipe` and `Taxonomy`: a named routing method as data — its survey taxonomy record, its options, what it
needs from the library, and how it builds its router from parts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from moerge.errors import MalformedConfigError, MoergeError, RecipeNotApplicableError

AXES = (
    "training",
    "expert_data",
    "routing_data",
    "granularity",
    "depth",
    "selection",
    "aggregation",
    "generalization",
    "user_data",
)


class Taxonomy(BaseModel):
    """The survey's nine axes (see DESIGN.md and reference/moerging-methods.md §1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    training: Literal["standard", "custom", "multiple"]
    expert_data: Literal["private", "shared", "multiple"]
    routing_data: Literal["none", "expert", "target", "general", "multiple"]
    granularity: Literal["step", "example", "task", "n/a"]
    depth: Literal["module", "model", "n/a"]
    selection: Literal["sparse", "dense", "none"]
    aggregation: Literal["output", "parameter", "none", "multiple"]
    generalization: Literal["in-distribution", "out-of-distribution", "multiple"]
    user_data: Literal["zero-shot", "few-shot", "full", "multiple"]


@dataclass
class BuildContext:
    """What a recipe may use to build its router."""

    model: Any
    experts: list[Any]
    library: Any = None
    modules: list[str] = field(default_factory=list)
    tokenizer: Any = None
    embedder: Any = None


@dataclass(frozen=True)
class Requirement:
    """An artifact the recipe needs for every expert: ``kind`` under ``config`` (a function of the options
    and the embedder name), and the command/function that produces it."""

    kind: str
    config: Callable[[Any, str], dict[str, Any]]
    what: str
    how: str


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Recipe:
    """A named routing method: its taxonomy record plus how it builds a router (``build(ctx, options)``)."""

    name: str
    summary: str
    taxonomy: Taxonomy
    builder: Callable[[BuildContext, Any], Any] | None
    options: type[BaseModel] = NoOptions
    paper: str | None = None
    requires: tuple[Requirement, ...] = ()
    # True where the method cannot serve a held-out task at all (it routes by the task's own expert). The
    # taxonomy's `generalization` records what the paper evaluated, which is no reason to refuse a setting.
    held_in_only: bool = False
    needs_inputs: tuple[str, ...] = ()  # RoutingInputs fields each call must carry

    def parse_options(self, options: dict[str, Any] | BaseModel | None = None) -> BaseModel:
        if isinstance(options, self.options):
            return options
        try:
            return self.options(**(options or {}))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            known = ", ".join(self.options.model_fields) or "none"
            raise MalformedConfigError(
                f"recipe {self.name!r}: option {loc}: {err['msg']} (its options: {known})"
            ) from e

    def build(self, ctx: BuildContext, options: BaseModel) -> Any:
        if self.builder is None:
            raise MoergeError(f"recipe {self.name!r} needs no router")
        return self.builder(ctx, options)

    def check_applicable(
        self,
        library: Any,
        *,
        experts: list[Any] | None = None,
        user_data: str = "zero-shot",
        generalization: str | None = None,
        embedder_name: str = "base:mean",
        options: dict[str, Any] | BaseModel | None = None,
    ) -> None:
        """Raise `RecipeNotApplicableError` when the setting is one the taxonomy record rules out: a user-data
        mode the recipe cannot serve, a held-out run for an in-distribution-only method, or a library whose
        experts lack the data statistics (artifacts) the recipe needs."""
        t = self.taxonomy
        order = {"zero-shot": 0, "few-shot": 1, "full": 2}
        if t.user_data in order and user_data in order and order[t.user_data] > order[user_data]:
            raise RecipeNotApplicableError(
                f"recipe {self.name!r} needs {t.user_data} target data, but this run is {user_data}."
            )
        if generalization == "out-of-distribution" and self.held_in_only:
            raise RecipeNotApplicableError(
                f"recipe {self.name!r} only serves held-in tasks (it needs each task's own expert); "
                "use it on in-distribution splits."
            )
        if not self.requires:
            return
        opts = self.parse_options(options)
        names = [e.name for e in experts] if experts is not None else (library.names() if library else [])
        for req in self.requires:
            if library is None:
                raise RecipeNotApplicableError(
                    f"recipe {self.name!r} needs {req.what} stored in an expert library; attach a library "
                    f"(not a list of experts) after computing them with {req.how}."
                )
            cfg = req.config(opts, embedder_name)
            missing = [n for n in names if not library.has_artifact(req.kind, cfg, n)]
            if missing:
                shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
                raise RecipeNotApplicableError(
                    f"recipe {self.name!r} needs {req.what} for every expert, and {len(missing)} of {len(names)} "
                    f"have none ({shown}) in library {getattr(library, 'url', library)} under config {cfg}; "
                    f"compute them with {req.how}."
                )


_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    if recipe.name in _RECIPES:
        raise MoergeError(f"a recipe named {recipe.name!r} is already registered")
    _RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    from moerge.recipes import builtin  # noqa: F401  (registers the built-in recipes)

    key = name.replace("-", "_")
    if key not in _RECIPES:
        raise MoergeError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(_RECIPES))}")
    return _RECIPES[key]


def list_recipes() -> list[Recipe]:
    from moerge.recipes import builtin  # noqa: F401

    return [_RECIPES[k] for k in sorted(_RECIPES)]


def taxonomy_rows() -> list[dict[str, str]]:
    """The taxonomy table as rows (one per recipe): name, the nine axes, paper."""
    return [
        {"recipe": r.name, **r.taxonomy.model_dump(), "paper": r.paper or "baseline"} for r in list_recipes()
    ]
