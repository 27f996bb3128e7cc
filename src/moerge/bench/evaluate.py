"""One benchmark run's shared state (`BenchRun`: the suite, model, experts, eval batches tokenised once, results
so far, progress) and the scoring loop every method goes through (`evaluate`): a subject's teacher-forced
logits on each task's eval batches → exact match / NLL, and, for routed subjects, routing accuracy, entropy
and a trace."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moerge.bench.config import BenchConfig
from moerge.bench.metrics import (
    routing_stats,
    routing_trace,
    span_exact_match,
    target_nll,
    target_token_accuracy,
)
from moerge.bench.results import MethodResult, TaskResult
from moerge.bench.subjects import Subject


@dataclass
class BenchRun:
    """State of one `run_bench` call."""

    suite: Any
    config: BenchConfig
    model: Any
    tokenizer: Any
    library: Any
    experts: list[Any]
    baselines_library: Any
    progress: Any = None
    ptask: Any = None
    methods: list[MethodResult] = field(default_factory=list)
    results: list[TaskResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    embedders: dict[str, Any] = field(default_factory=dict)  # made once per choice, shared by every recipe
    layers: dict[str, list[str]] = field(
        default_factory=dict
    )  # method -> its routed modules, in weight order
    _batches: dict[str, list[tuple[Any, Any]]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def build_context(self) -> Any:
        """A recipe `BuildContext` over this run's model, experts and library (embedders shared)."""
        from moerge.recipes.recipe import BuildContext

        return BuildContext(
            model=self.model, experts=self.experts, library=self.library, tokenizer=self.tokenizer,
            embedders=self.embedders, progress=self.describe,
        )  # fmt: skip

    def tasks_for(self, split: str | None = None) -> list[Any]:
        return [t for t in self.suite.tasks if split is None or t.split == split]

    def batches(self, task: Any) -> list[tuple[Any, Any]]:
        """The task's eval batches, tokenised once per run: ``[(on CPU, on the device)]`` (keyed by the task's name
        and its first eval text, so a copy with other eval examples — few-shot prompts — gets its own)."""
        key = f"{task.name}\0{task.eval[0].text if task.eval else ''}"
        if key not in self._batches:
            cfg = self.config
            self._batches[key] = [
                (b, to_device(b, cfg.device))
                for b in task.eval_batches(self.tokenizer, cfg.batch_size, self.names, cfg.limit)
            ]
        return self._batches[key]

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.ptask, n)

    def describe(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.ptask, description=text)

    def record(
        self, meta: MethodResult, results: list[TaskResult], mem: dict[str, Any] | None = None
    ) -> None:
        """Add one method's results (its cost summed over the tasks that ran)."""
        ran = [r for r in results if r.status == "ok"]
        meta.eval_s = sum(r.wall_s for r in ran)
        tokens = sum(r.tokens for r in ran)
        meta.tokens_per_s = tokens / meta.eval_s if meta.eval_s > 0 else None
        meta.peak_memory_mb = (mem or {}).get("mb")
        if any(r.layer_weights for r in results):
            meta.layers = meta.layers or self.layers.get(meta.name)
        if not ran and meta.status == "ok":
            meta.status = results[0].status if results else "not_applicable"
            meta.reason = meta.reason or (results[0].reason if results else None)
        self.methods.append(meta)
        self.results.extend(results)

    def skipped(self, method: str, tasks: Sequence[Any], status: str, reason: str) -> list[TaskResult]:
        """Results for tasks a method did not run on (``not_applicable`` or ``error``, with the reason)."""
        self.advance(len(tasks))
        return [
            TaskResult(
                method=method,
                task=t.name,
                split=t.split,
                condition=t.condition,
                metric=t.metric,
                status=status,
                reason=reason,
            )  # fmt: skip
            for t in tasks
        ]


def mode_label(mode: str, config: BenchConfig) -> str:
    """``zero-shot``, ``few-shot N`` or ``full``: the user-data column of the report."""
    return f"few-shot {config.few_shot}" if mode == "few-shot" else mode


def target_data(task: Any, mode: str, config: BenchConfig) -> Any:
    """The `TargetData` a few-shot / full method gets for ``task`` (None where the task has none): few-shot, its
    first ``config.few_shot`` target examples; full, all of them, the last tenth (from 10 examples on) kept as a
    validation split. Drawn from `Task.target_examples` — never an eval or validation example."""
    from moerge.recipes.recipe import TargetData

    examples = task.target_examples()
    if not examples:
        return None
    rows = [ex.as_training_row() for ex in examples]
    if mode == "few-shot":
        return TargetData(task.name, "few-shot", tuple(rows[: config.few_shot]))
    n_val = len(rows) // 10 if len(rows) >= 10 else 0
    return TargetData(task.name, "full", tuple(rows[: len(rows) - n_val]), tuple(rows[len(rows) - n_val :]))


