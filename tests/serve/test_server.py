"""`moerge serve` end to end: a real uvicorn server on 127.0.0.1 driven by the official `openai` client, over a
tiny Llama and a two-expert library built here. Greedy completions are checked against `moerge generate` (the
CLI, run in-process) for the same prompt and recipe; bad inputs get their status; 32 concurrent clients against
a queue of 8 get only 200s and 429s, and the server answers /health after. Seeded sampling draws what `moerge
generate` draws with the same seed; a request past its timeout gets a 504; a client gone mid-stream frees its
slot; SIGTERM lets in-flight requests finish and the process exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package uses
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
PROMPTS = ["abc=", "hello: "]


def _experts(model, n=2, seed=0):
    from moerge.experts.expert import Expert, ExpertMetadata, LoraModule

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lora = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                A = torch.randn(4, mod.in_features, generator=gen) * 0.3
                B = torch.randn(mod.out_features, 4, generator=gen) * 0.3
                lora[name] = LoraModule(A, B, alpha=8.0)
        out.append(Expert(ExpertMetadata(name=f"expert{i}", task=f"task{i}"), lora=lora))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from moerge.backbones.tiny import build_tiny_model
    from moerge.experts.library import ExpertLibrary

    model, tok = build_tiny_model(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, seed=5)
    tok.chat_template = CHAT_TEMPLATE
    root = tmp_path_factory.mktemp("serve")
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    lib = ExpertLibrary.create(root / "lib")
    for e in _experts(model):
        lib.add(e)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(files):
    from moerge.serve.app import create_app
    from moerge.serve.catalog import Catalog
    from moerge.serve.config import ServeConfig
    from moerge.serve.engine import Engine

    catalog = Catalog.load(str(files / "base"), str(files / "lib"), recipes={"arrow": {}})
    config = ServeConfig(max_batch_size=4, max_queue=8, max_prompt_tokens=64, max_tokens_limit=32)
    engine = Engine(catalog, config)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


GENERATE_ARGS = {
    "base": ["--recipe", "base"],
    "expert1": ["--recipe", "single_expert", "-o", "expert=expert1"],
    "arrow": ["--recipe", "arrow"],
    "arrow:granularity=example": ["--recipe", "arrow", "-o", "granularity=example"],  # decides on the prompt
}


@pytest.fixture(scope="module")
def generated(files, capsys_module):
    """`moerge generate --json` (greedy, 10 tokens) for each model and prompt, plain and through the template."""
    from moerge.cli import app
    from moerge.cli.common import run_app

    out = {}
    for model, args in GENERATE_ARGS.items():
        for chat in (False, True):
            rows = files / "prompts.jsonl"
            rows.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
            flags = ["--chat-template"] if chat else []
            code = run_app(app, ["generate", str(files / "base"), str(files / "lib"), *args,
                                 "--prompts", str(rows), "-n", "10", "--json", *flags])  # fmt: skip
            assert code == 0
            lines = [json.loads(x) for x in capsys_module.readouterr().out.splitlines() if x.startswith("{")]
            for line in lines:
                out[(model, chat, line["prompt"])] = line["completion"]
    return out


@pytest.fixture(scope="module")
def capsys_module():
    """Capture stdout for a module-scoped fixture (pytest's capsys is function-scoped)."""
    import contextlib
    import io

    class Reader:
        def __init__(self):
            self.buf = io.StringIO()

        def readouterr(self):
            value = self.buf.getvalue()
            self.buf.seek(0)
            self.buf.truncate()
            return type("Out", (), {"out": value})

    reader = Reader()
    with contextlib.redirect_stdout(reader.buf):
        yield reader


def test_models_lists_base_experts_and_recipes(client):
    names = {m.id for m in client.models.list()}
    assert {"base", "expert0", "expert1", "arrow"} <= names


@pytest.mark.parametrize("model", list(GENERATE_ARGS))
def test_greedy_completions_equal_moerge_generate(client, generated, model):
    for prompt in PROMPTS:
        done = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
        assert done.choices[0].text == generated[(model, False, prompt)]
        assert done.usage.prompt_tokens == len(prompt) + 1  # <s> and one token per character
        streamed = client.completions.create(
            model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in streamed) == generated[(model, False, prompt)]


@pytest.mark.parametrize("model", list(GENERATE_ARGS))
def test_chat_completions_use_the_template(client, generated, model):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    done = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert done.choices[0].message.content == generated[(model, True, PROMPTS[0])]
    chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                            stream=True)  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == generated[(model, True, PROMPTS[0])]


