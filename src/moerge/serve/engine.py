"""Continuous batching at decode-step granularity: the requests in flight share one forward per step,
whatever their recipe, experts or length; requests join (after a prefill of their own) and leave between steps.

KV cache: each request keeps its own keys/values (``[1, heads, capacity, head_dim]`` per layer, written in
place); a decode step stacks them, left-padded to the longest, into one ``DynamicCache`` with an attention
mask over the padding and each request's own position ids, and writes the new position back. Routing: a
request's `CallState` lives as long as the request (its prefill is a call of its own, so an example-level
router decides on the prompt exactly as in ``generate``); a decode step binds a `BatchCall` of the requests'
calls, so each row is routed by its own recipe in the one forward. Greedy output equals ``moerge generate``'s.

One engine thread runs the model; the HTTP layer submits `Request`s and reads their events from an asyncio
queue (``("delta", text)``, ``("done", finish_reason)``, ``("error", status, message)``).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.errors import MoergeError
from moerge.model.generation import cut_at_stop, encode_prompt
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
    deadline: float = float("inf")
    cancelled: bool = False
    # filled by the engine
    call: CallState | None = None
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # cached positions
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

    def routing(self, expert_names: list[str], top: int = 4) -> list[dict[str, Any]]:
        """Per generated token: the experts with the largest mean weight over the routed modules."""
        recorded = self.call.routing() if self.call is not None else {}
        mean = torch.stack([w[0] for w in recorded.values()]).mean(0) if recorded else None  # [T, E]
        out = []
        for j, token in enumerate(self.generated[: len(self.generated) - (self.finish_reason == "eos")]):
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
        self._thread: threading.Thread | None = None
        self.batched = True  # False: one request at a time (the benchmark's baseline)
        # transformers 5.x names the cache argument `cache` (`past_key_values` before)
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
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
            if self._stopping:
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
                if self._stopping:
                    for r in [*self._waiting, *self._active]:
                        r.send("error", 503, "the server shut down before this request finished")
                    self._waiting.clear()
                    self._active.clear()
                    return
                slots = self.config.max_batch_size if self.batched else 1
                admitted = []
                while self._waiting and len(self._active) + len(admitted) < slots:
                    admitted.append(self._waiting.popleft())
                self.metrics.queue_depth = len(self._waiting)
            try:
                for r in admitted:
                    if self._alive(r):
                        self._prefill(r)
                self._active.extend(r for r in admitted if r.finish_reason is None and not r.cancelled)
                self._active = [r for r in self._active if self._alive(r)]
                if self._active:
                    self._step(self._active)
                    self._active = [r for r in self._active if r.finish_reason is None]
            except Exception as err:  # no request may take the server down: fail the batch, go on
                for r in [*admitted, *self._active]:
                    if r.finish_reason is None:
                        r.finish_reason = "error"
                        r.send("error", 500, f"internal error while generating: {type(err).__name__}: {err}")
                self._active = []
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

    # ------------------------------------------------------------------ model
    def _new_call(self, r: Request) -> CallState | None:
        router = r.route.router
        if router is None:
            return None
        return CallState(
            router,
            RoutingInputs(record=True),
            num_experts=self.catalog.num_experts,
            aggregation=r.route.aggregation,
            batch_size=1,
            input_ids=r.prompt_ids,
            attention_mask=torch.ones_like(r.prompt_ids),
            tokenizer=self.tokenizer,
        )

    @torch.no_grad()
    def _prefill(self, r: Request) -> None:
        ids = r.prompt_ids.to(self.device)
        r.call = self._new_call(r)
        seed = r.sampling.seed if r.sampling.seed is not None else random.getrandbits(63)
        r.generator = torch.Generator().manual_seed(seed)
        ctx = activate(self.catalog.owner, r.call) if r.call is not None else _null()
        with ctx:
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        capacity = r.prompt_tokens + r.sampling.max_tokens
        for k, v in _kv_layers(_cache_of(out)):
            keys = k.new_zeros(1, k.shape[1], capacity, k.shape[3])
            values = v.new_zeros(1, v.shape[1], capacity, v.shape[3])
            keys[:, :, : k.shape[2]] = k
            values[:, :, : v.shape[2]] = v
            r.keys.append(keys)
            r.values.append(values)
        r.length = r.prompt_tokens
        self.metrics.prompt_tokens += r.prompt_tokens
        self._emit(r, out.logits[0, -1])

    @torch.no_grad()
    def _step(self, batch: list[Request]) -> None:
        from transformers import DynamicCache

        B = len(batch)
        L = max(r.length for r in batch)
        layers = []
        for layer in range(len(batch[0].keys)):
            k0 = batch[0].keys[layer]
            K = k0.new_zeros(B, k0.shape[1], L, k0.shape[3])
            V = K.clone()
            for i, r in enumerate(batch):
                K[i, :, L - r.length :] = r.keys[layer][0, :, : r.length]
                V[i, :, L - r.length :] = r.values[layer][0, :, : r.length]
            layers.append((K, V))
        mask = torch.ones(B, L + 1, dtype=torch.long, device=self.device)
        for i, r in enumerate(batch):
            mask[i, : L - r.length] = 0
        ids = torch.tensor([[r.generated[-1]] for r in batch], device=self.device)
        positions = torch.tensor([[r.length] for r in batch], device=self.device)
        cache = DynamicCache(ddp_cache_data=layers)
        calls = [r.call for r in batch]
        ctx = activate(self.catalog.owner, BatchCall(calls)) if any(calls) else _null()
        with ctx:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        for layer, (k, v) in enumerate(_kv_layers(_cache_of(out))):
            for i, r in enumerate(batch):
                r.keys[layer][0, :, r.length] = k[i, :, -1]
                r.values[layer][0, :, r.length] = v[i, :, -1]
        self.metrics.batch_sizes.append(B)
        for i, r in enumerate(batch):
            r.length += 1
            self._emit(r, out.logits[i, -1])

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
        if safe > r.emitted:
            r.send("delta", r.text[r.emitted : safe])
            r.emitted = safe
        if r.finish_reason:
            self.metrics.observe_routing(r)
            r.send("done", "stop" if r.finish_reason in ("eos", "stop") else "length")

    def _pick(self, r: Request, logits: torch.Tensor) -> int:
        s = r.sampling
        if s.temperature == 0:
            return int(logits.argmax())
        # transformers' own warpers, in generate's order (temperature, then top-p), then one draw
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        scores = logits.float()[None]
        scores = TemperatureLogitsWarper(s.temperature)(None, scores)
        if s.top_p < 1.0:
            scores = TopPLogitsWarper(s.top_p)(None, scores)
        probs = torch.softmax(scores, -1)
        return int(torch.multinomial(probs, 1, generator=r.generator)[0, 0])


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
