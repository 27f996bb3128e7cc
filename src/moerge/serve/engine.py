"""Continuous batching at decode-step granularity: the requests in flight share one forward per step,
whatever their recipe, experts or length; requests join (after a prefill of their own) and leave between steps.

Prefill: the requests admitted together are prefilled in one forward, right-padded to the longest prompt
(causal attention: a prompt's tokens never see the padding after them, and each request's call is given its
own padded ids and mask, so an example-level router pools over the prompt alone, as in ``generate``).
KV cache: the batch keeps one ``DynamicCache`` (per layer ``[B, heads, L, head_dim]``, left-padded, with an
``[B, L]`` attention mask over the padding and each row's own position ids) across steps; a decode step appends
one column, a request joining (after its prefill) or leaving changes the rows, and the leading columns no row
uses any more are dropped. Routing: a request's `CallState` lives as long as the request; a forward over several
requests binds a `BatchCall` of their calls, so each row is routed by its own recipe in the one forward.
Greedy output equals ``moerge generate``'s; sampling is `moerge.model.generation.sample_next` (the function
``generate`` samples with), so a seeded request draws the tokens ``moerge generate`` draws with that seed.

Shutdown: `drain` refuses new requests and, past its deadline, ends those still running with a 503; `stop`
ends the thread. One engine thread runs the model; the HTTP layer submits `Request`s and reads their events from an asyncio
queue (``("delta", text)``, ``("done", finish_reason)``, ``("error", status, message)``).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.errors import MoergeError
from moerge.model.generation import cut_at_stop, encode_prompt, new_generator, sample_next
from moerge.routing.call import BatchCall, CallState, activate
from moerge.routing.inputs import RoutingInputs
from moerge.serve.catalog import Catalog, Route
from moerge.serve.config import ServeConfig
from moerge.serve.metrics import Metrics


class ServerBusyError(MoergeError):
    """The queue is full (HTTP 429 with Retry-After)."""


class RequestTooLargeError(MoergeError):
    """A prompt or max_tokens beyond the server's limits (HTTP 400)."""


@dataclass
class Sampling:
    """A request's decoding: greedy (temperature 0) or sampled with temperature / top_p, seeded or not."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Request:
    """One completion in flight: its prompt ids, route and sampling, and where its events go."""

    route: Route
    prompt_ids: torch.Tensor  # [1, P]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    record: bool = False
    # False: the text is sent once, when the request finishes (no wake-up of the event loop per token)
    stream: bool = True
    deadline: float = float("inf")
    cancelled: bool = False
    # filled by the engine
    call: CallState | None = None
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text sent
    text: str = ""
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    submitted: float = field(default_factory=time.monotonic)

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_ids.shape[1])

    def send(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def _mean_routing(self) -> torch.Tensor | None:
        """``[T, E]``: each position's expert weights averaged over the routed modules (None: no experts)."""
        recorded = self.call.routing() if self.call is not None else {}
        return torch.stack([w[0] for w in recorded.values()]).mean(0) if recorded else None

    def _served(self) -> list[int]:
        """The generated tokens an expert served (the eos that ends a completion is not one)."""
        return self.generated[: len(self.generated) - (self.finish_reason == "eos")]

    def expert_token_counts(self) -> torch.Tensor | None:
        """``[E]``: per expert, the generated tokens whose mean weight on it is > 0 (as `routing` lists them)."""
        mean = self._mean_routing()
        if mean is None:
            return None
        start = self.prompt_tokens - 1  # the forward at this position produced the first generated token
        return (mean[start : start + len(self._served())] > 0).sum(0)

    def routing(self, expert_names: list[str], top: int = 4) -> list[dict[str, Any]]:
        """Per generated token: the experts with the largest mean weight over the routed modules."""
        mean = self._mean_routing()  # [T, E]
        out = []
        for j, token in enumerate(self._served()):
            experts: dict[str, float] = {}
            pos = self.prompt_tokens - 1 + j  # the forward at this position produced token j
            if mean is not None and pos < mean.shape[0]:
                vals, idx = torch.topk(mean[pos], min(top, mean.shape[1]))
                experts = {expert_names[i]: round(float(v), 4) for v, i in zip(vals, idx.tolist()) if v > 0}
            out.append({"token_id": token, "experts": experts})
        return out


