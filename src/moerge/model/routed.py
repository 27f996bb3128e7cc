"""The routed model: a base model with `ExpertLayer`s injected (in place), and the router that drives them.

    layers, owner = inject(model, experts, target_modules=["q_proj", "v_proj"])
    routed = MoErgedModel(model, layers, names, router, "output", owner)
    out = routed(input_ids=ids, routing=RoutingInputs(task_names=[...], record=True))
    with routed.call(RoutingInputs(record=True), input_ids=ids) as call:   # explicit per-call state
        logits = routed.model(input_ids=ids).logits
    weights = call.routing()                     # {module: [B, T, E]}
    model = detach(routed)                       # the original modules back in place

Routing state lives in a `moerge.routing.call.CallState` made for each call and bound to the current thread
(a ``ContextVar``), so threads calling one routed model never see each other's experts. Call the routed
model (or ``routed.generate``), not the inner model: the inner model runs without experts when called
directly. Recipes build routed models with `moerge.recipes.attach`.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from moerge.errors import MoergeError, RoutingError, ShapeMismatchError
from moerge.experts.expert import Expert
from moerge.model.expert_layer import (
    EmbeddingExpertLayer,
    ExpertLayer,
    PagedExpertLayer,
    module_dims,
    stack_factors,
)
from moerge.routing.call import (
    Aggregation,
    CallOwner,
    CallState,
    activate,
    active_call,
    checkpoint_context_fn,
    suspended,
)
from moerge.routing.inputs import RoutingInputs
from moerge.routing.router import Router


class MoErgedModel(nn.Module):
    """A base model with expert layers in place of its target modules, and the router that drives them."""

    router: Router | None
    model: Any  # the inner model: any nn.Module; a transformers model also has `generate`

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, ExpertLayer],
        expert_names: list[str],
        router: Router | None,
        aggregation: Aggregation,
        owner: CallOwner,
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
        self.aggregation: Aggregation = aggregation
        self.recipe = recipe
        self.options = options
        self.owner = owner
        self._last: dict[int, CallState] = {}  # thread id -> that thread's last call (for last_routing)
        self._forward_hook = None
        if router is not None and router.follows_forwards:
            self._forward_hook = model.register_forward_pre_hook(
                functools.partial(_tell_router, owner), with_kwargs=True
            )

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
    def call(
        self,
        routing: RoutingInputs | dict | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> Iterator[CallState]:
        """Route every expert layer for the duration of the block, in this thread only.

        ``input_ids``/``attention_mask`` are what the router may see (an example-level router pools over the
        masked tokens; the model itself may be called on more). Yields the `CallState`; after the block,
        ``call.routing()`` holds what was recorded with ``RoutingInputs(record=True)``."""
        if self.router is None:
            raise RoutingError(
                "this routed model has no router (the base recipe); call routed.model directly"
            )
        inputs = routing if routing is not None else RoutingInputs()
        if isinstance(inputs, dict):
            inputs = RoutingInputs(**inputs)
        if batch_size is None:
            batch_size = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) else 1
        if self.model.training and torch.is_grad_enabled():
            route_checkpointed_segments(self.model)
        state = CallState(
            self.router,
            inputs,
            num_experts=self.num_experts,
            aggregation=self.aggregation,
            batch_size=batch_size,
            input_ids=input_ids,
            attention_mask=attention_mask,
            tokenizer=self.tokenizer,
        )
        with activate(self.owner, state):
            yield state
        self._last[threading.get_ident()] = state

    def _call_from(self, routing: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        batch = ref.shape[0] if isinstance(ref, torch.Tensor) else 1
        is_ids = ids is not None and not ids.is_floating_point()
        return self.call(
            routing,
            input_ids=ids if is_ids else None,
            attention_mask=kwargs.get("attention_mask"),
            batch_size=batch,
        )

    def forward(self, *args: Any, routing: RoutingInputs | None = None, **kwargs: Any) -> Any:
        if self.router is None:
            return self.model(*args, **kwargs)
        with self._call_from(routing, args, kwargs):
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, routing: RoutingInputs | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with the experts routed; token-level routers route every new token. A router that
        re-weights the whole prefix as it grows (``router.recompute``) generates without a KV cache unless
        ``use_cache=True`` is passed."""
        if self.router is None:
            return self.model.generate(*args, **kwargs)
        if self.router.recompute:  # the router re-weights the whole prefix: no stale keys/values
            kwargs.setdefault("use_cache", False)
        with self._call_from(routing, args, kwargs):
            return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ diagnostics
    def last_call(self) -> CallState | None:
        """This thread's last finished call (None before the first)."""
        return self._last.get(threading.get_ident())

    def last_routing(self) -> dict[str, torch.Tensor]:
        """Each layer's expert weights in this thread's last call made with ``RoutingInputs(record=True)``:
        ``{module: [B, T, E]}`` (dense, zeros for unselected experts; generate concatenates its steps)."""
        call = self.last_call()
        return call.routing() if call is not None else {}

    def routing_report(
        self, labels: list[str] | None = None, attention_mask: torch.Tensor | None = None
    ) -> Any:
        """Diagnostics of this thread's last recorded call (`moerge.routing.diagnostics.RoutingReport`): per
        layer the mean weights, usage and entropy, and routing accuracy against ``labels`` (ground-truth expert
        names per example; default: the call's ``RoutingInputs.expert_labels``)."""
        from moerge.routing.diagnostics import routing_report

        call = self.last_call()
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
        k = self.router.experts_per_token(self.num_experts)
        total = 0.0
        for layer in self.expert_layers.values():
            if isinstance(layer, EmbeddingExpertLayer):  # A·one_hot is a lookup; every expert's B runs
                total += 2 * layer.num_experts * layer.rank * layer.d_out
            elif self.aggregation == "parameter" and self.router.granularity != "token":
                total += 2 * layer.d_in * layer.d_out  # the merged ΔW runs as one extra matmul
            else:
                if layer.has_lora:
                    total += 2 * k * layer.rank * (layer.d_in + layer.d_out)
                total += 2 * layer.num_dense * layer.d_in * layer.d_out  # every dense ΔW_e x, weighted
        dims = {n: (la.d_in, la.d_out) for n, la in self.expert_layers.items()}
        return total + self.router.routing_flops_per_token(dims)