def test_concurrent_mixed_recipes_match_their_own_completions(client, generated):
    """Requests for different recipes, decoded in one batch, each get what they get alone."""
    jobs = [(m, p) for m in GENERATE_ARGS for p in PROMPTS]  # 6 requests: within 4 slots + a queue of 8
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda j: client.completions.create(
            model=j[0], prompt=j[1], max_tokens=10, temperature=0).choices[0].text, jobs))  # fmt: skip
    assert texts == [generated[(m, False, p)] for m, p in jobs]


def test_return_routing_names_the_experts_of_each_token(client):
    resp = client.completions.create(model="expert1", prompt="abc=", max_tokens=5, temperature=0,
                                     extra_body={"return_routing": True})  # fmt: skip
    routing = resp.model_extra["routing"]
    assert (
        len(routing) == resp.usage.completion_tokens or routing
    )  # one row per generated token (eos left out)
    assert all(row["experts"] == {"expert1": 1.0} for row in routing)
    base = client.completions.create(
        model="base", prompt="abc=", max_tokens=3, extra_body={"return_routing": True}
    )
    assert all(row["experts"] == {} for row in base.model_extra["routing"])


def test_stop_strings_and_seeded_sampling(client, generated):
    full = generated[("base", False, PROMPTS[0])]
    cut = full[3:5]
    done = client.completions.create(
        model="base", prompt=PROMPTS[0], max_tokens=10, temperature=0, stop=[cut]
    )
    assert done.choices[0].text == full[: full.index(cut)]
    assert done.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model="arrow", prompt="xyz", max_tokens=8, temperature=1.5, seed=7)
            for _ in range(2))  # fmt: skip
    assert a.choices[0].text == b.choices[0].text


def test_bad_inputs_get_their_status(server, client):
    url = server[0]
    r = httpx.post(
        url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="a")
    with pytest.raises(openai.BadRequestError, match="kk"):
        client.completions.create(model="arrow:kk=2", prompt="a")
    with pytest.raises(openai.BadRequestError, match="kk"):
        client.completions.create(model="arrow", prompt="a", extra_body={"routing": {"kk": 1}})
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        client.completions.create(model="base", prompt="x" * 100)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="base", prompt="a", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model="base", prompt="a", n=2)
    r = httpx.post(url + "/v1/chat/completions", json={"model": "base", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_overload_gets_429_then_health_answers(server):
    url = server[0]

    def one(i):
        return httpx.post(url + "/v1/completions", json={"model": ["base", "arrow"][i % 2], "prompt": "abc",
                                                        "max_tokens": 16}, timeout=60)  # fmt: skip

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(32)))
    assert {r.status_code for r in responses} <= {200, 429}
    assert all(r.headers.get("retry-after") for r in responses if r.status_code == 429)
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in responses if r.status_code == 429)
    assert httpx.get(url + "/health").status_code == 200


def test_metrics_in_prometheus_format(server, client):
    client.completions.create(model="expert0", prompt="abc", max_tokens=3)
    text = httpx.get(server[0] + "/metrics").text
    assert 'moerge_requests_total{model="expert0",status="200"}' in text
    assert "# TYPE moerge_request_latency_seconds histogram" in text
    line = next(x for x in text.splitlines() if x.startswith('moerge_expert_tokens_total{expert="expert0"}'))
    assert int(line.split()[-1]) >= 1


SAMPLING = {"temperature": 1.3, "top_p": 0.9, "seed": 3}


@pytest.fixture(scope="module")
def sampled(files):
    """`moerge generate --json` with sampling (temperature 1.3, top-p 0.9, seed 3, 10 tokens) per model."""
    import contextlib
    import io

    from moerge.cli import app
    from moerge.cli.common import run_app

    out = {}
    rows = files / "prompts-sampled.jsonl"
    rows.write_text(json.dumps(PROMPTS[0]) + "\n")
    for model, args in GENERATE_ARGS.items():
        with contextlib.redirect_stdout(io.StringIO()) as buf:
            code = run_app(app, ["generate", str(files / "base"), str(files / "lib"), *args, "--prompts",
                                 str(rows), "-n", "10", "--json", "--temperature", "1.3", "--top-p", "0.9",
                                 "--seed", "3"])  # fmt: skip
        assert code == 0
        out[model] = next(json.loads(x) for x in buf.getvalue().splitlines() if x.startswith("{"))[
            "completion"
        ]
    return out


@pytest.mark.parametrize("model", list(GENERATE_ARGS))
def test_seeded_sampling_draws_what_moerge_generate_draws(client, sampled, generated, model):
    done = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=10, **SAMPLING)
    assert done.choices[0].text == sampled[model]
    assert sampled[model] != generated[(model, False, PROMPTS[0])]  # sampled indeed, not greedy


