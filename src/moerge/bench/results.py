"""What a benchmark run measured: per task (`TaskResult`), per method (`MethodResult`) and the whole run
(`BenchResults`, written as results.json), with the summaries the report shows."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from moerge.errors import UnknownNameError


class TaskResult(BaseModel):
    """One method on one task."""

    method: str
    task: str
    split: str
    condition: str
    metric: str
    status: Literal["ok", "not_applicable", "error"] = "ok"
    reason: str | None = None
    score: float | None = Field(None, description="exact-match accuracy, or NLL in nats per target token")
    token_accuracy: float | None = Field(
        None,
        description="exact-match tasks: share of target tokens whose argmax prediction is right (graded)",
    )
    perplexity: float | None = None
    target_nll: float | None = Field(None, description="NLL in nats per target token (every metric)")
    normalized: float | None = Field(None, description="(score - base) / (oracle - base); None if undefined")
    routing_accuracy: float | None = Field(None, description="mean weight on the ground-truth experts")
    routing_entropy: float | None = Field(None, description="mean per-token entropy of the weights (nats)")
    mean_weights: list[float] | None = Field(
        None, description="[E] mean weight per expert over target tokens"
    )
    layer_weights: list[list[float]] | None = Field(
        None,
        description="[L, E] mean weight per routed module (the method's ``layers``) and expert over target tokens",
    )
    trace: dict[str, Any] | None = Field(
        None,
        description="the first example, per position t: the token predicted (t+1), its ground-truth expert index "
        "and the expert with the largest mean weight over layers at t (-1: none)",
    )
    examples: int = 0
    targets: int = Field(0, description="scored target tokens")
    tokens: int = 0
    wall_s: float = 0.0


class MethodResult(BaseModel):
    """One method over the suite: what it is, whether it ran, and its cost."""

    name: str
    kind: Literal["baseline", "recipe", "single"]
    recipe: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    taxonomy: dict[str, str] | None = None
    description: str = ""
    status: Literal["ok", "not_applicable", "error"] = "ok"
    reason: str | None = None
    routed: bool = False
    layers: list[str] | None = Field(
        None, description="the routed modules, in the order of each task's ``layer_weights`` rows"
    )
    user_data: str | None = Field(
        None,
        description="the target data it was given: zero-shot, few-shot N or full (None: a reference baseline)",
    )
    expert_flops_per_token: float | None = None
    router_train_s: float | None = Field(
        None,
        description="seconds spent training its router (or searching its weights) per build, the mean over the "
        "per-task builds of a few-shot / full method (Router.train_seconds); 0 for zero-shot routers",
    )
    trainable_parameters: int | None = Field(
        None,
        description="parameters its router trains (Router.trainable_parameters; a LoRA's for lora_target)",
    )
    build_s: float = 0.0
    eval_s: float = 0.0
    peak_memory_mb: float | None = None
    tokens_per_s: float | None = None


class BenchResults(BaseModel):
    """Everything a run measured (written as results.json)."""

    suite: str
    experts: list[str]
    tasks: list[dict[str, Any]]
    methods: list[MethodResult]
    results: list[TaskResult]
    config: dict[str, Any]
    environment: dict[str, Any]
    wall_s: float = 0.0
    notes: list[str] = Field(default_factory=list)
    premise: dict[str, Any] | None = Field(
        None, description="premise diagnostics (moerge.bench.premise.PremiseReport.to_dict), when measured"
    )

    @model_validator(mode="after")
    def _zero_shot_before_modes(self) -> BenchResults:
        """A results file from before user-data modes were recorded per method: its config's single
        ``user_data: zero-shot`` served zero-shot recipes only, so that is each recipe's mode."""
        if self.config.get("user_data") == "zero-shot":
            for m in self.methods:
                if m.kind == "recipe" and m.user_data is None:
                    m.user_data = "zero-shot"
        return self

    def premise_report(self) -> Any:
        """The premise diagnostics as a `moerge.bench.premise.PremiseReport` (None when not measured)."""
        if self.premise is None:
            return None
        from moerge.bench.premise import PremiseReport

        return PremiseReport.from_dict(self.premise)

    def untestable(self) -> dict[str, str]:
        """``{router: why}`` for the zero-shot routers whose premise fails on this suite."""
        report = self.premise_report()
        if report is None:
            return {}
        return {r: why for r in report.top1 if (why := report.untestable(r)) is not None}

    def result(self, method: str, task: str) -> TaskResult | None:
        for r in self.results:
            if r.method == method and r.task == task:
                return r
        return None

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.name == name:
                return m
        raise UnknownNameError(f"no method {name!r} in these results; methods: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [m.name for m in self.methods]

    def groups(self) -> list[tuple[str, str]]:
        """``(split, condition)`` pairs in suite order."""
        seen: dict[tuple[str, str], None] = {}
        for t in self.tasks:
            seen[(t["split"], t["condition"])] = None
        return list(seen)

    def summary(self) -> list[dict[str, Any]]:
        """One row per shown method (single experts are folded into ``best_single``): per ``split/condition``
        the mean normalised quality (or, where the oracle equals the base, the mean raw score per metric), the
        mean routing accuracy on held-in and held-out tasks, the cost, and a rank among routed recipes on the
        held-out conditions."""
        rows = []
        for m in self.methods:
            if m.kind == "single":
                continue
            row: dict[str, Any] = {"method": m.name, "kind": m.kind, "status": m.status, "reason": m.reason}
            for split, cond in self.groups():
                row[f"{split}/{cond}"] = self.group_score(m.name, split, cond)
            for split in ("held_in", "held_out"):
                accs = [
                    r.routing_accuracy
                    for r in self.results
                    if r.method == m.name and r.split == split and r.routing_accuracy is not None
                ]
                row[f"routing_acc/{split}"] = sum(accs) / len(accs) if accs else None
            ents = [
                r.routing_entropy
                for r in self.results
                if r.method == m.name and r.routing_entropy is not None
            ]
            row["routing_entropy"] = sum(ents) / len(ents) if ents else None
            row["held_out_score"] = self.held_out_score(m.name)
            row["user_data"] = m.user_data
            row["expert_flops_per_token"] = m.expert_flops_per_token
            row["router_train_s"] = m.router_train_s
            row["trainable_parameters"] = m.trainable_parameters
            row["eval_s"] = m.eval_s
            row["peak_memory_mb"] = m.peak_memory_mb
            rows.append(row)
        ranked = sorted(
            (r for r in rows if r["kind"] == "recipe" and r["held_out_score"] is not None),
            key=lambda r: -r["held_out_score"],
        )
        for i, r in enumerate(ranked, start=1):
            r["held_out_rank"] = i
        return rows

    def group_score(self, method: str, split: str, condition: str) -> dict[str, Any] | None:
        """``{"value", "normalized": bool, "metric", "n", "na"}`` for one method on one split/condition."""
        rs = [r for r in self.results if r.method == method and r.split == split and r.condition == condition]
        if not rs:
            return None
        ok = [r for r in rs if r.status == "ok"]
        if not ok:
            return {
                "value": None,
                "normalized": False,
                "metric": rs[0].metric,
                "n": 0,
                "status": rs[0].status,
            }
        if all(r.normalized is not None for r in ok):
            v = sum(r.normalized for r in ok) / len(ok)
            return {"value": v, "normalized": True, "metric": "normalized", "n": len(ok), "status": "ok"}
        metrics = sorted({r.metric for r in ok})
        parts = {mt: [r.score for r in ok if r.metric == mt] for mt in metrics}
        means = {mt: sum(v) / len(v) for mt, v in parts.items()}
        return {
            "value": means,
            "normalized": False,
            "metric": ",".join(metrics),
            "n": len(ok),
            "status": "ok",
        }

    def held_out_score(self, method: str) -> float | None:
        """Mean normalised quality over the held-out tasks where it is defined (all of them must have run)."""
        rs = [r for r in self.results if r.method == method and r.split == "held_out"]
        defined = [r for r in rs if r.normalized is not None]
        if not rs or any(r.status != "ok" for r in rs) or not defined:
            return None
        return sum(r.normalized for r in defined) / len(defined)


def normalize(results: list[TaskResult], min_gap: dict[str, float] | None = None) -> None:
    """Fill ``normalized`` = (score − base) / (oracle − base) per task, where both ran and the oracle is better
    than the base by at least ``min_gap[metric]`` (any improvement when not given)."""
    by = {(r.method, r.task): r for r in results}
    for r in results:
        base, oracle = by.get(("base", r.task)), by.get(("oracle", r.task))
        if r.status != "ok" or base is None or oracle is None or base.score is None or oracle.score is None:
            continue
        gap = oracle.score - base.score
        gain = gap if r.metric == "exact_match" else -gap
        if gain > max((min_gap or {}).get(r.metric, 0.0), 1e-9):
            r.normalized = (r.score - base.score) / gap