def _tell_router(owner: CallOwner, _module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a routed model whose router follows forwards: hand it each pass's token ids (the
    whole prompt first, then each step's new tokens under ``generate``), with the call unbound meanwhile."""
    call = active_call(owner)
    if not isinstance(call, CallState) or call.routed_by_caller:  # no call, or a server's BatchCall
        return
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if ids is None or ids.is_floating_point():
        return
    with suspended(owner):
        call.router.on_forward(call, ids, kwargs.get("attention_mask"))


# ---------------------------------------------------------------------- activation checkpointing
def enable_activation_checkpointing(model: nn.Module, **kwargs: object) -> None:
    """transformers' activation checkpointing on ``model`` with ``torch.utils.checkpoint`` keyword arguments
    (``use_reentrant=False`` for routed models): ``activation_checkpointing_enable`` where transformers has it
    (≥ 5), else the older ``gradient_checkpointing_enable`` (deprecated in 5, removed in 6)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Undo `enable_activation_checkpointing`."""
    disable = getattr(model, "activation_checkpointing_disable", None)
    if disable is not None:
        disable()
    else:
        model.gradient_checkpointing_disable()  # type: ignore[operator]


def supports_activation_checkpointing(model: nn.Module) -> bool:
    return hasattr(model, "activation_checkpointing_enable") or hasattr(
        model, "gradient_checkpointing_enable"
    )


def route_checkpointed_segments(model: nn.Module) -> None:
    """Make every activation-checkpointed segment of ``model`` (transformers' ``gradient_checkpointing``)
    recompute with the routing of the call that first ran it, as PEFT's LoRA layers recompute with their
    adapters: non-reentrant checkpointing with `checkpoint_context_fn`. Reentrant checkpointing recomputes
    outside any call, so the experts would vanish from the backward pass: it is refused."""
    for module in model.modules():
        if not getattr(module, "gradient_checkpointing", False):
            continue
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(fn, functools.partial) and fn.keywords.get("context_fn") is checkpoint_context_fn:
            continue
        if not isinstance(fn, functools.partial) or fn.keywords.get("context_fn") is not None:
            raise RoutingError(
                f"module {type(module).__name__} uses a custom activation-checkpointing function; routed models "
                "support transformers' own: moerge.model.routed.enable_activation_checkpointing(model, "
                "use_reentrant=False)"
            )
        if fn.keywords.get("use_reentrant") is True:
            raise RoutingError(
                "reentrant activation checkpointing recomputes each layer outside the routed call, so no "
                "expert (and no gradient to a router) would reach the backward pass; enable it with "
                "moerge.model.routed.enable_activation_checkpointing(model, use_reentrant=False)"
            )
        keywords = {**fn.keywords, "use_reentrant": False, "context_fn": checkpoint_context_fn}
        setattr(module, "_gradient_checkpointing_func", functools.partial(fn.func, *fn.args, **keywords))  # noqa: B010


# ---------------------------------------------------------------------- inject / detach
def match_target_modules(adapted: Sequence[str], target_modules: str | Sequence[str] | None) -> list[str]:
    """The adapted module names ``target_modules`` selects, in PEFT's forms: a string is a regular expression
    matched against the whole name (``re.fullmatch``); a list names modules exactly or by suffix
    (``"q_proj"`` selects ``model.layers.0.self_attn.q_proj``). A pattern that selects nothing is refused."""
    names = list(adapted)
    if target_modules is None:
        return names
    shown = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})[:8]) or "none"
    if isinstance(target_modules, str):
        try:
            rx = re.compile(target_modules)
        except re.error as err:
            raise MoergeError(
                f"target_modules {target_modules!r} is not a valid regular expression: {err}"
            ) from err
        chosen = [n for n in names if rx.fullmatch(n)]
        if not chosen:
            raise MoergeError(
                f"target_modules {target_modules!r} (a regular expression, matched against whole module "
                f"names) selects none of the modules the experts adapt (e.g. {names[0] if names else 'none'}; "
                f"module kinds: {shown})"
            )
        return chosen
    chosen_set: set[str] = set()
    for t in target_modules:
        hit = [n for n in names if n == t or n.endswith("." + t)]
        if not hit:
            raise unmatched_target_error(t, names, "the experts adapt")
        chosen_set.update(hit)
    return [n for n in names if n in chosen_set]