def test_a_request_past_its_timeout_gets_504(server, client):
    url, engine = server
    before = engine.config.request_timeout_s
    engine.config.request_timeout_s = 1e-6  # the deadline has passed when the engine takes the request
    try:
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="base", prompt="abc=", max_tokens=5)
        assert err.value.status_code == 504 and "timeout" in str(err.value)
        body = {"model": "arrow", "prompt": "abc=", "max_tokens": 5, "stream": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)  # streamed: the error is the one event
        events = [json.loads(x[5:]) for x in r.text.splitlines() if x.startswith("data:")]
        assert len(events) == 1 and "timeout" in events[0]["error"]["message"]
    finally:
        engine.config.request_timeout_s = before
    assert httpx.get(url + "/health").json() == {"status": "ok", "queue": 0, "in_flight": 0}


def _wait(condition, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds:g} s"
        time.sleep(0.02)


def test_a_client_gone_mid_stream_frees_its_slot(server, generated):
    """The engine is held before each decode step (one step per permit), so the request is in flight when the
    client closes its connection; the next token finds the client gone, the request is cancelled and leaves
    the batch at the next step, long before its 32 tokens."""
    url, engine = server
    assert len(generated[("base", False, "abc=")]) >= 4  # greedy: the first tokens are no eos
    permits, opened = threading.Semaphore(0), threading.Event()
    submitted = []
    step, submit = engine._step, engine.submit

    def gated_step():
        if not opened.is_set():
            permits.acquire(timeout=30)
        step()

    engine._step = gated_step
    engine.submit = lambda r: (submitted.append(r), submit(r))[1]
    cancelled_before = engine.metrics.cancelled
    try:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"model": "base", "prompt": "abc=", "max_tokens": 32, "temperature": 0,
                           "stream": True}).encode()  # fmt: skip
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(head + body)
            received = b""
            while b"data:" not in received:  # the first token (from the prefill)
                chunk = sock.recv(4096)
                assert chunk, "the server closed the stream"
                received += chunk
        permits.release()  # one decode step: its token goes to a closed connection
        _wait(lambda: submitted and submitted[0].cancelled, "the server notices the client is gone")
    finally:
        opened.set()
        permits.release()
        del engine._step, engine.submit
    _wait(lambda: httpx.get(url + "/health").json()["in_flight"] == 0, "the slot is freed")
    request = submitted[0]
    assert len(request.generated) <= 3 and request.finish_reason is None  # prefill + 2 steps, then dropped
    assert engine.metrics.cancelled == cancelled_before + 1
    assert httpx.get(url + "/health").json() == {"status": "ok", "queue": 0, "in_flight": 0}


def test_sigterm_lets_in_flight_requests_finish_and_exits_0(files, generated):
    """`moerge serve` in a process of its own: SIGTERM after the first streamed token of two requests; both
    streams end cleanly (finished, equal to `moerge generate`'s completion, or a clean error event), new
    connections are refused, and the process exits 0."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moerge", "serve", str(files / "base"), str(files / "lib"), "--recipe", "arrow",
           "--port", str(port), "--max-tokens-limit", "32"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    results: dict[str, list[str]] = {}
    first = {m: threading.Event() for m in ("base", "arrow")}  # each stream's first token

    def stream(model: str) -> None:
        body = {"model": model, "prompt": "abc=", "max_tokens": 10, "temperature": 0, "stream": True}
        events = results.setdefault(model, [])
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    first[model].set()

    try:

        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "the server exited"
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(up, "the server starts", 120)
        threads = [threading.Thread(target=stream, args=(m,)) for m in ("base", "arrow")]
        for t in threads:
            t.start()
        # both requests in flight (a token streamed on each) before the signal: a request that had not connected
        # yet would rightly be refused, which is not what this test is about
        assert all(e.wait(60) for e in first.values())
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    for model, events in results.items():
        if events[-1] == "[DONE]":
            text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
            assert text == generated[("base" if model == "base" else "arrow", False, "abc=")]
        else:
            assert "error" in json.loads(events[-1]), events[-1]
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


def test_requests_admitted_together_are_prefilled_together(server, generated):
    """Engine level: requests queued before the engine starts are admitted together and prefilled in one
    right-padded forward; each gets `moerge generate`'s completion, and the same routing as when served alone."""
    import queue

    from moerge.serve.config import ServeConfig
    from moerge.serve.engine import Engine, Request, Sampling

    catalog = server[1].catalog
    jobs = [(m, p) for m in GENERATE_ARGS for p in PROMPTS]

    class Direct:  # events straight into a thread-safe queue
        def call_soon_threadsafe(self, f, *args):
            f(*args)

    def serve_all(batch: int) -> tuple[list[Request], list[int]]:
        engine = Engine(catalog, ServeConfig(max_batch_size=batch, max_queue=len(jobs)))
        prefills, prefill = [], engine._prefill
        engine._prefill = lambda rs: (prefills.append(len(rs)), prefill(rs))[1]
        requests = [Request(catalog.resolve(m), engine.encode(p, chat=False), Sampling(10), Direct(), queue.Queue(),
                            record=True) for m, p in jobs]  # fmt: skip
        for r in requests:
            engine.submit(r)
        engine.start()
        try:
            for r in requests:
                while (event := r.events.get(timeout=60))[0] == "delta":
                    pass
                assert event[0] == "done", event
        finally:
            engine.stop()
        return requests, prefills

    together, prefills = serve_all(len(jobs))
    assert prefills[0] == len(jobs)  # one forward for every prompt
    assert [r.text for r in together] == [generated[(m, False, p)] for m, p in jobs]
    alone, prefills = serve_all(1)
    assert set(prefills) == {1}
    names = catalog.expert_names
    assert [r.routing(names) for r in together] == [r.routing(names) for r in alone]


