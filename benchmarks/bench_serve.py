"""`moerge serve` under load: N concurrent clients (1, 4, 16, 64) send a fixed number of greedy completions
(mixed models: arrow, phatgoose, base, one expert) to a real `moerge serve --demo` (the synthetic suite's base
model and library, built if not cached) in a process of its own. Batched (`--max-batch-size 64`: continuous
batching, one forward per decode step, prompts admitted together prefilled together) against the same server
decoding one request at a time (`--max-batch-size 1`), with the same requests (request i: model i mod 4, prompt
i mod 8, the same max_tokens, temperature 0); the completions of the two servers are checked equal. Throughput in
generated tokens/s, latency p50/p99.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --requests 64 --max-tokens 32

The clients run in this process (threads sharing one keep-alive connection pool), the server in a subprocess, so
client work does not take the server's interpreter lock.
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
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    load_before = os.getloadavg()[0]
    results: dict[tuple[str, int], tuple[float, list[float], list[str]]] = {}
    models: list[str] = []
    for mode, batch in (("one at a time", 1), ("batched", 64)):
        proc, url = start_server(batch, args.max_tokens)
        try:
            with httpx.Client(base_url=url, timeout=600,
                              limits=httpx.Limits(max_connections=max(levels))) as client:  # fmt: skip
                names = [m["id"] for m in client.get("/v1/models").json()["data"]]
                models = ["arrow", "phatgoose", "base", names[1]]  # names[1]: the first expert

                one = functools.partial(request, client, models, args.max_tokens)
                for i in range(len(models)):
                    one(i)  # warm-up: builds each model's router
                for n in levels:
                    t = time.perf_counter()
                    with ThreadPoolExecutor(n) as pool:
                        done = list(pool.map(one, range(args.requests)))
                    wall = time.perf_counter() - t
                    rate = sum(d[1] for d in done) / wall
                    results[(mode, n)] = (rate, sorted(d[0] for d in done), [d[2] for d in done])
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    same = all(results[("batched", n)][2] == results[("one at a time", n)][2] for n in levels)
    print(f"{args.requests} requests, max_tokens {args.max_tokens}, models {', '.join(models)}; "
          f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n")  # fmt: skip
    print("| clients | mode | tokens/s | p50 latency (s) | p99 latency (s) | speed-up |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in levels:
        base = results[("one at a time", n)][0]
        for mode in ("one at a time", "batched"):
            rate, lat, _ = results[(mode, n)]
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            print(
                f"| {n} | {mode} | {rate:.0f} | {statistics.median(lat):.3f} | {p99:.3f} | {rate / base:.2f}× |"
            )
    print(f"\ncompletions of the batched server equal the one-at-a-time server's: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