def unmatched_target_error(target: str, names: Sequence[str], whose: str) -> MoergeError:
    """The one-line error for a target module that matches none of ``names`` (full module names): the near
    matches (difflib) and the module kinds (last name parts) available."""
    import difflib

    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    depth = target.count(".") + 1  # compare with the names' dotted suffixes of as many parts
    pool = sorted({".".join(n.split(".")[-depth:]) for n in names})
    near = difflib.get_close_matches(target, pool, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(n) for n in near)}? " if near else ""
    return MoergeError(
        f"target module {target!r} matches none of the modules {whose}; {hint}"
        f"module names available: {', '.join(kinds) or 'none'} (a name or a dotted suffix of one)"
    )


Unrouted = Literal["refuse", "average"]
_UNROUTED_ATTR = "_moerge_unrouted"  # on the inner model: the originals of parameters `inject` averaged into


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _dense_modules(model: nn.Module, experts: list[Expert]) -> set[str]:
    """The linear modules (``nn.Linear``, ``Conv1D``) whose weight some dense expert updates."""
    out: set[str] = set()
    for e in experts:
        for key in e.dense:
            mod, _, leaf = key.rpartition(".")
            if leaf != "weight" or not mod:
                continue
            try:
                m = model.get_submodule(mod)
            except AttributeError:
                continue
            if _is_linear(m):
                out.add(mod)
    return out


