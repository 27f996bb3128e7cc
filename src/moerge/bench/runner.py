"""The benchmark runner: a suite, its expert library and a list of recipes → one table of who wins, at what cost.

    from moerge.bench.runner import BenchConfig, run_bench
    results = run_bench(suite, BenchConfig(recipes=["arrow", "arrow:granularity=example"]))
    results.summary()                      # one row per method: quality per split/condition, routing, cost

Every method goes the same way: build a model once (a recipe attached to the base model, or a merge folded into
its weights), then for each task and batch of eval examples run one teacher-forced forward pass (no grad) and
score the logits — exact match (every token of a target span is the argmax given the true prefix, which is
exactly whether greedy decoding reproduces the span) or negative log-likelihood per target token — and, for
routed models, the routing weights each layer gave each token. A new recipe needs no change here: it is a
recipe name plus options, built by `moerge.model.attach.attach`.

Baselines always run: the base model; the oracle (each target token predicted by the model of its ground-truth
expert: a held-in task's own expert, each segment's expert in a switching sequence, each character's expert in
a blend, the base where no expert applies; model-level, the reference for normalised quality); label routing
(the same labels fed to per-token, per-module routing, to show how far perfect module-level routing gets);
every single expert (the best one per split is reported as ``best_single``, chosen after the fact on that
split, so it is an optimistic baseline); the uniform merge, task arithmetic and TIES of all experts; and the
multitask LoRA the suite ships. A recipe that cannot run in a setting (its taxonomy record rules out a held-out
split, a user-data regime, or the library lacks the artifacts it needs) is reported as not applicable, with
the reason.

Routing is judged against labels aligned with the *predicted* token: the weights at position ``t`` (which
produce the prediction of token ``t+1``) are compared with the label of token ``t+1``. Example-level routers
only see the unscored part of each example (the prompt and the inputs of every segment, never the answers);
examples whose every character is scored (perplexity texts) are routed on the whole text.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moerge.errors import MoergeError, RecipeNotApplicableError

BASELINES = (
    "base", "oracle", "label_routing", "best_single", "uniform_merge", "task_arithmetic", "ties", "multitask",
)  # fmt: skip
# registered recipes whose numbers the baselines already give (base, oracle, single experts, uniform mix =
# uniform merge for LoRA on linear modules); they are not run again as routed recipes by default
COVERED_BY_BASELINES = frozenset({"base", "oracle", "single_expert", "uniform"})
GENERALIZATION = {"held_in": "in-distribution", "held_out": "out-of-distribution"}
ARTIFACT_TEXTS = 256  # training texts per expert used to compute routing artifacts


# ---------------------------------------------------------------------------------------------- configuration
class MergeBaselineConfig(BaseModel):
    """Parameters of the static-merge baselines (defaults from the papers, not tuned on the suite)."""

    model_config = ConfigDict(extra="forbid")

    task_arithmetic_scale: float = Field(0.4, gt=0, description="λ of θ₀ + λ Σ τᵢ (Ilharco et al.; 0.3–0.4)")
    ties_density: float = Field(0.2, gt=0, le=1, description="fraction of each task vector kept (TIES: 20%)")
    ties_scale: float = Field(1.0, gt=0, description="λ applied to the TIES merge (TIES paper: 1)")


class BenchConfig(BaseModel):
    """What `run_bench` runs and how. The same object drives the Python API, YAML and `moerge bench` flags."""

    model_config = ConfigDict(extra="forbid")

    recipes: list[str] | None = Field(
        None,
        description='methods as "recipe" or "recipe:key=value,key=value" (None: every implemented recipe, '
        "plus a per-example variant of each per-token one)",
    )
    baselines: list[str] = Field(default_factory=lambda: list(BASELINES))
    batch_size: int = Field(64, ge=1)
    limit: int | None = Field(None, ge=1, description="eval examples per task (None: all)")
    user_data: Literal["zero-shot", "few-shot", "full"] = "zero-shot"
    prepare_artifacts: bool = Field(
        True,
        description="compute missing routing artifacts (gates, centroids) from the suite's training data",
    )
    gate_steps: int = Field(
        100, ge=1, description="PHATGOOSE gate-training steps per expert (the authors': 100, train_gate.sh)"
    )
    merges: MergeBaselineConfig = Field(default_factory=MergeBaselineConfig)
    min_oracle_gap: dict[str, float] = Field(
        default_factory=lambda: {"exact_match": 0.1, "nll": 0.01},
        description="normalised quality is left undefined where the oracle beats the base by less than this "
        "(per metric: accuracy points, nats per token), since the ratio would amplify noise",
    )
    device: str = "cpu"
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads during the run (None: leave as is; 1 is fastest for tiny models)",
    )
    progress: bool = True


@dataclass(frozen=True)
class MethodSpec:
    """One routed method: a label (as given), the recipe name and its options."""

    label: str
    recipe: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_method(text: str) -> MethodSpec:
    """``"arrow"`` or ``"arrow:k=2,granularity=example"`` → `MethodSpec` (values read as YAML scalars)."""
    import yaml

    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise MoergeError(
                f"method {text!r}: option {part!r} is not key=value (e.g. arrow:k=2,temperature=0.5)"
            )
        options[key.strip()] = yaml.safe_load(value.strip())
    if not name.strip():
        raise MoergeError(f"method {text!r} names no recipe; `moerge recipes` lists them")
    return MethodSpec(text.strip(), name.strip().replace("-", "_"), options)


def default_methods() -> list[MethodSpec]:
    """Every registered recipe not covered by a baseline, plus ``granularity=example`` for per-token recipes
    (so per-token and per-example routing are compared on the same experts), and, for embedding recipes
    whose default embedder is a sentence model, ``embedding_model=base`` (the base model's hidden states)."""
    from typing import get_args

    from moerge.models.embedder import minilm_available
    from moerge.recipes import list_recipes

    out = []
    for r in list_recipes():
        if r.name in COVERED_BY_BASELINES:
            continue
        out.append(MethodSpec(r.name, r.name))
        f = r.options.model_fields.get("granularity")
        if f is not None and f.default == "token" and "example" in get_args(f.annotation):
            out.append(MethodSpec(f"{r.name}:granularity=example", r.name, {"granularity": "example"}))
        if "embedding_model" in r.options.model_fields and minilm_available():
            out.append(MethodSpec(f"{r.name}:embedding_model=base", r.name, {"embedding_model": "base"}))
    return out


# ---------------------------------------------------------------------------------------------- results
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
    expert_flops_per_token: float | None = None
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

    def result(self, method: str, task: str) -> TaskResult | None:
        for r in self.results:
            if r.method == method and r.task == task:
                return r
        return None

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)

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
            row["expert_flops_per_token"] = m.expert_flops_per_token
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