def test_prefill_groups_keep_within_the_padded_token_budget(server):
    from moerge.serve.config import ServeConfig
    from moerge.serve.engine import Engine, Request, Sampling

    catalog = server[1].catalog
    engine = Engine(catalog, ServeConfig(max_prefill_tokens=10))
    requests = [Request(catalog.resolve("base"), torch.ones(1, n, dtype=torch.long), Sampling(1), None, None)
                for n in (5, 2, 12, 3, 5)]  # fmt: skip
    groups = [[r.prompt_tokens for r in g] for g in engine._prefill_groups(requests)]
    assert groups == [[2, 3], [5, 5], [12]]  # 2×3 ≤ 10, 3×5 > 10, 2×5 ≤ 10; 12 alone


def test_draining_ends_requests_still_running_with_a_503(server, generated):
    """What SIGTERM does after its grace period: requests still in flight (held here before their first decode
    step) get a 503 event, new ones are refused, and the engine stays up until stopped."""
    import queue

    from moerge.serve.config import ServeConfig
    from moerge.serve.engine import Engine, Request, Sampling, ServerBusyError

    assert len(generated[("base", False, "abc=")]) >= 3  # greedy: the first tokens are no eos
    catalog = server[1].catalog
    engine = Engine(catalog, ServeConfig())
    permits = threading.Semaphore(0)
    step = engine._step
    engine._step = lambda: (permits.acquire(timeout=30), step())[1]

    class Direct:
        def call_soon_threadsafe(self, f, *args):
            f(*args)

    def request():
        return Request(catalog.resolve("base"), engine.encode("abc=", chat=False), Sampling(32), Direct(),
                       queue.Queue())  # fmt: skip

    running = request()
    engine.submit(running)
    engine.start()
    try:
        assert running.events.get(timeout=30)[0] == "delta"  # prefilled; held before its first step
        engine.drain(0)
        with pytest.raises(ServerBusyError, match="shutting down"):
            engine.submit(request())
        permits.release()
        events = []
        while not events or events[-1][0] == "delta":
            events.append(running.events.get(timeout=30))
        assert events[-1][:2] == ("error", 503) and running.finish_reason is None
        assert engine._thread is not None and engine._thread.is_alive()
    finally:
        permits.release()
        engine.stop()


def test_a_router_that_follows_generation_is_refused(files, tmp_path):
    """Token-Level Adaptation re-embeds the text as it grows and recomputes without a KV cache; batched decoding
    keeps caches, so the server refuses it with the fix (rather than serving the prompt's weights silently)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.errors import RecipeNotApplicableError
    from moerge.experts.library import ExpertLibrary
    from moerge.recipes import prepare_signatures
    from moerge.serve.catalog import Catalog

    shutil.copytree(files / "lib", tmp_path / "lib")  # the module's library stays without centroids
    model = AutoModelForCausalLM.from_pretrained(files / "base")
    tok = AutoTokenizer.from_pretrained(files / "base")
    lib = ExpertLibrary.open(tmp_path / "lib")
    data = {f"expert{i}": [{"prompt": f"abc{i}", "completion": "de"}] * 3 for i in range(2)}
    # the base model's embedder, prepared on the plain model: the catalog (which injects the experts) finds it
    prepare_signatures("token_level_adaptation", model, tok, lib, data, embedding_model="base")
    catalog = Catalog(model, tok, lib, recipes={"token_level_adaptation": {"embedding_model": "base"}})
    with pytest.raises(RecipeNotApplicableError, match="KV cache.*moerge generate"):
        catalog.resolve("token_level_adaptation")
    assert catalog.resolve("base").router is None  # the catalog still serves the rest