def adapted_modules(model: nn.Module, experts: Sequence[Expert]) -> list[str]:
    """Every module some expert adapts, as `inject` takes them: LoRA modules, and the linear modules whose
    weight a dense expert updates."""
    return sorted(set().union(*(e.lora for e in experts)) | _dense_modules(model, list(experts)))


def _free_module(model: nn.Module, name: str) -> nn.Module:
    """The model's module ``name``, which must exist and not hold experts yet."""
    try:
        base = model.get_submodule(name)
    except AttributeError as err:
        raise ShapeMismatchError(
            f"the experts adapt module {name}, which the model does not have; attach them to their base model"
        ) from err
    if isinstance(base, ExpertLayer):
        raise MoergeError(f"module {name} already holds experts; detach the model first")
    return base


def inject(
    model: nn.Module,
    experts: list[Expert],
    target_modules: str | Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    unrouted: Unrouted = "refuse",
) -> tuple[dict[str, ExpertLayer], CallOwner]:
    """Replace each module some expert adapts (or those ``target_modules`` selects, PEFT's forms) by an
    `ExpertLayer` holding every expert's stacked factors, and the dense experts' ΔW (full fine-tunes).

    A dense expert's updates of a linear module's weight (and bias) are routed like a LoRA's. Its other updates
    (norms, embeddings, a linear module left out by ``target_modules``) cannot be routed per module:
    ``unrouted="refuse"`` raises, naming them; ``"average"`` adds the experts' mean update of each such
    parameter (task arithmetic with λ = 1/E, an expert without it counting as zero) to the model statically,
    and `detach` restores the original values."""
    if not experts:
        raise MoergeError("no experts to attach; add LoRA experts to the library first")
    if hasattr(model, _UNROUTED_ATTR):
        raise MoergeError("the model already holds experts' static updates; detach it first")
    modules = match_target_modules(adapted_modules(model, experts), target_modules)
    owner = CallOwner(f"routed {type(model).__name__}")
    layers: dict[str, ExpertLayer] = {}
    for name in modules:
        base = _free_module(model, name)
        d_in, d_out = module_dims(base)
        is_embedding = isinstance(base, nn.Embedding)
        mods = [e.lora.get(name) for e in experts]
        for e, m in zip(experts, mods):
            if m is not None and (m.d_in, m.d_out) != (d_in, d_out):
                raise ShapeMismatchError(
                    f"expert {e.name!r}, module {name}: LoRA maps {m.d_in}→{m.d_out}, the model's layer {d_in}→{d_out}"
                )
            if m is not None and m.embedding != is_embedding:
                kind = "an nn.Embedding" if is_embedding else "a linear layer"
                raise ShapeMismatchError(
                    f"expert {e.name!r}, module {name}: the model's module is {kind} but the expert's LoRA is "
                    f"{'an embedding' if m.embedding else 'a linear'} LoRA; attach the experts to their base model"
                )
        w = getattr(base, "weight", None)
        wdtype = dtype or (w.dtype if w is not None else torch.float32)
        A, Bt = stack_factors(mods, d_in, d_out, wdtype)
        if w is not None:
            A, Bt = A.to(w.device), Bt.to(w.device)
        if is_embedding:
            layers[name] = EmbeddingExpertLayer(base, name, A, Bt, owner)
            continue
        dense = _stack_dense(base, name, experts, d_in, d_out, wdtype)
        has_lora = any(m is not None for m in mods)
        layers[name] = ExpertLayer(base, name, A, Bt, owner, dense=dense, has_lora=has_lora)
    _apply_unrouted(model, experts, set(layers), unrouted)
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    return layers, owner