# ---------------------------------------------------------------------------------------------- measurements
def _read_status_kb(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float | None]]:
    """Peak memory added while the block runs, in MiB: CUDA allocator peak on a GPU; on Linux CPUs the peak
    resident set size above the RSS at entry (``/proc/self/clear_refs`` resets the high-water mark);
    None elsewhere."""
    import torch

    out: dict[str, float | None] = {"mb": None}
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["mb"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return
    start = _read_status_kb("VmRSS")
    ok = False
    if start is not None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            ok = True
        except OSError:
            ok = False
    yield out
    peak = _read_status_kb("VmHWM")
    if ok and peak is not None and start is not None:
        out["mb"] = max(0.0, peak - start) / 1024


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
    wall: float = 0.0
    trace: dict[str, Any] | None = None


def routing_stats(weights: Any, routes: Any, labels: Any) -> dict[str, Any]:
    """Sums over target tokens of routing mass on the ground truth, entropy, and weights per expert.

    ``weights`` ``[L, B, T, E]`` (per layer), ``routes`` ``[B, T, E]`` bool (ground truth per token),
    ``labels`` ``[B, T]`` (-100 where not scored). Weights at ``t`` are compared with the label of ``t + 1``.
    """
    import torch

    from moerge.routing.selection import entropy

    L = weights.shape[0]
    w = weights[:, :, :-1].float()  # [L, B, T-1, E]
    scored = labels[:, 1:] != -100  # [B, T-1]
    truth = routes[:, 1:]  # [B, T-1, E]
    labelled = scored & truth.any(-1)
    mass = (w * truth.to(w.dtype)).sum(-1)  # [L, B, T-1]
    ent = entropy(w)  # [L, B, T-1]
    return {
        "acc_sum": float(mass[:, labelled].sum()) / L,
        "acc_n": int(labelled.sum()),
        "ent_sum": float(ent[:, scored].sum()) / L,
        "ent_n": int(scored.sum()),
        "weight_sum": w[:, scored].sum((0, 1)) / L if scored.any() else torch.zeros(w.shape[-1]),
        "weight_n": int(scored.sum()),
    }


def routing_trace(weights: Any, batch: Any, tokenizer: Any, example: int = 0) -> dict[str, Any]:
    """Per position of one example: the predicted token, its ground-truth expert (first one, -1: none) and the
    expert with the largest mean weight over layers (-1: no weight)."""
    n = int(batch.attention_mask[example].sum())
    w = weights[:, example, : n - 1].float().mean(0)  # [n-1, E]: position t predicts token t+1
    chosen = top_expert_or_none(w)
    truth = batch.routes[example, 1:n]
    has = truth.any(-1)
    first = truth.float().argmax(-1)
    ids = batch.input_ids[example, 1:n].tolist()
    return {
        "tokens": [tokenizer.decode([i]) for i in ids],
        "truth": [int(f) if h else -1 for f, h in zip(first.tolist(), has.tolist())],
        "chosen": chosen,
        "scored": (batch.labels[example, 1:n] != -100).tolist(),
    }


def top_expert_or_none(w: Any) -> list[int]:
    """Row-wise argmax of ``[N, E]`` weights, -1 for rows without positive weight."""
    top = w.argmax(-1)
    return [int(i) if v > 0 else -1 for i, v in zip(top.tolist(), w.max(-1).values.tolist())]


def routing_view(batch: Any) -> tuple[Any, list[str]]:
    """What an example-level router may see: ``(mask [B, T], texts)`` of the unscored tokens/characters
    (prompt and segment inputs); an example with nothing unscored but ``<bos>`` is seen whole."""
    import torch

    unscored = (batch.attention_mask > 0) & (batch.labels == -100)
    nonbos = unscored.clone()
    nonbos[:, 0] = False
    whole = ~nonbos.any(1)
    mask = torch.where(whole[:, None], batch.attention_mask > 0, unscored).long()
    texts = []
    for ex in batch.examples:
        keep = [True] * len(ex.text)
        for s, e in ex.targets:
            keep[s:e] = [False] * (e - s)
        seen = "".join(c for c, k in zip(ex.text, keep) if k)
        texts.append(seen if seen.strip() else ex.text)
    return mask, texts


def label_weights(batch: Any) -> Any:
    """Ground-truth routing as weights ``[B, T, E]``: position ``t`` gets token ``t+1``'s experts, equally."""
    import torch

    r = batch.routes.float()
    shifted = torch.zeros_like(r)
    shifted[:, :-1] = r[:, 1:]
    return shifted / shifted.sum(-1, keepdim=True).clamp(min=1)


# ---------------------------------------------------------------------------------------------- models under test
class Subject:
    """A model under test: ``forward(batch, task) -> (logits, weights [L, B, T, E] or None)``."""

    routed: bool = False
    flops: float = 0.0

    def forward(self, batch: Any, task: Any) -> tuple[Any, Any]:
        raise NotImplementedError


class PlainSubject(Subject):
    """A plain model (the base, or a merge folded into its weights): no routing, no extra FLOPs."""

    def __init__(self, model: Any):
        self.model = model

    def forward(self, batch: Any, task: Any) -> tuple[Any, Any]:
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, None


class RoutedSubject(Subject):
    """A `MoErgedModel`: each call carries task names, the example texts the router may see, and (for the
    oracle) the ground-truth weights; routing weights are recorded."""

    routed = True

    def __init__(self, routed: Any, inputs: Callable[[Any, Any], dict[str, Any]] | None = None):
        self.model = routed
        self.inputs = inputs
        self.flops = float(routed.expert_flops_per_token())

    def forward(self, batch: Any, task: Any) -> tuple[Any, Any]:
        import torch

        from moerge.routing.inputs import RoutingInputs

        routed = self.model
        if routed.router is None:
            return routed.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, None
        mask, texts = routing_view(batch)
        extra = self.inputs(batch, task) if self.inputs else {}
        ri = RoutingInputs(task_names=[task.name] * len(batch.examples), texts=texts, record=True, **extra)
        # The routing call sees only the unscored tokens (its attention mask); the model sees the whole batch.
        with routed.routing(ri, (), {"input_ids": batch.input_ids, "attention_mask": mask}):
            logits = routed.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        rec = routed.last_routing()
        if not rec:
            return logits, None
        return logits, torch.stack([w[:, : batch.input_ids.shape[1]] for w in rec.values()])


def _label_router():
    from moerge.routing.routers import Router
    from moerge.routing.selection import Selection

    class LabelRouter(Router):
        """The oracle: each token's ground-truth experts (``RoutingInputs.extra["label_weights"]``)."""

        granularity = "token"

        def begin_call(self, call: Any) -> None:
            w = call.inputs.extra.get("label_weights")
            if w is None:
                raise MoergeError("the oracle router needs RoutingInputs(extra={'label_weights': [B, T, E]})")
            call.plan["w"] = w

        def select(self, module: str, x: Any, call: Any) -> Any:
            w = call.plan["w"]
            return Selection(w.reshape(-1, w.shape[-1]).to(x.dtype), None, "token")

    return LabelRouter()


@contextlib.contextmanager
def folded(model: Any, expert: Any) -> Iterator[Any]:
    """``model`` with ``expert``'s deltas (LoRA or dense) added into its weights; restored on exit."""
    import torch

    saved: dict[str, Any] = {}
    params = dict(model.named_parameters())
    try:
        with torch.no_grad():
            for name, lm in expert.lora.items():
                p = params[name + ".weight"]
                saved[name + ".weight"] = p.detach().clone()
                p += lm.delta_for_weight().to(device=p.device, dtype=p.dtype)
            for name, d in expert.dense.items():
                p = params[name]
                saved[name] = p.detach().clone()
                p += d.to(device=p.device, dtype=p.dtype)
        yield model
    finally:
        with torch.no_grad():
            for name, v in saved.items():
                params[name].copy_(v)


# ---------------------------------------------------------------------------------------------- the runner
@dataclass
class _Run:
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
    _batches: dict[str, list[tuple[Any, Any]]] = field(default_factory=dict)
    _embedders: dict[str, Any] = field(default_factory=dict)

    def embedder(self, opts: Any = None) -> Any:
        """The sentence embedder an embedding recipe's options pick (its ``embedding_model`` option; see
        `moerge.routing.embedding.default_embedder`), made once per choice."""
        choice = getattr(opts, "embedding_model", "default")
        if choice not in self._embedders:
            from moerge.routing.embedding import default_embedder

            self._embedders[choice] = default_embedder(self.model, self.tokenizer, choice=choice)
        return self._embedders[choice]

    def embedder_kwargs(self, rec: Any, opts: Any, key: str) -> dict[str, Any]:
        """``{key: embedder or its name}`` for recipes whose artifacts depend on the embedder, else ``{}``."""
        if not needs_embedder(rec, opts):
            return {}
        emb = self.embedder(opts)
        return {key: emb if key == "embedder" else emb.name}

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def tasks_for(self, split: str | None = None) -> list[Any]:
        return [t for t in self.suite.tasks if split is None or t.split == split]

    def batches(self, task: Any) -> list[tuple[Any, Any]]:
        """The task's eval batches, tokenised once per run: ``[(on CPU, on the device)]``."""
        if task.name not in self._batches:
            cfg = self.config
            self._batches[task.name] = [
                (b, _to_device(b, cfg.device))
                for b in task.eval_batches(self.tokenizer, cfg.batch_size, self.names, cfg.limit)
            ]
        return self._batches[task.name]

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.ptask, n)

    def describe(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.ptask, description=text)