@dataclass
class _Acc:
    """Running sums for one task."""

    hits: float = 0.0
    spans: int = 0
    token_hits: float = 0.0
    nll: float = 0.0
    targets: int = 0
    tokens: int = 0
    examples: int = 0
    acc_sum: float = 0.0
    acc_n: int = 0
    ent_sum: float = 0.0
    ent_n: int = 0
    weight_sum: Any = None
    weight_n: int = 0
    layer_sum: Any = None
    wall: float = 0.0
    trace: dict[str, Any] | None = None


def evaluate(
    run: BenchRun, subject: Subject, method: str, tasks: Sequence[Any], *, counted: bool = True
) -> list[TaskResult]:
    """Score ``subject`` on ``tasks`` (no grad, batched). ``counted=False`` for evaluations the progress bar does
    not count (tuning on validation data)."""
    out = []
    for task in tasks:
        acc = _Acc()
        t0 = time.perf_counter()
        with torch.no_grad():
            for cpu, batch in run.batches(task):
                logits, weights = subject.forward(batch, task)
                logits = logits.float().cpu()
                acc.examples += len(cpu.examples)
                acc.tokens += int(cpu.attention_mask.sum())
                s, c = target_nll(logits, cpu.labels)
                acc.nll += s
                acc.targets += c
                if task.metric == "exact_match":
                    em = span_exact_match(logits, cpu)
                    acc.hits += float(em.sum())
                    acc.spans += em.numel()
                    acc.token_hits += float(target_token_accuracy(logits, cpu).sum())
                if weights is not None:
                    if acc.trace is None:
                        acc.trace = routing_trace(weights.cpu(), cpu, run.tokenizer)
                    st = routing_stats(weights.cpu(), cpu.routes, cpu.labels)
                    acc.acc_sum += st["acc_sum"]
                    acc.acc_n += st["acc_n"]
                    acc.ent_sum += st["ent_sum"]
                    acc.ent_n += st["ent_n"]
                    acc.weight_sum = (
                        st["weight_sum"] if acc.weight_sum is None else acc.weight_sum + st["weight_sum"]
                    )
                    acc.weight_n += st["weight_n"]
                    acc.layer_sum = (
                        st["layer_sum"] if acc.layer_sum is None else acc.layer_sum + st["layer_sum"]
                    )
        acc.wall = time.perf_counter() - t0
        if getattr(subject, "layers", None) and counted:
            run.layers.setdefault(method, list(subject.layers))
        out.append(_task_result(method, task, acc))
        if counted:
            run.advance()
    return out


def _task_result(method: str, task: Any, acc: _Acc) -> TaskResult:
    nll = acc.nll / max(1, acc.targets)
    if task.metric == "exact_match":
        score, ppl = acc.hits / max(1, acc.spans), None
    else:
        score, ppl = nll, math.exp(min(nll, 50.0))
    return TaskResult(
        method=method,
        task=task.name,
        split=task.split,
        condition=task.condition,
        metric=task.metric,
        score=score,
        token_accuracy=acc.token_hits / max(1, acc.targets) if task.metric == "exact_match" else None,
        perplexity=ppl,
        target_nll=nll,
        routing_accuracy=acc.acc_sum / acc.acc_n if acc.acc_n else None,
        routing_entropy=acc.ent_sum / acc.ent_n if acc.ent_n else None,
        mean_weights=(acc.weight_sum / acc.weight_n).tolist() if acc.weight_n else None,
        layer_weights=[[round(v, 4) for v in row] for row in (acc.layer_sum / acc.weight_n).tolist()]
        if acc.weight_n
        else None,
        trace=acc.trace,
        examples=acc.examples,
        targets=acc.targets,
        tokens=acc.tokens,
        wall_s=acc.wall,
    )


def to_device(batch: Any, device: str) -> Any:
    if device == "cpu" and batch.input_ids.device.type == "cpu":
        return batch
    import dataclasses

    return dataclasses.replace(
        batch,
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        labels=batch.labels.to(device),
        span=batch.span.to(device),
        routes=batch.routes.to(device),
    )


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds it took)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
