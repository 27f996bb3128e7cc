"""The HTTP layer: FastAPI routes in OpenAI's shapes over an `Engine`.

``POST /v1/completions`` and ``/v1/chat/completions`` (both with ``stream: true`` as server-sent events in
OpenAI's chunk format), ``GET /v1/models``, ``GET /health``, ``GET /metrics``. Extension fields: ``routing``
(recipe options over the model name's) and ``return_routing`` (a ``routing`` list in the response: per generated
token, the experts that served it). Errors are OpenAI-style bodies ``{"error": {"message", "type", "code"}}``:
400 bad input, 404 unknown model, 429 queue full (with ``Retry-After``), 504 timeout, 500 anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from moerge.errors import MoergeError
from moerge.serve.catalog import ModelNotFoundError
from moerge.serve.engine import Engine, Request, RequestTooLargeError, Sampling, ServerBusyError


class _Body(BaseModel):
    # Fields of OpenAI's API that change nothing here (user, logprobs=None, ...) are accepted and ignored.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1, description="one completion per request")
    stream: bool = False
    routing: dict[str, Any] | None = None
    return_routing: bool = False

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise HTTPError(400, "stop: at most 4 stop strings, none empty", param="stop")
        return stop


class CompletionBody(_Body):
    prompt: str | list[str]

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise HTTPError(400, "prompt: give one prompt per request (a string)", param="prompt")
            return self.prompt[0]
        return self.prompt


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def plain(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if any(part.get("type") != "text" for part in content):
                raise HTTPError(400, "messages: only text content parts are served", param="messages")
            content = "".join(str(part.get("text", "")) for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app over ``engine`` (started and stopped with the app's lifespan)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="moerge serve", lifespan=lifespan)
    catalog, metrics, config = engine.catalog, engine.metrics, engine.config

    @app.exception_handler(HTTPError)
    async def _http_error(_request: HTTPRequest, err: HTTPError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def _any_error(_request: HTTPRequest, err: Exception) -> JSONResponse:
        e = HTTPError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error")
        return JSONResponse(e.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queue": metrics.queue_depth, "in_flight": metrics.active}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "moerge"} for n in catalog.names()]
        return {"object": "list", "data": data}

    async def parse(request: HTTPRequest, cls: type[_Body]) -> Any:
        try:
            raw = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HTTPError(400, f"the request body is not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        try:
            return cls(**raw)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise HTTPError(400, f"{loc}: {first['msg']}", param=loc or None) from None

    def prepare(body: _Body, prompt: str | list[dict[str, str]]) -> tuple[Any, Any, Sampling]:
        """The route, prompt ids and sampling of a request (in a worker thread: may build a router)."""
        try:
            route = catalog.resolve(body.model, body.routing)
        except ModelNotFoundError as err:
            raise HTTPError(404, str(err), param="model", code="model_not_found") from None
        except MoergeError as err:
            raise HTTPError(400, str(err), param="routing" if body.routing else "model") from None
        if isinstance(prompt, str):
            ids = engine.encode(prompt, chat=False)
        else:
            tok = engine.tokenizer
            if not getattr(tok, "chat_template", None):
                raise HTTPError(
                    400,
                    "this model's tokenizer has no chat template; use /v1/completions with a plain prompt",
                    param="messages",
                )
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        max_tokens = body.max_completion_tokens or body.max_tokens or config.default_max_tokens
        try:
            engine.check_limits(ids, max_tokens)
        except RequestTooLargeError as err:
            raise HTTPError(400, str(err), param="prompt", code="context_length_exceeded") from None
        sampling = Sampling(max_tokens, body.temperature, body.top_p, body.seed, body.stops())
        return route, ids, sampling

    async def serve(request: HTTPRequest, cls: type[_Body], chat: bool) -> Any:
        started = time.monotonic()
        model = "?"
        try:
            body = await parse(request, cls)
            model = body.model
            prompt = [m.plain() for m in body.messages] if chat else body.text()
            route, ids, sampling = await run_in_threadpool(prepare, body, prompt)
            r = Request(route, ids, sampling, asyncio.get_running_loop(), asyncio.Queue(),
                        record=body.return_routing, stream=body.stream,
                        deadline=started + config.request_timeout_s)  # fmt: skip
            try:
                engine.submit(r)
            except ServerBusyError as err:
                raise HTTPError(429, str(err), kind="rate_limit_error", code="queue_full",
                                headers={"Retry-After": str(config.retry_after_s)}) from None  # fmt: skip
        except HTTPError as err:
            metrics.observe_request(model, err.status)
            raise
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(
                stream(request, r, rid, model, chat, body.return_routing, started),
                media_type="text/event-stream",
            )
        text, finish = [], None
        try:
            while finish is None:
                try:
                    event = await asyncio.wait_for(r.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(r)
                        metrics.observe_request(model, 499)
                        return JSONResponse({}, status_code=499)
                    continue
                if event[0] == "delta":
                    text.append(event[1])
                elif event[0] == "done":
                    finish = event[1]
                else:
                    raise HTTPError(event[1], event[2], kind="server_error" if event[1] >= 500 else "timeout")
        except HTTPError as err:
            metrics.observe_request(model, err.status)
            raise
        except BaseException:
            engine.cancel(r)
            raise
        metrics.observe_request(model, 200, time.monotonic() - started)
        out = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": out}
        else:
            choice["text"] = out
        result = {
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(r),
        }  # fmt: skip
        if body.return_routing:
            result["routing"] = routing(r)
        return result

    def usage(r: Request) -> dict[str, int]:
        n = len(r.generated)
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": n, "total_tokens": r.prompt_tokens + n}

    def routing(r: Request) -> list[dict[str, Any]]:
        rows = r.routing(catalog.expert_names)
        for row in rows:
            row["token"] = engine.tokenizer.decode([row["token_id"]])
        return rows

    async def stream(request: HTTPRequest, r: Request, rid: str, model: str, chat: bool, with_routing: bool,
                     started: float) -> AsyncIterator[str]:  # fmt: skip
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, **extra: Any) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            data = {
                "id": rid,
                "object": kind,
                "created": created,
                "model": model,
                "choices": [choice],
                **extra,
            }
            return f"data: {json.dumps(data)}\n\n"

        done = False
        try:
            if chat:
                yield chunk(None, None).replace(
                    '"delta": {}', '"delta": {"role": "assistant", "content": ""}'
                )
            while True:
                event = await r.events.get()
                if event[0] == "delta":
                    if await request.is_disconnected():
                        return  # uvicorn drops writes to a closed connection silently: ask, and free the slot
                    yield chunk(event[1], None)
                elif event[0] == "done":
                    extra: dict[str, Any] = {"usage": usage(r)}
                    if with_routing:
                        extra["routing"] = routing(r)
                    yield chunk(None, event[1], **extra)
                    yield "data: [DONE]\n\n"
                    metrics.observe_request(model, 200, time.monotonic() - started)
                    done = True
                    return
                else:
                    err = HTTPError(event[1], event[2], kind="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    metrics.observe_request(model, event[1])
                    done = True
                    return
        finally:
            if not done:  # the client went away mid-stream: free the slot
                engine.cancel(r)
                metrics.observe_request(model, 499)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        return await serve(request, CompletionBody, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        return await serve(request, ChatBody, chat=True)

    return app


def run(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve ``engine`` with uvicorn until SIGINT/SIGTERM. On SIGTERM uvicorn stops taking connections and gives
    in-flight requests 10 s; the engine ends those still running after 9 s with a 503; the process exits 0."""
    import signal
    import threading

    import uvicorn

    grace = 10

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            # uvicorn gives in-flight requests `grace` s, then cuts their connections: the engine ends the
            # requests still running a second before, so that their clients get a 503 rather than a cut
            engine.drain(grace - 1)
            await super().shutdown(sockets)

    config = uvicorn.Config(create_app(engine), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=grace)  # fmt: skip
    server = Server(config)
    # uvicorn raises the SIGTERM it shut down on again once done (killing the process, status 143); the
    # shutdown was graceful, so that second one is ignored and the command returns (status 0)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        server.run()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