def evaluate(run: _Run, subject: Subject, method: str, tasks: Sequence[Any]) -> list[TaskResult]:
    """Score ``subject`` on ``tasks`` (no grad, batched)."""
    import torch

    from moerge.bench.suite import span_exact_match, target_nll, target_token_accuracy

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
        acc.wall = time.perf_counter() - t0
        out.append(_task_result(method, task, acc))
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
        trace=acc.trace,
        examples=acc.examples,
        targets=acc.targets,
        tokens=acc.tokens,
        wall_s=acc.wall,
    )


def _to_device(batch: Any, device: str) -> Any:
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


def _na_results(run: _Run, method: str, tasks: Sequence[Any], status: str, reason: str) -> list[TaskResult]:
    run.advance(len(tasks))
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


def _record(run: _Run, meta: MethodResult, results: list[TaskResult], mem: dict[str, Any]) -> None:
    ran = [r for r in results if r.status == "ok"]
    meta.eval_s = sum(r.wall_s for r in ran)
    tokens = sum(r.tokens for r in ran)
    meta.tokens_per_s = tokens / meta.eval_s if meta.eval_s > 0 else None
    meta.peak_memory_mb = mem.get("mb")
    if not ran and meta.status == "ok":
        meta.status = results[0].status if results else "not_applicable"
        meta.reason = meta.reason or (results[0].reason if results else None)
    run.methods.append(meta)
    run.results.extend(results)


