"""The state of one routed call, kept in a `contextvars.ContextVar` so it never leaks between threads or calls.

A routed model owns a `CallOwner` token shared with its expert layers. Starting a call (`activate`) binds a
`CallState` to that owner *in the current context*: a thread (or an asyncio task) sees only the calls it
started itself, so N threads calling one routed model each get their own experts. An expert layer asks
`active_call(owner)` for the call in flight; outside a call it adds no expert (the base model).

Activation checkpointing recomputes a segment's forward during backward, after the call has ended.
`checkpoint_context_fn` (passed as ``context_fn`` to ``torch.utils.checkpoint.checkpoint``, non-reentrant)
captures the calls active at forward time and re-binds them for the recomputation, so the experts and the
router run again exactly as they did (recordings are not duplicated).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import torch

from moerge.errors import RoutingError, ShapeMismatchError
from moerge.routing.inputs import RoutingInputs
from moerge.routing.selection import Selection

if TYPE_CHECKING:
    from collections.abc import Mapping

    from moerge.routing.router import Router

Aggregation = Literal["output", "parameter", "factor"]


class CallOwner:
    """Identity token shared by one routed model and its expert layers (the key of its calls)."""

    __slots__ = ("name",)

    def __init__(self, name: str = "routed model"):
        self.name = name

    def __repr__(self) -> str:
        return f"CallOwner({self.name!r})"


_EMPTY: Mapping[CallOwner, CallState] = MappingProxyType({})
_ACTIVE: ContextVar[Mapping[CallOwner, CallState]] = ContextVar("moerge_active_calls", default=_EMPTY)
_RECOMPUTING: ContextVar[bool] = ContextVar("moerge_recomputing", default=False)


class CallState:
    """Everything about one call of a routed model: its inputs, the router's per-call plan, the recordings.

    Made by the routed model for each call and dropped after it. Routers read ``inputs``, ``batch_size``,
    ``input_ids``/``attention_mask`` (what the router may see), keep per-call decisions in ``plan``, and embed
    the call's examples with `embed`."""

    def __init__(
        self,
        router: Router,
        inputs: RoutingInputs,
        *,
        num_experts: int,
        aggregation: Aggregation = "output",
        batch_size: int = 1,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        tokenizer: Any = None,
    ):
        self.router = router
        self.inputs = inputs
        self.num_experts = num_experts
        self.aggregation: Aggregation = aggregation
        self.batch_size = batch_size
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.tokenizer = tokenizer
        self.plan: dict[str, Any] = {}
        self.recorded: dict[str, list[torch.Tensor]] = {}
        self._explicit: Selection | None = None
        if inputs.weights is not None:
            self._explicit = explicit_selection(inputs.weights, num_experts, batch_size)
        else:
            router.begin_call(self)

    @property
    def routed_by_caller(self) -> bool:
        """True when the caller gave explicit weights (``RoutingInputs.weights``): the router is not asked."""
        return self._explicit is not None

    # ------------------------------------------------------------------ what routers use
    def token_mask(self, T: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """``[B, T]`` mask of the tokens the router may see (the call's attention mask where it fits)."""
        m = self.attention_mask
        if m is not None and m.shape[-1] == T:
            return m.to(device=device or m.device, dtype=dtype)
        return torch.ones(self.batch_size, T, dtype=dtype, device=device)

    def embed(self, embedder: Any) -> torch.Tensor:
        """Embed this call's examples: from ``inputs.texts`` if given, else from the token ids (directly where
        the embedder can, else decoded back to text with the routed model's tokenizer)."""
        if self.inputs.texts is not None:
            return embedder.embed_texts(list(self.inputs.texts))
        if self.input_ids is not None and hasattr(embedder, "embed_ids"):
            return embedder.embed_ids(self.input_ids, self.attention_mask)
        if self.input_ids is not None and self.tokenizer is not None:
            ids: Any = self.input_ids
            if self.attention_mask is not None:
                ids = [row[mask.bool()] for row, mask in zip(ids, self.attention_mask, strict=True)]
            return embedder.embed_texts(self.tokenizer.batch_decode(ids, skip_special_tokens=True))
        raise RoutingError(
            f"embedder {getattr(embedder, 'name', embedder)!r} needs the examples' texts: pass "
            "routing=RoutingInputs(texts=[...]), or attach(..., tokenizer=) so token ids can be decoded"
        )

    # ------------------------------------------------------------------ what expert layers use
    def select(self, module: str, x: torch.Tensor) -> Selection | None:
        """The selection for one expert layer's input ``x``, on ``x``'s device (rows expanded to the batch
        where generation repeats examples)."""
        sel = self._explicit if self._explicit is not None else self.router.select(module, x, self)
        if sel is None:
            return None
        sel = sel.to(x.device)
        if sel.per == "example":
            actual = x.shape[0]
            if sel.rows != actual:
                if actual % sel.rows:
                    raise ShapeMismatchError(f"{sel.rows} routing rows for a batch of {actual}")
                sel = sel.repeat_rows(actual // sel.rows)
        if self.inputs.record and not _RECOMPUTING.get():
            self._record(module, x, sel)
        return sel

    def _record(self, module: str, x: torch.Tensor, sel: Selection) -> None:
        dense = sel.dense(self.num_experts).detach().float()
        if sel.per == "example":
            T = x.shape[1] if x.ndim >= 3 else 1
            dense = dense[:, None, :].expand(-1, T, -1)
        else:
            dense = dense.reshape(x.shape[0], -1, self.num_experts)
        self.recorded.setdefault(module, []).append(dense)  # on the device; moved once, when read

    def routing(self) -> dict[str, torch.Tensor]:
        """What this call recorded (with ``RoutingInputs(record=True)``): ``{module: [B, T, E]}``, dense, zeros for
        unselected experts; a generate call concatenates its steps along T."""
        return {name: torch.cat(chunks, dim=1).cpu() for name, chunks in self.recorded.items()}


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
    _, idx = torch.topk(w.abs(), k, dim=-1)
    return Selection(w.gather(1, idx), idx, "example")


# ---------------------------------------------------------------------- binding calls to the current context
def active_call(owner: CallOwner) -> CallState | None:
    """The call of ``owner``'s routed model in flight in this context (thread / task), if any."""
    return _ACTIVE.get().get(owner)


@contextlib.contextmanager
def activate(owner: CallOwner, call: CallState) -> Iterator[CallState]:
    """Bind ``call`` to ``owner`` in the current context for the duration of the block."""
    current = _ACTIVE.get()
    if owner in current:
        raise RoutingError(
            f"the {owner.name} is already in a call in this thread; calls do not nest (call the inner model, "
            "`routed.model`, for a forward pass without experts)"
        )
    token = _ACTIVE.set(MappingProxyType({**current, owner: call}))
    try:
        yield call
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def suspended(owner: CallOwner) -> Iterator[None]:
    """Unbind ``owner``'s call in the current context for the block (its model runs without experts)."""
    current = _ACTIVE.get()
    token = _ACTIVE.set(MappingProxyType({o: c for o, c in current.items() if o is not owner}))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def checkpoint_context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: the recomputation runs with the calls that
    were active when the segment first ran (and records nothing a second time)."""
    captured = _ACTIVE.get()
    return contextlib.nullcontext(), _rebind(captured)


@contextlib.contextmanager
def _rebind(calls: Mapping[CallOwner, CallState]) -> Iterator[None]:
    token, again = _ACTIVE.set(calls), _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(again)
        _ACTIVE.reset(token)