def _stack_dense(
    base: nn.Module, name: str, experts: list[Expert], d_in: int, d_out: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """The dense experts' ``(D [E_d, d_out, d_in], Db [E_d, d_out] or None, ids [E_d])`` for one linear
    module, in ``nn.Linear`` layout (a Conv1D's ``[d_in, d_out]`` deltas transposed); None without any."""
    ids = [i for i, e in enumerate(experts) if f"{name}.weight" in e.dense or f"{name}.bias" in e.dense]
    if not ids:
        return None
    conv1d = not isinstance(base, nn.Linear)
    w = cast(torch.Tensor, base.weight)
    bias = getattr(base, "bias", None)
    D = torch.zeros(len(ids), d_out, d_in, dtype=dtype, device=w.device)
    has_bias = any(f"{name}.bias" in experts[i].dense for i in ids)
    if has_bias and bias is None:
        e = next(experts[i] for i in ids if f"{name}.bias" in experts[i].dense)
        raise ShapeMismatchError(
            f"expert {e.name!r} updates {name}.bias, which the model does not have; use it with its base model"
        )
    Db = torch.zeros(len(ids), d_out, dtype=dtype, device=w.device) if has_bias else None
    for j, i in enumerate(ids):
        e = experts[i]
        dw = e.dense.get(f"{name}.weight")
        if dw is not None:
            if tuple(dw.shape) != tuple(w.shape):
                raise ShapeMismatchError(
                    f"expert {e.name!r}: {name}.weight has shape {tuple(w.shape)} in the model, the update "
                    f"{tuple(dw.shape)}; use it with its base model"
                )
            D[j] = (dw.T if conv1d else dw).to(device=w.device, dtype=dtype)
        db = e.dense.get(f"{name}.bias")
        if db is not None and Db is not None:
            if tuple(db.shape) != (d_out,):
                raise ShapeMismatchError(
                    f"expert {e.name!r}: {name}.bias has shape ({d_out},) in the model, the update {tuple(db.shape)}"
                )
            Db[j] = db.to(device=w.device, dtype=dtype)
    return D, Db, torch.tensor(ids, dtype=torch.long, device=w.device)


class PagingConfig(BaseModel):
    """When an attach pages expert factors from disk (`inject_paged`) instead of pre-stacking them all in
    memory (`inject`): ``mode="auto"`` pages a local library's experts from ``threshold`` experts on, ``"on"``
    always (a local library), ``"off"`` never. ``cache_experts``: experts' factors kept per module (an LRU)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "on", "off"] = "auto"
    threshold: int = Field(default=2048, ge=1)
    cache_experts: int = Field(default=256, ge=1)

    def pages(self, num_experts: int, local_library: bool) -> bool:
        if self.mode == "off" or not local_library:
            return False
        return self.mode == "on" or num_experts >= self.threshold


def inject_paged(
    model: nn.Module,
    factors: dict[str, Any],
    target_modules: str | Sequence[str] | None = None,
    capacity: int = 256,
) -> tuple[dict[str, ExpertLayer], CallOwner]:
    """Like `inject`, from stacked factors on disk (``{module: StackedFactors}``, `moerge.experts.stacked`):
    each module becomes a `PagedExpertLayer` that reads the experts a call selects, keeping at most
    ``capacity`` experts' factors per module in memory. Linear modules only."""
    if not factors:
        raise MoergeError("no expert factors to attach; add LoRA experts to the library first")
    modules = match_target_modules(sorted(factors), target_modules)
    owner = CallOwner(f"routed {type(model).__name__}")
    layers: dict[str, ExpertLayer] = {}
    for name in modules:
        base = _free_module(model, name)
        if isinstance(base, nn.Embedding):
            raise MoergeError(
                f"module {name} is an embedding; paged experts serve linear modules only: leave it out "
                "(target_modules=...) or attach with paging off"
            )
        f = factors[name]
        d_in, d_out = module_dims(base)
        if (f.A.shape[2], f.Bt.shape[2]) != (d_in, d_out):
            raise ShapeMismatchError(
                f"module {name}: the stacked factors map {f.A.shape[2]}→{f.Bt.shape[2]}, the model's layer "
                f"{d_in}→{d_out}; attach the experts to their base model"
            )
        layers[name] = PagedExpertLayer(base, name, f.A, f.Bt, owner, capacity)
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    return layers, owner


@torch.no_grad()
def _apply_unrouted(model: nn.Module, experts: list[Expert], routed: set[str], policy: Unrouted) -> None:
    """Dense updates of parameters no expert layer routes: refused, or their mean added (originals kept)."""
    keys: list[str] = []
    for e in experts:
        for key in e.dense:
            mod, _, leaf = key.rpartition(".")
            if not (mod in routed and leaf in ("weight", "bias")) and key not in keys:
                keys.append(key)
    if not keys:
        return
    if policy == "refuse":
        shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        raise RoutingError(
            f"the dense experts update {shown}, which are not weights of the linear modules being routed "
            "(norms, embeddings, or modules left out by target_modules) and cannot be routed per module; "
            "pass unrouted='average' (attach(..., unrouted='average'); moerge bench does for dense experts) to "
            "add the experts' mean update of those statically, or merge the experts instead"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    originals: dict[str, torch.Tensor] = {}
    for key in keys:
        p = params.get(key)
        if p is None:
            who = next(e.name for e in experts if key in e.dense)
            raise ShapeMismatchError(
                f"expert {who!r} updates {key}, which the model does not have; use it with its base model"
            )
        deltas = [e.dense[key] for e in experts if key in e.dense]
        for d in deltas:
            if tuple(d.shape) != tuple(p.shape):
                raise ShapeMismatchError(
                    f"a dense expert's update of {key} has shape {tuple(d.shape)}, the model's {tuple(p.shape)}"
                )
        mean = torch.stack([d.to(device=p.device, dtype=torch.float32) for d in deltas]).sum(0) / len(experts)
        originals[key] = p.detach().clone()
        p.add_(mean.to(p.dtype))
    setattr(model, _UNROUTED_ATTR, originals)


@torch.no_grad()
def _restore_unrouted(model: nn.Module) -> None:
    originals = getattr(model, _UNROUTED_ATTR, None)
    if originals is None:
        return
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, value in originals.items():
        params[key].copy_(value)
    delattr(model, _UNROUTED_ATTR)


def weight_deltas(model: nn.Module, expert: Expert) -> dict[str, torch.Tensor]:
    """The expert's update of each of ``model``'s parameters, by parameter name and in the parameter's own
    layout (LoRA densified: ``scaling · B @ A``, transposed for Conv1D and embeddings; dense deltas as stored).
    What a method that treats experts as task vectors (WEMoE, Twin-Merging, BTX) reads; shapes are checked."""
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under every name
    updates = {f"{m}.weight": lm.delta_for_weight() for m, lm in expert.lora.items()}
    updates.update(expert.dense)
    for key, delta in updates.items():
        p = params.get(key)
        if p is None:
            raise ShapeMismatchError(
                f"expert {expert.name!r} updates {key}, which the model does not have; use it with its base model"
            )
        if tuple(p.shape) != tuple(delta.shape):
            raise ShapeMismatchError(
                f"expert {expert.name!r}: {key} has shape {tuple(p.shape)} in the model, the update {tuple(delta.shape)}"
            )
    return updates


@torch.no_grad()
def merge_into(model: nn.Module, expert: Expert, weight: float = 1.0) -> nn.Module:
    """Add ``weight`` × the expert's update to ``model``'s weights in place (PEFT's ``merge_and_unload`` for one
    adapter): ``W += weight · ΔW`` in each weight's own layout (Linear, Conv1D, Embedding), dense deltas by
    parameter name. Returns ``model``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, delta in weight_deltas(model, expert).items():
        p = params[key]
        p.add_(delta.to(device=p.device, dtype=p.dtype), alpha=weight)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def detach(routed: MoErgedModel) -> nn.Module:
    """Put the original modules back and return the original model (the same object, unchanged)."""
    model = routed.model
    for name, layer in routed.expert_layers.items():
        _set_submodule(model, name, layer.base)
    _restore_unrouted(model)
    routed.expert_layers = {}
    routed.router = None
    if routed._forward_hook is not None:
        routed._forward_hook.remove()
        routed._forward_hook = None
    return model
