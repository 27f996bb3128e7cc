"""`attach` / `detach`: put expert layers into a model (in place) and take them out again, exactly.

    routed = moerge.attach(model, library, recipe="arrow", k=2)
    out = routed(input_ids=ids, routing=RoutingInputs(task_names=[...], record=True))
    weights = routed.last_routing()            # {module: [B, T, E]}
    model = moerge.detach(routed)              # the original modules back in place

Routing state lives in a `CallState` made for each call of the routed model and dropped after it — no
globals, no thread-locals. Call the routed model (or ``routed.generate``), not the inner model: the inner
model runs without experts when called directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from moerge.errors import MoergeError, ShapeMismatchError
from moerge.experts.expert import Expert
from moerge.model.expert_layer import Aggregation, ExpertLayer, module_dims, stack_factors
from moerge.routing.inputs import RoutingInputs
from moerge.routing.routers import Router
from moerge.routing.selection import Selection


class RoutingContext:
    """Shared by the expert layers of one routed model: the call in flight, if any."""

    def __init__(self) -> None:
        self.call: CallState | None = None


class CallState:
    """Everything about one call of the routed model: the inputs, the router's per-call plan, recordings."""

    def __init__(
        self,
        routed: MoErgedModel,
        inputs: RoutingInputs,
        batch_size: int,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ):
        self.routed = routed
        self.router = routed.router
        self.inputs = inputs
        self.batch_size = batch_size
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.aggregation: Aggregation = routed.aggregation
        self.plan: dict[str, Any] = {}
        self.recorded: dict[str, list[torch.Tensor]] = {}
        self._explicit: Selection | None = None
        if inputs.weights is not None:
            self._explicit = explicit_selection(inputs.weights, routed.num_experts, batch_size)
        else:
            self.router.begin_call(self)

    def token_mask(self, T: int, dtype: torch.dtype) -> torch.Tensor:
        m = self.attention_mask
        if m is not None and m.shape[-1] == T:
            return m.to(dtype)
        return torch.ones(self.batch_size, T, dtype=dtype)

    def embed(self, embedder: Any) -> torch.Tensor:
        """Embed this call's examples: from ``inputs.texts`` if given, else from the token ids (directly where
        the embedder can, else decoded back to text with the routed model's tokenizer)."""
        if self.inputs.texts is not None:
            return embedder.embed_texts(list(self.inputs.texts))
        if self.input_ids is not None and hasattr(embedder, "embed_ids"):
            return embedder.embed_ids(self.input_ids, self.attention_mask)
        tokenizer = self.routed.tokenizer
        if self.input_ids is not None and tokenizer is not None:
            ids = self.input_ids
            if self.attention_mask is not None:
                ids = [row[mask.bool()] for row, mask in zip(ids, self.attention_mask, strict=True)]
            return embedder.embed_texts(tokenizer.batch_decode(ids, skip_special_tokens=True))
        raise MoergeError(
            f"embedder {getattr(embedder, 'name', embedder)!r} needs the examples' texts: pass "
            "routing=RoutingInputs(texts=[...]), or attach(..., tokenizer=) so token ids can be decoded"
        )

    def select(self, layer: ExpertLayer, x: torch.Tensor) -> Selection | None:
        sel = self._explicit if self._explicit is not None else self.router.select(layer.module_name, x, self)
        if sel is None:
            return None
        if sel.per == "example":
            actual = x.shape[0]
            if sel.rows != actual:
                if actual % sel.rows:
                    raise ShapeMismatchError(f"{sel.rows} routing rows for a batch of {actual}")
                sel = sel.repeat_rows(actual // sel.rows)
        if self.inputs.record:
            self._record(layer, x, sel)
        return sel

    def _record(self, layer: ExpertLayer, x: torch.Tensor, sel: Selection) -> None:
        dense = sel.dense(layer.num_experts).detach().float()
        if sel.per == "example":
            T = x.shape[1] if x.ndim >= 3 else 1
            dense = dense[:, None, :].expand(-1, T, -1)
        else:
            dense = dense.reshape(x.shape[0], -1, layer.num_experts)
        self.recorded.setdefault(layer.module_name, []).append(dense.cpu())


def explicit_selection(weights: torch.Tensor, num_experts: int, batch_size: int) -> Selection:
    """Per-example weights ``[B, E]`` given by the caller → a sparse `Selection` over each row's non-zeros."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.ndim == 1:
        w = w.expand(batch_size, -1)
    if w.shape != (batch_size, num_experts):
        raise ShapeMismatchError(
            f"routing weights have shape {tuple(w.shape)}; expected [batch={batch_size}, experts={num_experts}]"
        )
    k = max(int((w != 0).sum(-1).max()), 1)
    if k >= num_experts:
        return Selection(w, None, "example")
    top, idx = torch.topk(w.abs(), k, dim=-1)
    return Selection(w.gather(1, idx), idx, "example")


class MoErgedModel(nn.Module):
    """A base model with expert layers in place of its target modules, and the router that drives them."""

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, ExpertLayer],
        expert_names: list[str],
        router: Router | None,
        aggregation: Aggregation,
        context: RoutingContext,
        recipe: Any = None,
        options: Any = None,
        tokenizer: Any = None,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.expert_layers = layers  # plain dict: the layers are already children of `model`
        self.expert_names = list(expert_names)
        self.router = router
        self.aggregation = aggregation
        self.recipe = recipe
        self.options = options
        self._context = context
        self._last: dict[str, list[torch.Tensor]] = {}
        self._last_call: CallState | None = None

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    # ------------------------------------------------------------------ calls
    @contextlib.contextmanager
    def routing(
        self, routing: RoutingInputs | None, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> Iterator[CallState]:
        """Route every expert layer for the duration of the block (used by forward and generate)."""
        if self._context.call is not None:
            raise MoergeError("the routed model is already in a call; calls do not nest")
        inputs = routing if routing is not None else RoutingInputs()
        if isinstance(inputs, dict):
            inputs = RoutingInputs(**inputs)
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        batch = ref.shape[0] if isinstance(ref, torch.Tensor) else 1
        is_ids = ids is not None and not ids.is_floating_point()
        call = CallState(self, inputs, batch, ids if is_ids else None, kwargs.get("attention_mask"))
        self._context.call = call
        try:
            yield call
        finally:
            self._context.call = None
            self._last_call = call
            self._last = call.recorded

    def forward(self, *args: Any, routing: RoutingInputs | None = None, **kwargs: Any) -> Any:
        if self.router is None:
            return self.model(*args, **kwargs)
        with self.routing(routing, args, kwargs):
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, routing: RoutingInputs | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with the experts routed; token-level routers route every new token."""
        if self.router is None:
            return self.model.generate(*args, **kwargs)
        with self.routing(routing, args, kwargs):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """The base model without experts (calls of the inner model are never routed)."""
        yield self.model

    # ------------------------------------------------------------------ diagnostics
    def last_routing(self) -> dict[str, torch.Tensor]:
        """Each layer's expert weights in the last call made with ``RoutingInputs(record=True)``:
        ``{module: [B, T, E]}`` (dense, zeros for unselected experts; generate concatenates its steps)."""
        return {name: torch.cat(chunks, dim=1) for name, chunks in self._last.items()}

    def routing_report(
        self, labels: list[str] | None = None, attention_mask: torch.Tensor | None = None
    ) -> Any:
        """Diagnostics of the last recorded call (`moerge.routing.diagnostics.RoutingReport`): per layer the
        mean weights, usage and entropy, and routing accuracy against ``labels`` (ground-truth expert names per
        example; default: the call's ``RoutingInputs.expert_labels``)."""
        from moerge.routing.diagnostics import routing_report

        call = self._last_call
        if labels is None and call is not None:
            labels = call.inputs.expert_labels
        if attention_mask is None and call is not None:
            attention_mask = call.attention_mask
        return routing_report(self.last_routing(), self.expert_names, labels, attention_mask)

    def expert_flops_per_token(self) -> float:
        """Multiply-adds × 2 per token spent on experts and routing (beyond the base model), for the router's
        nominal number of experts per token: Σ_modules 2·k·R·(d_in + d_out) + routing cost."""
        if self.router is None:
            return 0.0
        k = experts_per_token(self.router, self.num_experts)
        total = 0.0
        for layer in self.expert_layers.values():
            if self.aggregation == "parameter" and self.router.granularity != "token":
                total += 2 * layer.d_in * layer.d_out  # the merged ΔW runs as one extra matmul
            else:
                total += 2 * k * layer.rank * (layer.d_in + layer.d_out)
        dims = {n: (la.d_in, la.d_out) for n, la in self.expert_layers.items()}
        return total + self.router.routing_flops_per_token(dims)


def experts_per_token(router: Router, num_experts: int) -> float:
    sel = getattr(router, "selection", None)
    if sel is not None:
        return float(min(sel.k or num_experts, num_experts))
    indices = getattr(router, "indices", None)
    if indices is not None:
        return float(len(indices)) if getattr(router, "sparse", False) else float(num_experts)
    return 1.0


# ---------------------------------------------------------------------- attach / detach
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


def inject(
    model: nn.Module,
    experts: list[Expert],
    target_modules: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, ExpertLayer], RoutingContext]:
    """Replace each module some expert adapts by an `ExpertLayer` holding every expert's stacked factors."""
    if not experts:
        raise MoergeError("no experts to attach; add LoRA experts to the library first")
    for e in experts:
        if e.kind != "lora":
            raise MoergeError(
                f"expert {e.name!r} is a dense delta; routing needs LoRA experts (merge it instead)"
            )
    modules = sorted(set().union(*(e.lora for e in experts)))
    if target_modules is not None:
        modules = [m for m in modules if m in set(target_modules)]
    context = RoutingContext()
    layers: dict[str, ExpertLayer] = {}
    for name in modules:
        try:
            base = model.get_submodule(name)
        except AttributeError as err:
            raise ShapeMismatchError(
                f"the experts adapt module {name}, which the model does not have; attach them to their base model"
            ) from err
        if isinstance(base, ExpertLayer):
            raise MoergeError(f"module {name} already holds experts; detach the model first")
        d_in, d_out = module_dims(base)
        mods = [e.lora.get(name) for e in experts]
        for e, m in zip(experts, mods):
            if m is not None and (m.d_in, m.d_out) != (d_in, d_out):
                raise ShapeMismatchError(
                    f"expert {e.name!r}, module {name}: LoRA maps {m.d_in}→{m.d_out}, the model's layer {d_in}→{d_out}"
                )
        w = getattr(base, "weight", None)
        A, Bt = stack_factors(mods, d_in, d_out, dtype or (w.dtype if w is not None else torch.float32))
        if w is not None:
            A, Bt = A.to(w.device), Bt.to(w.device)
        layers[name] = ExpertLayer(base, name, A, Bt, context)
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    return layers, context


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def attach(
    model: nn.Module,
    library_or_experts: Any,
    recipe: Any = "uniform",
    *,
    experts: Sequence[str] | None = None,
    target_modules: Sequence[str] | None = None,
    router: Router | None = None,
    aggregation: Aggregation | None = None,
    tokenizer: Any = None,
    embedder: Any = None,
    **options: Any,
) -> MoErgedModel:
    """Attach a library's experts to ``model`` (in place) and route among them with ``recipe``.

    ``library_or_experts``: an `ExpertLibrary`, its path, or a list of `Expert`. ``recipe``: a recipe name
    (``moerge recipes`` lists them) or `Recipe`; ``options`` are that recipe's options (e.g. ``k=2``).
    ``experts`` restricts to named experts. ``router`` bypasses the recipe with a ready `Router`.
    ``tokenizer``/``embedder`` serve routers that embed inputs. Raises `RecipeNotApplicableError` when the
    recipe cannot run on this library (e.g. missing data statistics).
    """
    from moerge.recipes import BuildContext, get_recipe
    from moerge.routing.embedding import default_embedder

    expert_list, library = resolve_experts(library_or_experts, experts)
    rec = get_recipe(recipe) if not hasattr(recipe, "build") else recipe
    opts = rec.parse_options(options)
    # cheap: embedding models load on first use. A recipe's `embedding_model` option picks which one.
    embedder = default_embedder(model, tokenizer, embedder, getattr(opts, "embedding_model", "default"))
    if router is None:
        rec.check_applicable(library, experts=expert_list, embedder_name=embedder.name, options=opts)
    if rec.name == "base" and router is None:
        return MoErgedModel(
            model, {}, [e.name for e in expert_list], None, "output", RoutingContext(), rec, opts, tokenizer
        )
    layers, context = inject(model, expert_list, target_modules)
    ctx = BuildContext(
        model=model,
        experts=expert_list,
        library=library,
        modules=list(layers),
        tokenizer=tokenizer,
        embedder=embedder,
    )
    if router is None:
        router = rec.build(ctx, opts)
    agg = aggregation or getattr(opts, "aggregation", None) or "output"
    return MoErgedModel(
        model, layers, [e.name for e in expert_list], router, agg, context, rec, opts, tokenizer
    )


def detach(routed: MoErgedModel) -> nn.Module:
    """Put the original modules back and return the original model (the same object, unchanged)."""
    model = routed.model
    for name, layer in routed.expert_layers.items():
        _set_submodule(model, name, layer.base)
    routed.expert_layers = {}
    routed.router = None
    return model
