"""The server's counters, written out in Prometheus' text format (``GET /metrics``): requests by model and
status, prompt and completion tokens, queue depth and requests in flight, a latency histogram, and per expert
the generated tokens it served (an expert serves a token when its mean weight over the routed modules is > 0)."""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))


class Metrics:
    def __init__(self, expert_names: list[str]):
        self.expert_names = list(expert_names)
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (model, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.queue_depth = 0
        self.active = 0
        self.cancelled = 0
        self.latency_counts = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_n = 0
        self.expert_tokens: Counter[str] = Counter()
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # the last decode steps' batch sizes

    def observe_request(self, model: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(model, status)] += 1
            if seconds is not None:
                self.latency_sum += seconds
                self.latency_n += 1
                for i, bound in enumerate(LATENCY_BUCKETS):
                    if seconds <= bound:
                        self.latency_counts[i] += 1

    def observe_routing(self, request: Any) -> None:
        counts = request.expert_token_counts()
        if counts is None:
            return
        with self._lock:
            self.expert_tokens.update({n: int(c) for n, c in zip(self.expert_names, counts.tolist()) if c})

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            lines = [
                "# HELP moerge_requests_total Requests answered, by model and HTTP status.",
                "# TYPE moerge_requests_total counter",
            ]
            for (model, status), n in sorted(self.requests.items()):
                lines.append(f'moerge_requests_total{{model="{_esc(model)}",status="{status}"}} {n}')
            lines += [
                "# HELP moerge_tokens_total Tokens processed: prompt (prefilled) and completion (generated).",
                "# TYPE moerge_tokens_total counter",
                f'moerge_tokens_total{{kind="prompt"}} {self.prompt_tokens}',
                f'moerge_tokens_total{{kind="completion"}} {self.completion_tokens}',
                "# HELP moerge_queue_depth Requests waiting for a batch slot.",
                "# TYPE moerge_queue_depth gauge",
                f"moerge_queue_depth {self.queue_depth}",
                "# HELP moerge_requests_in_flight Requests being decoded.",
                "# TYPE moerge_requests_in_flight gauge",
                f"moerge_requests_in_flight {self.active}",
                "# HELP moerge_requests_cancelled_total Requests dropped because their client went away.",
                "# TYPE moerge_requests_cancelled_total counter",
                f"moerge_requests_cancelled_total {self.cancelled}",
                "# HELP moerge_request_latency_seconds Time from a request's arrival to its last token.",
                "# TYPE moerge_request_latency_seconds histogram",
            ]
            for bound, n in zip(LATENCY_BUCKETS, self.latency_counts):
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'moerge_request_latency_seconds_bucket{{le="{le}"}} {n}')
            lines += [
                f"moerge_request_latency_seconds_sum {self.latency_sum:.6f}",
                f"moerge_request_latency_seconds_count {self.latency_n}",
                "# HELP moerge_expert_tokens_total Generated tokens each expert served (mean weight > 0).",
                "# TYPE moerge_expert_tokens_total counter",
            ]
            for name in self.expert_names:
                lines.append(
                    f'moerge_expert_tokens_total{{expert="{_esc(name)}"}} {self.expert_tokens[name]}'
                )
        return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
