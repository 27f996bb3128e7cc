"""`Recipe`: a named routing method as data — its survey taxonomy record, its options, the per-expert
signatures it needs (each with the function that computes it) and the builder of its router.

A recipe file defines one or more `Recipe` objects in a module-level ``RECIPES`` list (built-ins) or anywhere
at module level (plugins); `moerge.recipes.registry` collects them. The benchmark runner,
`prepare_signatures` and ``moerge library prepare`` compute any missing signature through its
`Signature.compute`, without knowing its kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from moerge.errors import MalformedConfigError, RecipeNotApplicableError

if TYPE_CHECKING:
    import torch

    from moerge.routing.call import Aggregation
    from moerge.routing.router import Router

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


class RecipeOptions(BaseModel):
    """Base class of a recipe's options (unknown option names are refused)."""

    model_config = ConfigDict(extra="forbid")


# Training rows as `moerge train` reads them: {"prompt": …, "completion": …} or {"text": …}.
Rows = list[dict[str, str]]


@dataclass(frozen=True)
class TargetData:
    """The target task's own data, for recipes whose taxonomy record declares ``user_data`` few-shot or full
    (LoraHub, LoRA-Flow, AdapterFusion, AdapterSoup …). ``rows`` are labelled training rows in `Rows` form;
    ``validation`` optional rows for early stopping; never the task's evaluation examples (the benchmark
    draws both from the task's own training split). ``texts`` are the inputs alone (unlabelled use)."""

    task: str
    mode: Literal["few-shot", "full"]
    rows: tuple[dict[str, str], ...]
    validation: tuple[dict[str, str], ...] = ()

    @property
    def texts(self) -> list[str]:
        return [r.get("prompt", r.get("text", "")) for r in self.rows]