class Engine:
    """The batching loop over one `Catalog`: `submit` requests, `start` / `stop` the engine thread."""

    def __init__(self, catalog: Catalog, config: ServeConfig | None = None, metrics: Metrics | None = None):
        self.catalog = catalog
        self.config = config or ServeConfig()
        self.metrics = metrics or Metrics(catalog.expert_names)
        self.tokenizer = catalog.tokenizer
        self.model = catalog.model
        self.device = next(self.model.parameters()).device
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._draining = False
        self._drain_deadline = float("inf")
        self._thread: threading.Thread | None = None
        # the decode batch (engine thread only): rows in `_active`'s order
        self._cache: Any = None  # a transformers DynamicCache [B, heads, L, head_dim] per layer, left-padded
        self._mask: torch.Tensor | None = None  # [B, L]: 1 where a row has a cached position
        self._pos: torch.Tensor | None = None  # [B]: each row's next position (= its cached positions)
        # transformers 5.x names the cache argument `cache` (`past_key_values` before)
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        self.max_positions: int | None = int(limit) if limit else None

    # ------------------------------------------------------------------ from the HTTP layer
    def encode(self, prompt: str, chat: bool) -> torch.Tensor:
        return encode_prompt(self.tokenizer, prompt, chat)["input_ids"]

    def check_limits(self, prompt_ids: torch.Tensor, max_tokens: int) -> None:
        n = int(prompt_ids.shape[1])
        cfg = self.config
        if n > cfg.max_prompt_tokens:
            raise RequestTooLargeError(
                f"the prompt has {n} tokens; this server takes at most {cfg.max_prompt_tokens} (shorten it)"
            )
        if max_tokens > cfg.max_tokens_limit:
            raise RequestTooLargeError(
                f"max_tokens {max_tokens} is above this server's limit of {cfg.max_tokens_limit}"
            )
        if self.max_positions is not None and n + max_tokens > self.max_positions:
            raise RequestTooLargeError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceed the model's {self.max_positions} "
                "positions; shorten the prompt or lower max_tokens"
            )

    def submit(self, request: Request) -> None:
        """Queue ``request``; raises `ServerBusyError` when the queue is full."""
        with self._cond:
            if self._stopping or self._draining:
                raise ServerBusyError("the server is shutting down; retry on another replica")
            if len(self._waiting) >= self.config.max_queue:
                raise ServerBusyError(
                    f"the queue is full ({self.config.max_queue} requests waiting); retry after a second"
                )
            self._waiting.append(request)
            self.metrics.queue_depth = len(self._waiting)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Drop ``request`` (a client gone): its slot frees before the next step."""
        request.cancelled = True
        with self._cond:
            self._cond.notify()

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="moerge-serve-engine", daemon=True)
        self._thread.start()

    def drain(self, seconds: float) -> None:
        """Shutting down: take no new request; those still in flight or waiting after ``seconds`` are ended
        with a 503 (while their connections are still open) and the engine goes on idle until `stop`."""
        with self._cond:
            self._draining = True
            self._drain_deadline = time.monotonic() + seconds
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests; those in flight or waiting are ended with an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping or time.monotonic() > self._drain_deadline:
                    for r in [*self._waiting, *self._active]:
                        r.send("error", 503, "the server shut down before this request finished")
                    self._waiting.clear()
                    self._active, self._cache, self._mask, self._pos = [], None, None, None
                    self.metrics.active = self.metrics.queue_depth = 0
                    if self._stopping:
                        return
                    continue
                admitted = []
                while self._waiting and len(self._active) + len(admitted) < self.config.max_batch_size:
                    admitted.append(self._waiting.popleft())
                self.metrics.queue_depth = len(self._waiting)
            try:
                admitted = [r for r in admitted if self._alive(r)]
                for group in self._prefill_groups(admitted):
                    self._prefill(group)
                self._leave()
                if self._active:
                    self._step()
                    self._leave()
            except Exception as err:  # no request may take the server down: fail the batch, go on
                for r in [*admitted, *self._active]:
                    if r.finish_reason is None:
                        r.finish_reason = "error"
                        r.send("error", 500, f"internal error while generating: {type(err).__name__}: {err}")
                self._active, self._cache, self._mask, self._pos = [], None, None, None
            self.metrics.active = len(self._active)

    def _alive(self, r: Request) -> bool:
        if r.cancelled:
            self.metrics.cancelled += 1
            return False
        if time.monotonic() > r.deadline:
            r.finish_reason = "timeout"
            r.send(
                "error", 504, f"the request ran past the server's {self.config.request_timeout_s:g}s timeout"
            )
            return False
        return True

    def _prefill_groups(self, admitted: list[Request]) -> list[list[Request]]:
        """``admitted`` by prompt length (less padding), in groups of at most ``max_prefill_tokens`` padded
        tokens (a prompt longer than that alone)."""
        groups: list[list[Request]] = []
        for r in sorted(admitted, key=lambda r: r.prompt_tokens):
            if groups and (len(groups[-1]) + 1) * r.prompt_tokens <= self.config.max_prefill_tokens:
                groups[-1].append(r)
            else:
                groups.append([r])
        return groups

    # ------------------------------------------------------------------ model
    def _new_call(self, r: Request, ids: torch.Tensor, mask: torch.Tensor) -> CallState | None:
        router = r.route.router
        if router is None:
            return None
        return CallState(
            router,
            RoutingInputs(record=True),
            num_experts=self.catalog.num_experts,
            aggregation=r.route.aggregation,
            batch_size=1,
            input_ids=ids,
            attention_mask=mask,
            tokenizer=self.tokenizer,
        )

    @torch.no_grad()
    def _prefill(self, batch: list[Request]) -> None:
        """One forward over the prompts of ``batch`` (right-padded); the first token of each; the requests
        that go on join the decode batch."""
        lengths = [r.prompt_tokens for r in batch]
        T = max(lengths)
        ids = torch.full((len(batch), T), self._pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : lengths[i]] = r.prompt_ids[0]
            mask[i, : lengths[i]] = 1
            r.call = self._new_call(r, ids[i : i + 1], mask[i : i + 1])
            r.generator = new_generator(r.sampling.seed, self.device)
        calls = [r.call for r in batch]
        if len(batch) == 1:  # alone: the call itself, exactly as generate runs it
            ctx = activate(self.catalog.owner, calls[0]) if calls[0] is not None else _null()
        else:
            ctx = activate(self.catalog.owner, BatchCall(calls)) if any(calls) else _null()
        ids, mask = ids.to(self.device), mask.to(self.device)
        with ctx:
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=True)
        if len(batch) > 1:  # the recordings of the padding go
            for r, n in zip(batch, lengths):
                for chunks in r.call.recorded.values() if r.call is not None else ():
                    chunks[-1] = chunks[-1][:, :n]
        self.metrics.prompt_tokens += sum(lengths)
        for i, r in enumerate(batch):
            self._emit(r, out.logits[i, lengths[i] - 1])
        joining = [i for i, r in enumerate(batch) if r.finish_reason is None]
        if joining:
            kv = _kv_layers(_cache_of(out))
            self._join([batch[i] for i in joining], kv, [lengths[i] for i in joining], joining)

    def _join(self, rows: list[Request], kv: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int],
              index: list[int]) -> None:  # fmt: skip
        """Add prefilled ``rows`` (their keys/values: rows ``index`` of ``kv``, right-padded) to the batch."""
        from transformers import DynamicCache

        old = _kv_layers(self._cache) if self._cache is not None else None
        L_old = self._mask.shape[1] if self._mask is not None else 0
        L = max(L_old, *lengths)
        n = len(rows)
        layers = []
        for layer, (k, v) in enumerate(kv):
            K = k.new_zeros(n, k.shape[1], L, k.shape[3])
            V = v.new_zeros(n, v.shape[1], L, v.shape[3])
            for j, (i, p) in enumerate(zip(index, lengths)):
                K[j, :, L - p :] = k[i, :, :p]
                V[j, :, L - p :] = v[i, :, :p]
            if old is not None:
                k0, v0 = old[layer]
                K = torch.cat([_pad_left(k0, L - L_old, 2), K])
                V = torch.cat([_pad_left(v0, L - L_old, 2), V])
            layers.append((K, V))
        mask = torch.zeros(n, L, dtype=torch.long, device=self.device)
        for j, p in enumerate(lengths):
            mask[j, L - p :] = 1
        pos = torch.tensor(lengths, device=self.device)
        if self._mask is not None and self._pos is not None:
            mask = torch.cat([_pad_left(self._mask, L - L_old, 1), mask])
            pos = torch.cat([self._pos, pos])
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask, self._pos = mask, pos
        self._active.extend(rows)

    def _leave(self) -> None:
        """Drop finished, cancelled and timed-out rows from the batch (and the columns no row uses any more)."""
        keep = [i for i, r in enumerate(self._active) if r.finish_reason is None and self._alive(r)]
        if len(keep) == len(self._active):
            return
        if not keep:
            self._active, self._cache, self._mask, self._pos = [], None, None, None
            return
        from transformers import DynamicCache

        assert self._mask is not None and self._pos is not None
        idx = torch.tensor(keep, device=self.device)
        pos = self._pos.index_select(0, idx)
        start = self._mask.shape[1] - int(pos.max())  # columns before it are padding in every row left
        layers = [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:])
                  for k, v in _kv_layers(self._cache)]  # fmt: skip
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = self._mask.index_select(0, idx)[:, start:]
        self._pos = pos
        self._active = [self._active[i] for i in keep]

    @torch.no_grad()
    def _step(self) -> None:
        """One decode step: one forward over every row of the batch, one token each."""
        batch = self._active
        assert self._mask is not None and self._pos is not None
        B = len(batch)
        mask = torch.cat([self._mask, self._mask.new_ones(B, 1)], dim=1)
        ids = torch.tensor([[r.generated[-1]] for r in batch], device=self.device)
        calls = [r.call for r in batch]
        ctx = activate(self.catalog.owner, BatchCall(calls)) if any(calls) else _null()
        with ctx:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=self._pos[:, None],
                             use_cache=True, **{self._cache_arg: self._cache})  # fmt: skip
        self._cache = _cache_of(out)
        self._mask, self._pos = mask, self._pos + 1
        self.metrics.batch_sizes.append(B)
        logits = out.logits[:, -1]
        for i, r in enumerate(batch):
            self._emit(r, logits[i])

    def _emit(self, r: Request, logits: torch.Tensor) -> None:
        """Pick the next token from ``logits``, send the text it makes safe to send, and finish if done."""
        token = self._pick(r, logits)
        r.generated.append(token)
        self.metrics.completion_tokens += 1
        s = r.sampling
        if token == self.tokenizer.eos_token_id:
            r.finish_reason = "eos"
        else:
            text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
            text, hit = cut_at_stop(text, s.stop)
            r.text = text
            if hit is not None:
                r.finish_reason = "stop"
            elif len(r.generated) >= s.max_tokens:
                r.finish_reason = "length"
        hold = 0 if r.finish_reason else max((len(x) for x in s.stop), default=1) - 1
        safe = len(r.text) - hold
        while safe > r.emitted and r.text[safe - 1] == "\ufffd" and not r.finish_reason:
            safe -= 1  # an incomplete multi-byte character: wait for the rest
        if safe > r.emitted and (r.stream or r.finish_reason):
            r.send("delta", r.text[r.emitted : safe])
            r.emitted = safe
        if r.finish_reason:
            self.metrics.observe_routing(r)
            r.send("done", "stop" if r.finish_reason in ("eos", "stop") else "length")

    def _pick(self, r: Request, logits: torch.Tensor) -> int:
        s = r.sampling
        if s.temperature == 0:
            return int(logits.argmax())
        return int(sample_next(logits[None], s.temperature, s.top_p, 0, r.generator)[0])


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``t`` with ``n`` zeros before its first entry along ``dim``."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _kv_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(keys, values)`` ``[B, heads, T, head_dim]`` of a transformers cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):  # transformers < 4.56
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
