"""`moerge serve` under load: N concurrent clients (1, 4, 16, 64) send a fixed number of greedy completions
(mixed models: arrow, phatgoose, base, one expert) to a real `moerge serve --demo` (the synthetic suite's base
model and library, built if not cached) in a process of its own. Batched (`--max-batch-size 64`: continuous
batching, one forward per decode step, prompts admitted together prefilled together) against the same server
decoding one request at a time (`--max-batch-size 1`). Both are up at once and each level runs on the two back to
back, alternating which goes first, `--repeats` times (medians reported), so that the machine's changing load
falls on both alike. The same requests (request i: model i mod 4, prompt i mod 8, the same max_tokens,
temperature 0); the completions of the two servers are checked equal. Throughput in generated tokens/s, latency
p50/p99 over every run.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --requests 64 --max-tokens 32

The clients run in this process (threads sharing one keep-alive connection pool per server), the servers in
processes of their own, so client work does not take a server's interpreter lock.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx

PROMPTS = ["abc=", "hello world:", "12+7=", "zyx", "cipher: abc ->", "qwerty", "lorem ipsum", "x"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(batch: int, max_tokens: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "moerge", "serve", "--demo", "--port", str(port), "--max-batch-size",
           str(batch), "--max-queue", "1024", "--max-tokens-limit", str(max_tokens)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start in 120 s")


def request(client: httpx.Client, models: list[str], max_tokens: int, i: int) -> tuple[float, int, str]:
    """Request ``i``: model i mod 4, prompt i mod 8, greedy; (latency, completion tokens, text)."""
    t = time.perf_counter()
    body = {"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
            "temperature": 0}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    r.raise_for_status()
    out = r.json()
    return time.perf_counter() - t, out["usage"]["completion_tokens"], out["choices"][0]["text"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each level and mode, alternated")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    modes = {"one at a time": 1, "batched": 64}
    load_before = os.getloadavg()[0]
    rates: dict[tuple[str, int], list[float]] = {(m, n): [] for m in modes for n in levels}
    latencies: dict[tuple[str, int], list[float]] = {(m, n): [] for m in modes for n in levels}
    texts: dict[tuple[str, int], list[str]] = {}
    servers = {mode: start_server(batch, args.max_tokens) for mode, batch in modes.items()}
    try:
        clients = {mode: httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=max(levels)))
                   for mode, (_, url) in servers.items()}  # fmt: skip
        names = [m["id"] for m in clients["batched"].get("/v1/models").json()["data"]]
        models = ["arrow", "phatgoose", "base", names[1]]  # names[1]: the first expert
        send = {mode: functools.partial(request, c, models, args.max_tokens) for mode, c in clients.items()}
        for mode in modes:
            for i in range(len(models)):
                send[mode](i)  # warm-up: builds each model's router
        # both servers are up (an idle one takes no CPU); each level runs the two modes back to back,
        # alternating which goes first, so that a change in the machine's load falls on both alike
        for n in levels:
            for rep in range(args.repeats):
                for mode in list(modes)[:: 1 if rep % 2 == 0 else -1]:
                    t = time.perf_counter()
                    with ThreadPoolExecutor(n) as pool:
                        done = list(pool.map(send[mode], range(args.requests)))
                    rates[(mode, n)].append(sum(d[1] for d in done) / (time.perf_counter() - t))
                    latencies[(mode, n)] += [d[0] for d in done]
                    texts[(mode, n)] = [d[2] for d in done]
        for c in clients.values():
            c.close()
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(30)
    same = all(texts[("batched", n)] == texts[("one at a time", n)] for n in levels)
    print(f"{args.requests} requests × {args.repeats} runs per level and mode, max_tokens {args.max_tokens}, "
          f"models {', '.join(models)}; 1-minute load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after\n")  # fmt: skip
    print(
        "| clients | mode | tokens/s (median) | p50 latency (s) | p99 latency (s) | speed-up | speed-up per run |"
    )
    print("|---:|---|---:|---:|---:|---:|---|")
    for n in levels:
        base = statistics.median(rates[("one at a time", n)])
        for mode in modes:
            rate = statistics.median(rates[(mode, n)])
            lat = sorted(latencies[(mode, n)])
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            runs = ", ".join(f"{a / b:.2f}" for a, b in zip(rates[(mode, n)], rates[("one at a time", n)]))
            print(f"| {n} | {mode} | {rate:.0f} | {statistics.median(lat):.3f} | {p99:.3f} | {rate / base:.2f}× "
                  f"| {runs} |")  # fmt: skip
    print(f"\ncompletions of the batched server equal the one-at-a-time server's: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