def _timed_build(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- baselines
def run_base(run: _Run) -> None:
    meta = MethodResult(
        name="base", kind="baseline", description="the base model alone", expert_flops_per_token=0.0
    )
    with peak_memory(run.config.device) as mem:
        results = evaluate(run, PlainSubject(run.model), "base", run.tasks_for())
    _record(run, meta, results, mem)


class OracleSubject(Subject):
    """The oracle: each target token predicted by the model of its ground-truth expert — every labelled
    expert runs alone on the whole sequence, and position t takes the logits of token t+1's expert (the mean
    of its experts' logits where it has several; the base model's where it has none). Model-level, so an
    upper reference for routing rather than a method; for a held-in task it is simply the task's expert."""

    routed = True

    def __init__(self, routed: Any):
        self.model = routed

    def forward(self, batch: Any, task: Any) -> tuple[Any, Any]:
        import torch

        from moerge.routing.inputs import RoutingInputs

        routed = self.model
        ids, mask = batch.input_ids, batch.attention_mask
        want = label_weights(batch).to(ids.device)  # [B, T, E]
        logits = routed.model(input_ids=ids, attention_mask=mask).logits  # the base model (experts off)
        used = (want.sum((0, 1)) > 0).nonzero().flatten().tolist()
        if used:
            mixed = torch.zeros_like(logits)
            for e in used:  # one pass per labelled expert (a reference, not a method's hot path)
                w = torch.zeros(len(ids), routed.num_experts, device=ids.device)
                w[:, e] = 1.0
                with routed.routing(RoutingInputs(weights=w), (), {"input_ids": ids, "attention_mask": mask}):
                    out = routed.model(input_ids=ids, attention_mask=mask).logits
                mixed += want[..., e : e + 1].to(out.dtype) * out
            logits = torch.where(want.sum(-1, keepdim=True) > 0, mixed, logits)
        return logits, want[None]


def run_oracle(run: _Run) -> None:
    from moerge.model.attach import attach, detach

    meta = MethodResult(
        name="oracle",
        kind="baseline",
        routed=True,
        description="each target token predicted by the model of its ground-truth expert(s) (a held-in task's "
        "own expert; each segment's or character's own expert held-out; the base where none): the reference "
        "for normalised quality",
    )
    with peak_memory(run.config.device) as mem:
        routed, meta.build_s = _timed_build(lambda: attach(run.model, run.experts))
        try:
            meta.expert_flops_per_token = _one_expert_flops(routed)
            results = evaluate(run, OracleSubject(routed), "oracle", run.tasks_for())
        finally:
            detach(routed)
    _record(run, meta, results, mem)


def run_label_routing(run: _Run) -> None:
    from moerge.model.attach import attach, detach

    meta = MethodResult(
        name="label_routing",
        kind="baseline",
        routed=True,
        description="per-token, per-module routing fed the ground-truth labels (position t uses token t+1's "
        "experts, equally weighted): how far perfect per-token module-level routing gets",
    )
    with peak_memory(run.config.device) as mem:
        routed, meta.build_s = _timed_build(lambda: attach(run.model, run.experts, router=_label_router()))
        try:
            subject = RoutedSubject(routed, lambda b, t: {"extra": {"label_weights": label_weights(b)}})
            meta.expert_flops_per_token = subject.flops
            results = evaluate(run, subject, "label_routing", run.tasks_for())
        finally:
            detach(routed)
    _record(run, meta, results, mem)


def _one_expert_flops(routed: Any) -> float:
    """2 × multiply-adds per token of one expert's LoRA in every adapted module."""
    return float(sum(2 * la.rank * (la.d_in + la.d_out) for la in routed.expert_layers.values()))


def run_singles(run: _Run) -> None:
    """Every expert alone on every task (one attach; explicit one-hot weights per call)."""
    import torch

    from moerge.model.attach import attach, detach

    E = len(run.experts)
    routed, build_s = _timed_build(lambda: attach(run.model, run.experts))
    try:
        for i, name in enumerate(run.names):
            meta = MethodResult(
                name=f"single:{name}", kind="single", routed=False, description=f"expert {name} alone",
                build_s=build_s / E,
            )  # fmt: skip
            onehot = torch.zeros(E)
            onehot[i] = 1.0

            def inputs(b, t, w=onehot):
                return {"weights": w.expand(len(b.examples), -1).clone()}

            with peak_memory(run.config.device) as mem:
                subject = RoutedSubject(routed, inputs)
                results = evaluate(run, subject, meta.name, run.tasks_for())
            meta.expert_flops_per_token = _one_expert_flops(routed)
            for r in results:  # explicit weights are not routing decisions
                r.routing_accuracy = r.routing_entropy = r.mean_weights = None
            _record(run, meta, results, mem)
    finally:
        detach(routed)


def pick_best_single(run: _Run) -> None:
    """``best_single``: per split, the single expert with the best mean normalised (else raw) quality."""
    singles = [m for m in run.methods if m.kind == "single"]
    if not singles:
        return
    meta = MethodResult(name="best_single", kind="baseline", description="", routed=False)
    chosen: dict[str, str] = {}
    results: list[TaskResult] = []
    for split in ("held_in", "held_out"):
        tasks = run.tasks_for(split)
        if not tasks:
            continue
        best, best_key = None, None
        for m in singles:
            rs = [r for r in run.results if r.method == m.name and r.split == split and r.status == "ok"]
            key = _goodness(rs)
            if key is not None and (best_key is None or key > best_key):
                best, best_key = m, key
        if best is None:
            continue
        chosen[split] = best.name.removeprefix("single:")
        for r in run.results:
            if r.method == best.name and r.split == split:
                results.append(r.model_copy(update={"method": "best_single"}))
        meta.expert_flops_per_token = best.expert_flops_per_token
        meta.build_s += best.build_s
    meta.description = (
        "the best single expert per split, chosen after the fact ("
        + ", ".join(f"{s}: {n}" for s, n in chosen.items())
        + ")"
    )
    meta.options = {"chosen": chosen}
    eval_s = sum(r.wall_s for r in results)
    meta.eval_s = eval_s
    meta.peak_memory_mb = max((m.peak_memory_mb or 0.0 for m in singles), default=None)
    run.methods.append(meta)
    run.results.extend(results)


def _goodness(rs: list[TaskResult]) -> float | None:
    """Mean normalised quality if defined, else mean raw quality (higher is better; NLL negated)."""
    if not rs:
        return None
    norm = [r.normalized for r in rs if r.normalized is not None]
    if norm:
        return sum(norm) / len(norm)
    return sum((r.score if r.metric == "exact_match" else -r.score) for r in rs) / len(rs)


def run_merge(run: _Run, name: str) -> None:
    """A static merge of every expert (dense ΔW per module), folded into the base weights."""
    from moerge.merging.api import merge

    m = run.config.merges
    plans = {
        "uniform_merge": ("linear", {"normalize": True}, "uniform average of the experts' ΔW (model soup)"),
        "task_arithmetic": (
            "task_arithmetic", {"scale": m.task_arithmetic_scale},
            f"θ₀ + λ Σ ΔWᵢ with λ = {m.task_arithmetic_scale}",
        ),
        "ties": (
            "ties", {"density": m.ties_density, "scale": m.ties_scale},
            f"TIES (density {m.ties_density}, λ = {m.ties_scale})",
        ),
    }  # fmt: skip
    method, params, text = plans[name]
    meta = MethodResult(name=name, kind="baseline", description=text, expert_flops_per_token=0.0,
                        options={"merge_method": method, **params})  # fmt: skip
    with peak_memory(run.config.device) as mem:
        try:
            merged, meta.build_s = _timed_build(
                lambda: merge(
                    merge_method=method, experts=run.experts, lora_mode="dense", parameters=params, name=name
                )  # fmt: skip
            )
        except MoergeError as e:
            _record(run, meta, _na_results(run, name, run.tasks_for(), "error", str(e)), mem)
            return
        with folded(run.model, merged) as model:
            results = evaluate(run, PlainSubject(model), name, run.tasks_for())
    _record(run, meta, results, mem)


def run_multitask(run: _Run) -> None:
    meta = MethodResult(name="multitask", kind="baseline", expert_flops_per_token=0.0,
                        description="a LoRA trained on the union of the held-in tasks' data, folded in")  # fmt: skip
    lib = run.baselines_library
    if lib is None or "multitask" not in lib:
        reason = "the suite ships no multitask expert (it needs the experts' shared data)"
        meta.status, meta.reason = "not_applicable", reason
        _record(run, meta, _na_results(run, "multitask", run.tasks_for(), "not_applicable", reason), {})
        return
    with peak_memory(run.config.device) as mem:
        expert, meta.build_s = _timed_build(lambda: lib.get("multitask"))
        with folded(run.model, expert) as model:
            results = evaluate(run, PlainSubject(model), "multitask", run.tasks_for())
    _record(run, meta, results, mem)


# ---------------------------------------------------------------------------------------------- recipes
def needs_embedder(rec: Any, opts: Any) -> bool:
    """Whether any artifact the recipe needs is keyed by the embedder (its config changes with the name)."""
    return any(req.config(opts, "a") != req.config(opts, "b") for req in rec.requires)


def effective_taxonomy(rec: Any, opts: Any) -> dict[str, str]:
    """The recipe's taxonomy record, with the axes its options changed for this run marked ``(option)``
    (e.g. Arrow run per example: granularity ``example (option)``)."""
    tax = rec.taxonomy.model_dump()
    values = opts.model_dump()
    step = {"token": "step", "example": "example", "task": "task"}
    g = values.get("granularity")
    if g in step and step[g] != tax["granularity"]:
        tax["granularity"] = f"{step[g]} (option)"
    a = values.get("aggregation")
    if a in ("output", "parameter") and a != tax["aggregation"]:
        tax["aggregation"] = f"{a} (option)"
    elif a == "factor":
        tax["aggregation"] = "parameter, factor mix (option)"
    return tax


def run_recipe(run: _Run, spec: MethodSpec) -> None:
    """Attach ``spec``'s recipe once, evaluate every split its taxonomy record allows."""
    from moerge.model.attach import attach, detach
    from moerge.recipes import get_recipe

    try:
        rec = get_recipe(spec.recipe)
        opts = rec.parse_options(spec.options)
    except MoergeError as e:
        meta = MethodResult(name=spec.label, kind="recipe", recipe=spec.recipe, options=spec.options,
                            status="error", reason=str(e))  # fmt: skip
        _record(run, meta, _na_results(run, spec.label, run.tasks_for(), "error", str(e)), {})
        return
    meta = MethodResult(
        name=spec.label, kind="recipe", recipe=rec.name, options=opts.model_dump(), routed=True,
        taxonomy=effective_taxonomy(rec, opts), description=rec.summary,
    )  # fmt: skip
    runnable, results = [], []
    for split in ("held_in", "held_out"):
        tasks = run.tasks_for(split)
        if not tasks:
            continue
        try:
            rec.check_applicable(
                run.library,
                experts=run.experts,
                user_data=run.config.user_data,
                generalization=GENERALIZATION[split],
                options=opts,
                **run.embedder_kwargs(rec, opts, "embedder_name"),
            )  # fmt: skip
            runnable += tasks
        except RecipeNotApplicableError as e:
            results += _na_results(run, spec.label, tasks, "not_applicable", str(e))
    if runnable:
        with peak_memory(run.config.device) as mem:
            try:
                routed, meta.build_s = _timed_build(
                    lambda: attach(
                        run.model,
                        run.library,
                        rec,
                        experts=run.names,
                        tokenizer=run.tokenizer,
                        **run.embedder_kwargs(rec, opts, "embedder"),
                        **opts.model_dump(),
                    )  # fmt: skip
                )
            except RecipeNotApplicableError as e:
                results += _na_results(run, spec.label, runnable, "not_applicable", str(e))
            except MoergeError as e:
                results += _na_results(run, spec.label, runnable, "error", f"{type(e).__name__}: {e}")
            else:
                try:
                    subject = RoutedSubject(routed)
                    meta.expert_flops_per_token = subject.flops
                    results += evaluate(run, subject, spec.label, runnable)
                finally:
                    detach(routed)
    else:
        mem = {}
    order = {t.name: i for i, t in enumerate(run.suite.tasks)}
    results.sort(key=lambda r: order[r.task])
    if results and all(r.status != "ok" for r in results):
        meta.status, meta.reason = (
            results[0].status,
            "; ".join(dict.fromkeys(r.reason for r in results if r.reason)),
        )
    _record(run, meta, results, mem)


# ---------------------------------------------------------------------------------------------- artifacts
def expert_training_texts(suite: Any, expert: str, prompts_only: bool = False) -> list[str]:
    """Training texts of the held-in task(s) whose expert is ``expert`` (the contributor's data)."""
    texts = []
    for t in suite.tasks:
        if t.held_in and t.experts and t.experts[0] == expert:
            for ex in t.train[:ARTIFACT_TEXTS]:
                if prompts_only and ex.targets and ex.targets[0][0] > 0:
                    texts.append(ex.text[: ex.targets[0][0]])
                else:
                    texts.append(ex.text)
    return texts


def expert_training_examples(suite: Any, expert: str) -> list[Any]:
    """Every training `Example` of the held-in task(s) whose expert is ``expert``: the examples the expert was
    trained on (PHATGOOSE trains its gates on them with the expert's own objective)."""
    return [ex for t in suite.tasks if t.held_in and t.experts and t.experts[0] == expert for ex in t.train]


def prepare_artifacts(run: _Run, specs: Sequence[MethodSpec]) -> list[str]:
    """Compute the routing artifacts the recipes need and the library lacks, from each expert's training data
    (the runner plays the contributors: PHATGOOSE gates, hidden-state and embedding centroids). Experts
    without training data in the suite are left without, so their recipes report not applicable."""
    from moerge.recipes import get_recipe

    needed: list[tuple[str, Any, Any]] = []  # (kind, artifact config, embedder or None), each once
    for spec in specs:
        try:
            rec = get_recipe(spec.recipe)
            opts = rec.parse_options(spec.options)
        except MoergeError:
            continue
        embedder = run.embedder(opts) if needs_embedder(rec, opts) else None
        for req in rec.requires:
            item = (req.kind, req.config(opts, embedder.name if embedder else ""), embedder)
            if all(item[:2] != seen[:2] for seen in needed):
                needed.append(item)
    done = []
    lib = run.library
    for kind, cfg, embedder in needed:
        missing = [e for e in run.experts if not lib.has_artifact(kind, cfg, e.name)]
        data = {e.name: expert_training_texts(run.suite, e.name, prompts_only=kind == "embedding_centroids")
                for e in missing}  # fmt: skip
        data = {k: v for k, v in data.items() if v}
        if not data:
            continue
        run.describe(f"computing {kind} for {len(data)} experts")
        if kind == "hidden_centroids":
            from moerge.transforms.centroids import compute_hidden_centroids

            compute_hidden_centroids(run.model, run.tokenizer, data, library=lib, experts=run.experts)
        elif kind == "embedding_centroids":
            from moerge.transforms.centroids import compute_embedding_centroids

            compute_embedding_centroids(embedder, data, library=lib)
        elif kind == "phatgoose_gates":
            from moerge.transforms.phatgoose import GateTrainConfig, train_phatgoose_gates

            for e in run.experts:
                if e.name in data:
                    examples = expert_training_examples(run.suite, e.name)
                    train_phatgoose_gates(run.model, run.tokenizer, e, examples,
                                          GateTrainConfig(steps=run.config.gate_steps), library=lib)  # fmt: skip
        else:
            continue
        done.append(f"computed {kind} for {len(data)} experts from their training data")
    return done


# ---------------------------------------------------------------------------------------------- entry point
def run_bench(
    suite: Any,
    config: BenchConfig | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    library: Any = None,
    baselines_library: Any = None,
    experts: Sequence[str] | None = None,
) -> BenchResults:
    """Run every baseline and recipe of ``config`` on ``suite`` and return the measurements.

    The base model, tokenizer and libraries default to the suite's own (``suite.load_base()``,
    ``suite.open_library()``, ``suite.baselines``); ``experts`` restricts the experts (default: the suite's
    expert list, which is also the order of its routing labels).
    """
    import torch

    config = config or BenchConfig()
    t_start = time.perf_counter()
    if model is None:
        model, tok = suite.load_base()
        tokenizer = tokenizer or tok
    if tokenizer is None:
        raise MoergeError("run_bench: pass the tokenizer along with a loaded model")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(config.device)
    if library is None:
        library = suite.open_library()
    if baselines_library is None and getattr(suite, "baselines", None):
        from moerge.experts.library import ExpertLibrary

        baselines_library = ExpertLibrary.open(suite.baselines)
    names = list(experts or suite.experts or library.names(kind="lora"))
    absent = [n for n in names if n not in library]
    if absent:
        raise MoergeError(f"suite {suite.name!r} names experts {absent} that library {library.url} lacks")
    expert_list = [library.get(n) for n in names]
    specs = [parse_method(m) for m in config.recipes] if config.recipes is not None else default_methods()
    unknown = [b for b in config.baselines if b not in BASELINES]
    if unknown:
        raise MoergeError(f"unknown baselines {unknown}; known: {', '.join(BASELINES)}")

    run = _Run(suite, config, model, tokenizer, library, expert_list, baselines_library)
    with _threads(config.threads), _progress(config.progress) as progress:
        n_tasks = len(suite.tasks)
        n_evals = sum(
            n_tasks * (len(names) if b == "best_single" else 1) for b in config.baselines
        ) + n_tasks * len(specs)
        run.progress = progress
        if progress is not None:
            run.ptask = progress.add_task("benchmark", total=n_evals)
        if config.prepare_artifacts:
            run.notes += prepare_artifacts(run, specs)
        steps: list[tuple[str, Callable[[], None]]] = []
        for b in BASELINES:
            if b not in config.baselines:
                continue
            if b == "base":
                steps.append((b, lambda: run_base(run)))
            elif b == "oracle":
                steps.append((b, lambda: run_oracle(run)))
            elif b == "label_routing":
                steps.append((b, lambda: run_label_routing(run)))
            elif b == "best_single":
                steps.append(("single experts", lambda: run_singles(run)))
            elif b == "multitask":
                steps.append((b, lambda: run_multitask(run)))
            else:
                steps.append((b, lambda b=b: run_merge(run, b)))
        for spec in specs:
            steps.append((spec.label, lambda spec=spec: run_recipe(run, spec)))
        for label, step in steps:
            run.describe(label)
            step()
        run.describe("done")
    normalize(run.results, config.min_oracle_gap)
    run.notes += [
        f"normalised quality is undefined on {t.name}: the oracle beats the base by less than "
        f"{config.min_oracle_gap.get(t.metric, 0)} ({t.metric}); raw scores are shown"
        for t in suite.tasks
        if t.experts
        and all(r.normalized is None for r in run.results if r.task == t.name and r.method == "oracle")
        and any(r.method == "oracle" and r.task == t.name and r.status == "ok" for r in run.results)
    ]
    if "best_single" in config.baselines:
        pick_best_single(run)
    _order(run)
    return BenchResults(
        suite=suite.name,
        experts=names,
        tasks=[
            {
                "name": t.name,
                "split": t.split,
                "condition": t.condition,
                "metric": t.metric,
                "ceiling": t.ceiling,
                "experts": list(t.experts),
                "examples": len(t.eval[: config.limit] if config.limit else t.eval),
            }
            for t in suite.tasks
        ],  # fmt: skip
        methods=run.methods,
        results=run.results,
        config=config.model_dump(mode="json"),
        environment={
            "torch": torch.__version__,
            "threads": config.threads or torch.get_num_threads(),
            "device": config.device,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        wall_s=time.perf_counter() - t_start,
        notes=run.notes,
    )


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


def _order(run: _Run) -> None:
    """Methods in a fixed order: the baselines as listed, then recipes, then single experts."""
    rank = {n: i for i, n in enumerate(BASELINES)}
    kinds = {"baseline": 0, "recipe": 1, "single": 2}
    run.methods.sort(key=lambda m: (kinds[m.kind], rank.get(m.name, 0)))


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        transient=False,
    ) as p:  # fmt: skip
        yield p
