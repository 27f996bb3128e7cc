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


_EMPTY: Mapping[CallOwner, CallState | BatchCall] = MappingProxyType({})
_ACTIVE: ContextVar[Mapping[CallOwner, CallState | BatchCall]] = ContextVar(
    "moerge_active_calls", default=_EMPTY
)
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
        where generation repeats examples), recorded when the call records."""
        sel = self.selection(module, x)
        if sel is not None and self.inputs.record and not _RECOMPUTING.get():
            self._record(module, x, sel)
        return sel

    def selection(self, module: str, x: torch.Tensor) -> Selection | None:
        """`select` without recording (a `BatchCall` records its rows itself)."""
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


class BatchCall:
    """Several calls' examples in one forward pass, row ``i`` of the batch belonging to ``calls[i]`` (each a call
    of batch size 1): a server's decode step, where requests routed by different recipes share one forward.

    Expert layers ask `parts` for the groups of rows that share an aggregation, each with one per-token
    `Selection` over the group's tokens. Each call keeps its own plan (an example-level router's decision made
    on the prompt holds for the tokens after it, as in ``generate``) and its own recordings. Rows of calls whose
    router is `Router.tokenwise` and that share that router are routed with one ``select``."""

    def __init__(self, calls: list[CallState | None]):
        self.calls = list(calls)  # None: a row without experts (the base model)
        self.num_experts = next((c.num_experts for c in calls if c is not None), 0)
        # the same for every module of the forward: which rows are routed together, which one by one
        self._shared: dict[int, list[int]] = {}  # rows of calls routed together, by router
        self._alone: list[tuple[int, CallState]] = []
        for i, call in enumerate(self.calls):
            if call is None:
                continue
            if call._explicit is None and call.router.tokenwise:
                self._shared.setdefault(id(call.router), []).append(i)
            else:
                self._alone.append((i, call))
        self._rows: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def _row_tensor(self, rows: list[int], device: torch.device) -> torch.Tensor:
        key = (tuple(rows), device)
        t = self._rows.get(key)
        if t is None:
            t = self._rows[key] = torch.tensor(rows, device=device)
        return t

    def parts(self, module: str, x: torch.Tensor) -> list[tuple[torch.Tensor, Selection, Aggregation]]:
        """``[(rows, selection, aggregation)]`` for an expert layer's input ``x [B, T, d]`` (or ``[B, d]``):
        ``selection`` is per token over ``x[rows]``'s tokens in order; rows without experts are left out.
        ``"parameter"`` aggregation is served as ``"output"`` (the same map for a linear module)."""
        T = x.shape[1] if x.ndim >= 3 else 1
        E = self.num_experts
        pieces: dict[Aggregation, list[tuple[list[int], torch.Tensor, torch.Tensor]]] = {}
        per_example: dict[Aggregation, list[tuple[int, Selection]]] = {}  # one-row example-level selections
        for i, call in self._alone:
            sel = call.selection(module, x[i : i + 1])
            if sel is None:
                continue
            agg: Aggregation = "factor" if call.aggregation == "factor" else "output"
            if sel.per == "example" and sel.rows == 1:
                per_example.setdefault(agg, []).append((i, sel))
            else:
                self._add(pieces, module, [i], agg, sel, T, E)
        for agg, items in per_example.items():  # one Selection for all of them: no per-row work below
            k = max(s.weights.shape[1] for _, s in items)
            weights = torch.cat([_pad_k(s.weights, k, 0.0) for _, s in items])
            indices = torch.cat([_pad_k(_indices(s, E), k, 0) for _, s in items])
            self._add(
                pieces, module, [i for i, _ in items], agg, Selection(weights, indices, "example"), T, E
            )
        for rows in self._shared.values():
            first = self.calls[rows[0]]
            assert first is not None
            xg = x if len(rows) == len(self.calls) else x.index_select(0, self._row_tensor(rows, x.device))
            sel = first.router.select(module, xg, first)
            if sel is not None:
                agg = "factor" if first.aggregation == "factor" else "output"
                self._add(pieces, module, rows, agg, sel.to(x.device), T, E)
        out: list[tuple[torch.Tensor, Selection, Aggregation]] = []
        for agg, group in pieces.items():
            k = max(w.shape[1] for _, w, _ in group)
            rows = [r for rs, _, _ in group for r in rs]
            weights = torch.cat([_pad_k(w, k, 0.0) for _, w, _ in group])
            indices = torch.cat([_pad_k(idx, k, 0) for _, _, idx in group])
            out.append((self._row_tensor(rows, x.device), Selection(weights, indices, "token"), agg))
        return out

    def _add(
        self,
        pieces: dict[Aggregation, list],
        module: str,
        rows: list[int],
        agg: Aggregation,
        sel: Selection,
        T: int,
        E: int,
    ) -> None:
        n = len(rows)
        if sel.per == "example":
            sel = Selection(sel.weights.repeat_interleave(T, 0), None if sel.indices is None else
                            sel.indices.repeat_interleave(T, 0), "token")  # fmt: skip
        if sel.rows != n * T:
            raise ShapeMismatchError(f"{sel.rows} routing rows for {n} examples of {T} tokens")
        idx = _indices(sel, E)
        if not _RECOMPUTING.get():
            recording = [
                (j, c) for j, r in enumerate(rows) if (c := self.calls[r]) is not None and c.inputs.record
            ]
            if recording:
                dense = Selection(sel.weights, idx, "token").dense(E).detach().float().view(n, T, E)
                for j, c in recording:
                    c.recorded.setdefault(module, []).append(dense[j : j + 1])
        pieces.setdefault(agg, []).append((rows, sel.weights, idx))


def _indices(sel: Selection, E: int) -> torch.Tensor:
    """``sel``'s expert indices ``[M, k]`` (every expert, in order, for a dense selection)."""
    if sel.indices is not None:
        return sel.indices
    return torch.arange(E, device=sel.weights.device).expand(sel.rows, -1)


def _pad_k(t: torch.Tensor, k: int, value: float) -> torch.Tensor:
    """``[M, k']`` padded on the right to ``[M, k]`` with ``value`` (zero weights add nothing)."""
    if t.shape[1] == k:
        return t
    return torch.nn.functional.pad(t, (0, k - t.shape[1]), value=value)


# ---------------------------------------------------------------------- binding calls to the current context
def active_call(owner: CallOwner) -> CallState | BatchCall | None:
    """The call of ``owner``'s routed model in flight in this context (thread / task), if any."""
    return _ACTIVE.get().get(owner)


@contextlib.contextmanager
def activate(owner: CallOwner, call: CallState | BatchCall) -> Iterator[CallState | BatchCall]:
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
def _rebind(calls: Mapping[CallOwner, CallState | BatchCall]) -> Iterator[None]:
    token, again = _ACTIVE.set(calls), _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(again)
        _ACTIVE.reset(token)