@dataclass
class BuildContext:
    """What a recipe may use to build its router or compute its signatures: the base model (with or without
    expert layers), the experts (in routing order), the library holding their artifacts, the adapted modules,
    the tokenizer, and embedders resolved on first use (``embedder`` overrides every choice). ``progress``
    takes a line of text, ``steps`` the inner steps of a long computation (``report_steps``); ``recipe``
    names the recipe being built (for its error messages); ``target`` the target task's data for recipes
    that learn from it."""

    model: Any
    experts: list[Any]
    library: Any = None
    modules: list[str] = field(default_factory=list)
    tokenizer: Any = None
    embedder: Any = None
    embedders: dict[str, Any] = field(
        default_factory=dict
    )  # cache per choice, may be shared between contexts
    progress: Callable[[str], None] | None = None
    steps: Callable[[int, int], None] | None = None
    recipe: str | None = None
    target: TargetData | None = None  # the target task's data (learned routers); None in zero-shot use

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def require_target(self) -> TargetData:
        """The target data, or a `RecipeNotApplicableError` saying how to pass it."""
        if self.target is None:
            raise RecipeNotApplicableError(
                f"recipe {self.recipe or 'RECIPE'!r} learns from the target task's data: pass "
                "attach(..., target=TargetData(task, mode, rows)) (or run it in `moerge bench`, which gives each "
                "recipe the data its taxonomy record declares)"
            )
        return self.target

    @property
    def device(self) -> Any:
        """The device of the base model's parameters (where a recipe puts what it builds)."""
        return next(self.model.parameters()).device

    def require_tokenizer(self) -> Any:
        """The tokenizer, or a `RecipeNotApplicableError` saying to pass it (recipes that train on text)."""
        if self.tokenizer is None:
            raise RecipeNotApplicableError(
                f"recipe {self.recipe or 'RECIPE'!r} trains on text: pass the tokenizer (attach(..., "
                "tokenizer=tok) / build_model(..., tokenizer=tok))"
            )
        return self.tokenizer

    def embedder_for(self, choice: str = "default") -> Any:
        """The sentence embedder an ``embedding_model`` option picks (made once per choice)."""
        if self.embedder is not None:
            return self.embedder
        if choice not in self.embedders:
            from moerge.routing.embedding import default_embedder

            self.embedders[choice] = default_embedder(self.model, self.tokenizer, choice=choice)  # type: ignore[arg-type]
        return self.embedders[choice]

    def describe(self, text: str) -> None:
        if self.progress is not None:
            self.progress(text)

    def report_steps(self, done: int, total: int) -> None:
        """``done`` of ``total`` steps of the signature being computed are done (e.g. gate training)."""
        if self.steps is not None:
            self.steps(done, total)

    def load_library(
        self, signature: Signature, options: BaseModel
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A library-scope signature's one artifact for these experts (tensors and recorded info), which
        must have been prepared from the experts' data."""
        config = signature.config(options, self)
        got = self.library.get_artifact(signature.kind, config, None) if self.library is not None else None
        if got is None:
            raise RecipeNotApplicableError(
                missing_message(self.recipe, signature, self.names, self.names, self.library, options, config)
            )
        return got

    def load(self, signature: Signature, options: BaseModel) -> list[dict[str, torch.Tensor]]:
        """Each expert's ``signature`` tensors (rows follow ``experts``). Signatures computed from the weights
        alone are computed and stored where missing; data signatures must have been prepared."""
        config = signature.config(options, self)
        missing = [e.name for e in self.experts if not _has(self.library, signature.kind, config, e.name)]
        computed: dict[str, dict[str, torch.Tensor]] = {}
        if missing and not signature.needs_data:
            computed = signature.compute(self, options, {n: [] for n in missing}) or {}
        lacking = [n for n in missing if n not in computed]
        if lacking:
            raise RecipeNotApplicableError(
                missing_message(self.recipe, signature, lacking, self.names, self.library, options, config)
            )
        out = []
        for e in self.experts:
            got = self.library.get_artifact(signature.kind, config, e.name) if e.name not in missing else None
            tensors = got[0] if got is not None else computed.get(e.name)
            if tensors is None:
                raise RecipeNotApplicableError(
                    missing_message(
                        self.recipe, signature, [e.name], self.names, self.library, options, config
                    )
                )
            out.append(tensors)
        return out


def _has(library: Any, kind: str, config: dict[str, Any], name: str) -> bool:
    return library is not None and library.has_artifact(kind, config, name)


def lacking(library: Any, signature: Signature, config: dict[str, Any], names: Sequence[str]) -> list[str]:
    """The experts of ``names`` that lack ``signature`` under ``config``: for a library-scope signature (one
    artifact for the expert set) all of them or none."""
    if signature.scope == "library":
        return [] if _has(library, signature.kind, config, None) else list(names)  # type: ignore[arg-type]
    return [n for n in names if not _has(library, signature.kind, config, n)]


def missing_message(
    recipe: str | None, signature: Signature, missing: Sequence[str], names: Sequence[str], library: Any,
    options: BaseModel | None = None, config: dict[str, Any] | None = None,
) -> str:  # fmt: skip
    """One line: which routed experts lack ``signature``, and the ``moerge library prepare`` command (with the
    recipe's non-default options) that computes it — or the subset of experts that could be routed instead."""
    where = getattr(library, "url", library)
    shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
    name = recipe or "RECIPE"
    opts = options.model_dump(exclude_defaults=True) if options is not None else {}
    command = " ".join(
        [f"moerge library prepare {where} --recipe {name}"]
        + [f"-o {k}={v}" for k, v in opts.items()]
        + ([f"--data {n}=FILE.jsonl" for n in missing[:3]] + (["…"] if len(missing) > 3 else [])
           if signature.needs_data else [])
    )  # fmt: skip
    have = [n for n in names if n not in missing]
    subset = f", or route over the experts that have them (--experts {','.join(have)})" if have else ""
    return (
        f"recipe {name!r} needs {signature.what} ({signature.kind}) for every routed expert, and {len(missing)} "
        f"of {len(names)} have none ({shown}) in library {where}{f' under config {config}' if config else ''}; compute them with `{command}`{subset} "
        f"(Python: {signature.how})"
    )


SignatureCompute = Callable[[BuildContext, Any, dict[str, Rows]], "dict[str, dict[str, torch.Tensor]] | None"]


@dataclass(frozen=True)
class Signature:
    """A per-expert artifact a recipe needs (routing prototypes, gates, centroids …), stored in the library.

    ``config(options, ctx)`` is everything that changes its value (the artifact's cache key); ``compute(ctx,
    options, data)`` computes it for the experts named in ``data`` (``{expert: training rows}``, empty lists
    for ``needs_data=False``), stores it in ``ctx.library`` when there is one, and returns it. ``how`` tells a
    user how to compute it outside the benchmark."""

    kind: str
    what: str
    compute: SignatureCompute
    config: Callable[[Any, BuildContext], dict[str, Any]] = lambda options, ctx: {}
    needs_data: bool = True
    max_rows: int | None = None  # training rows per expert it is computed from (None: all the expert saw)
    how: str = "moerge.recipes.prepare_signatures(recipe, model, tokenizer, library, data)"
    # whether the recipe needs it under these options (e.g. only one scoring method of several reads it)
    needed: Callable[[Any], bool] = lambda options: True
    # "expert": one artifact per expert; "library": one artifact for the whole expert set (a router trained
    # jointly on every expert's data), computed once from all their data (config must name the expert set)
    scope: Literal["expert", "library"] = "expert"


@dataclass(frozen=True)
class Routing:
    """What a builder returns: the router and how the selected experts are combined."""

    router: Router
    aggregation: Aggregation = "output"


@dataclass
class BuiltModel:
    """What a model-building recipe returns (``Recipe.model_builder``): a whole model evaluated as it is —
    methods that rewrite the model rather than route among injected expert layers (WEMoE's weight-ensembling
    MLPs, Branch-Train-MiX's MoE, Twin-Merging's shared model plus exclusive experts).

    ``model`` is a new module (the builder never changes ``ctx.model``); ``logits(input_ids, attention_mask,
    routing_mask)`` runs it, where ``routing_mask`` marks the tokens a per-example router may look at (the prompt,
    never the answer being scored; ``None``: all of ``attention_mask``). The default ignores ``routing_mask`` —
    right for models that route per token causally. ``train_seconds`` / ``trainable_parameters`` are the cost
    columns the benchmark reports; ``flops_per_token`` the multiply-adds per token beyond the base model's."""

    model: Any
    forward: Callable[[Any, Any, Any], Any] | None = None
    train_seconds: float = 0.0
    trainable_parameters: int = 0
    flops_per_token: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def logits(self, input_ids: Any, attention_mask: Any = None, routing_mask: Any = None) -> Any:
        if self.forward is not None:
            return self.forward(input_ids, attention_mask, routing_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


# Option values → the taxonomy axis value they mean (for `Recipe.taxonomy_for`).
_AXIS_VALUE = {"token": "step", "example": "example", "task": "task", "output": "output", "parameter": "parameter",
               "factor": "parameter, factor mix"}  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """A named routing method: its taxonomy record plus how it builds a router (``builder(ctx, options)``).

    - ``signatures``: per-expert artifacts it needs (each knows how to compute itself);
    - ``held_in_only``: it cannot serve a held-out task at all (it routes by the task's own expert). The
      taxonomy's ``generalization`` records what the paper evaluated, which is no reason to refuse a setting;
    - ``needs_inputs``: `RoutingInputs` fields every call must carry (e.g. ``task_names``);
    - ``option_axes``: options that move the method along a taxonomy axis (``{"granularity": "granularity"}``);
    - ``variants``: option sets the benchmark runs besides the defaults (a callable, evaluated at run time);
    - ``model_builder``: instead of ``builder``, for methods that build a whole new model from the base and the
      experts (``model_builder(ctx, options) -> BuiltModel``; `moerge.recipes.build_model` runs it, the
      benchmark evaluates the model it returns);
    - ``query_router``: instead of ``builder``, for routers among whole models (the pool suite's methods:
      RouteLLM, Zooter …): ``query_router(options) -> moerge.pool.query.QueryRouter``.
    - ``composes``: ``"experts"`` (a router over a library's experts, the usual case) or ``"models"``: a method
      that composes whole models (Co-LLM, CALM). A models recipe has no router builder; it is listed with its
      taxonomy record and its options are validated here, but it runs through the Python API named in
      ``entry`` — `attach`, ``moerge bench`` on an expert suite and ``moerge serve`` refuse it with that pointer.
    """

    name: str
    summary: str
    taxonomy: Taxonomy
    builder: Callable[[BuildContext, Any], Router | Routing] | None
    options: type[BaseModel] = RecipeOptions
    paper: str | None = None
    signatures: tuple[Signature, ...] = ()
    held_in_only: bool = False
    needs_inputs: tuple[str, ...] = ()
    option_axes: Mapping[str, str] = field(default_factory=dict)
    variants: Callable[[], Sequence[dict[str, Any]]] = tuple
    model_builder: Callable[[BuildContext, Any], BuiltModel] | None = None
    query_router: Callable[[Any], Any] | None = None
    composes: Literal["experts", "models"] = "experts"
    entry: str | None = None  # for a models recipe: the Python API that runs it
    needs_lora: str | None = None  # why the method reads LoRA factors (dense experts then not applicable)

    @property
    def kind(self) -> Literal["router", "model", "pool", "compose"]:
        """``router``: routes experts injected into a model; ``model``: builds a whole model; ``pool``: picks
        one whole model of a pool per query; ``compose``: composes two whole models (Co-LLM, CALM)."""
        if self.composes == "models":
            return "compose"
        if self.query_router is not None:
            return "pool"
        return "model" if self.model_builder is not None else "router"

    @property
    def builds_model(self) -> bool:
        """Whether the recipe builds a whole model (``model_builder``) rather than a router."""
        return self.model_builder is not None

    def refuse_models(self) -> None:
        """Raise `RecipeNotApplicableError` for a recipe that composes whole models (nothing to attach)."""
        if self.composes == "models":
            raise RecipeNotApplicableError(
                f"recipe {self.name!r} composes two whole models, not a library's experts: run it with "
                f"{self.entry or 'its Python API'} (docs/collaboration.md)"
            )

    @property
    def key(self) -> str:
        """The registry key: the name with hyphens as underscores (``arrow-x`` and ``arrow_x`` are one)."""
        return canonical_name(self.name)

    def parse_options(self, options: dict[str, Any] | BaseModel | None = None) -> BaseModel:
        if isinstance(options, self.options):
            return options
        if isinstance(options, BaseModel):
            options = options.model_dump()
        try:
            return self.options(**(options or {}))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            known = ", ".join(self.options.model_fields) or "none"
            raise MalformedConfigError(
                f"recipe {self.name!r}: option {loc}: {err['msg']} (its options: {known})"
            ) from e

    def build(self, ctx: BuildContext, options: BaseModel) -> Routing:
        from moerge.routing.router import Router

        if self.model_builder is not None:
            raise RecipeNotApplicableError(
                f"recipe {self.name!r} builds a whole model, not a router: use "
                f"moerge.recipes.build_model(model, library, {self.name!r}, ...)"
            )
        self.refuse_models()
        if self.builder is None:
            raise RecipeNotApplicableError(f"recipe {self.name!r} needs no router")
        ctx.recipe = self.name
        built = self.builder(ctx, options)
        return Routing(built) if isinstance(built, Router) else built

    def taxonomy_for(self, options: BaseModel) -> dict[str, str]:
        """The taxonomy record with the axes these options changed marked ``(option)`` (e.g. Arrow run per
        example: granularity ``example (option)``)."""
        tax = self.taxonomy.model_dump()
        values = options.model_dump()
        for option, axis in self.option_axes.items():
            value = _AXIS_VALUE.get(str(values.get(option)))
            if value is not None and value != tax[axis]:
                tax[axis] = f"{value} (option)"
        return tax

    def check_experts(
        self, experts: Sequence[Any], options: dict[str, Any] | BaseModel | None = None
    ) -> None:
        """Raise `RecipeNotApplicableError` when ``experts`` include dense ones (full fine-tunes' task vectors)
        and the method reads LoRA factors (``needs_lora``) or mixes them (factor aggregation)."""
        dense = [e.name for e in experts if getattr(e, "kind", "lora") == "dense"]
        if not dense:
            return
        shown = ", ".join(dense[:3]) + (" …" if len(dense) > 3 else "")
        fix = "extract LoRA experts from them (moerge library extract) to run it"
        if self.needs_lora:
            raise RecipeNotApplicableError(
                f"recipe {self.name!r} needs LoRA experts ({self.needs_lora}); {shown} are dense; {fix}"
            )
        opts = self.parse_options(options)
        if getattr(opts, "aggregation", None) == "factor":
            raise RecipeNotApplicableError(
                f"recipe {self.name!r} with factor aggregation mixes LoRA factors; {shown} are dense (a full "
                f"ΔW has none): use aggregation=output or parameter, or {fix}"
            )

    def check_applicable(
        self,
        ctx: BuildContext | Any = None,
        *,
        user_data: str = "zero-shot",
        generalization: str | None = None,
        options: dict[str, Any] | BaseModel | None = None,
    ) -> None:
        """Raise `RecipeNotApplicableError` when the setting is one the taxonomy record rules out: a user-data
        mode the recipe cannot serve, a held-out run for a held-in-only method, or a library whose experts lack
        the data signatures the recipe needs. ``ctx`` is a `BuildContext`, or an `ExpertLibrary` (read as its
        LoRA experts, with no model)."""
        if ctx is not None and not isinstance(ctx, BuildContext):
            ctx = BuildContext(model=None, experts=ctx.list(kind="lora"), library=ctx)
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
        opts = self.parse_options(options)
        if ctx is not None:
            self.check_experts(ctx.experts, opts)
        data_signatures = [s for s in self.signatures if s.needs_data and s.needed(opts)]
        if not data_signatures or ctx is None:
            return
        for sig in data_signatures:
            if ctx.library is None:
                raise RecipeNotApplicableError(
                    f"recipe {self.name!r} needs {sig.what} stored in an expert library; attach a library "
                    f"(not a list of experts) after computing them with {sig.how}."
                )
            cfg = sig.config(opts, ctx)
            missing = lacking(ctx.library, sig, cfg, ctx.names)
            if missing:
                raise RecipeNotApplicableError(
                    missing_message(self.name, sig, missing, ctx.names, ctx.library, opts, cfg)
                )

    def missing_signatures(
        self, ctx: BuildContext, options: BaseModel, *, weights: bool = False
    ) -> list[tuple[Signature, list[str]]]:
        """``(signature, experts lacking it)`` for each data signature some expert lacks (``weights``: also
        the signatures computed from the weights alone)."""
        out = []
        for sig in self.signatures:
            if (not sig.needs_data and not weights) or not sig.needed(options):
                continue
            cfg = sig.config(options, ctx)
            missing = lacking(ctx.library, sig, cfg, ctx.names)
            if missing:
                out.append((sig, missing))
        return out


def canonical_name(name: str) -> str:
    return name.strip().replace("-", "_")
