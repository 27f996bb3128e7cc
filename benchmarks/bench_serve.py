"""`moerge serve` under load: N concurrent clients (1, 4, 16, 64) send a fixed number of greedy completions
(mixed models: arrow, phatgoose, base, one expert) to a real uvicorn server over the demo suite (the synthetic
suite's base model and library, built if not cached). Batched (continuous batching, one forward per decode step)
against the same server decoding one request at a time. Throughput in generated tokens/s, latency p50/p99.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --requests 64 --max-tokens 32
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import uvicorn

from moerge.bench.suites.synthetic import SyntheticSuiteConfig, build_synthetic_suite
from moerge.serve.app import create_app
from moerge.serve.catalog import Catalog
from moerge.serve.config import ServeConfig
from moerge.serve.engine import Engine

PROMPTS = ["abc=", "hello world:", "12+7=", "zyx", "cipher: abc ->", "qwerty", "lorem ipsum", "x"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,4,16,64")
    args = ap.parse_args()
    suite = build_synthetic_suite(SyntheticSuiteConfig())
    catalog = Catalog.load(suite.base_model, suite.library)
    models = ["arrow", "phatgoose", "base", catalog.expert_names[0]]
    engine = Engine(catalog, ServeConfig(max_batch_size=64, max_queue=1024, max_tokens_limit=args.max_tokens))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="error")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"

    def one(i: int) -> tuple[float, int]:
        t = time.perf_counter()
        body = {"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": args.max_tokens, "temperature": 0}  # fmt: skip
        r = httpx.post(url, json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

    one(0)  # warm-up: builds the routers
    print(f"{args.requests} requests, max_tokens {args.max_tokens}, models {', '.join(models)}\n")
    print("| clients | mode | tokens/s | p50 latency (s) | p99 latency (s) | speed-up |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in [int(c) for c in args.clients.split(",")]:
        rates = {}
        for mode in ("one at a time", "batched"):
            engine.batched = mode == "batched"
            t = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - t
            lat = sorted(r[0] for r in results)
            rates[mode] = sum(r[1] for r in results) / wall
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            ratio = f"{rates[mode] / rates['one at a time']:.2f}×"
            print(
                f"| {n} | {mode} | {rates[mode]:.0f} | {statistics.median(lat):.3f} | {p99:.3f} | {ratio} |"
            )
    server.should_exit = True


if __name__ == "__main__":
    main()
