"""`Suite` and `Task`: what a MoErging benchmark evaluates, with ground-truth routing labels.

A suite is a list of tasks, each held-in (an expert was trained on it) or held-out (no expert was), with a
*condition* saying what the task probes (``in_distribution``, ``switching``, ``composition``,
``unrelated`` …), eval examples, a metric and a ceiling. An `Example` is a text whose scored characters are
given as ``targets`` (character spans) and whose ground-truth routing is given as ``routing`` spans (the
experts that should handle those characters; characters outside every span want no expert).

Iterate a task as tensors with `Task.eval_batches`, which aligns targets and routing labels with tokens
(any fast tokenizer; the token's first character decides), then score logits with
`moerge.bench.metrics.span_exact_match`, `target_token_accuracy` (the graded companion: the share of target
tokens predicted right) or `target_nll`:

    for batch in task.eval_batches(tokenizer, batch_size=32, experts=suite.experts):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        em = span_exact_match(logits, batch)          # [n_spans] 1.0/0.0
        wanted = batch.routes                          # [B, T, E] ground-truth experts per token

Exact match is computed under teacher forcing: a target span counts as correct when the argmax prediction
of every one of its tokens is right, which is exactly whether greedy decoding reproduces the span.

A suite on disk (`load_jsonl_suite`) is a folder with ``suite.yaml`` and one JSONL file per task split;
docs/suites.md has a worked example. The synthetic suite (`moerge.bench.suites.synthetic`) is stored the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moerge.errors import SuiteError, UnknownNameError

Split = Literal["held_in", "held_out"]
Metric = Literal["exact_match", "nll"]
SUITE_FILE = "suite.yaml"
IGNORE_INDEX = -100

# Conditions the built-in suites use; any other string is allowed (a suite may define its own).
CONDITIONS = {
    "in_distribution": "a held-in task: its expert is the oracle",
    "switching": "sequences that switch between held-in tasks mid-stream (per-token routing should win)",
    "composition": "tasks that blend held-in tasks (combining experts should beat any single one)",
    "unrelated": "tasks no expert was trained for (the base model is the floor; do no harm)",
    "out_of_distribution": "a held-out task with no more specific condition",
}


class RoutingSpan(BaseModel):
    """Characters ``[start, end)`` of an example should be handled by ``experts`` (one, or several to combine)."""

    model_config = ConfigDict(extra="forbid")

    start: int = Field(ge=0)
    end: int = Field(ge=0)
    experts: list[str]


class Example(BaseModel):
    """One eval (or train) example: a text, its scored character spans and its ground-truth routing."""

    model_config = ConfigDict(extra="forbid")

    text: str
    targets: list[tuple[int, int]] = Field(default_factory=list, description="scored [start, end) char spans")
    routing: list[RoutingSpan] = Field(default_factory=list)

    @model_validator(mode="after")
    def _spans_inside(self) -> Example:
        n = len(self.text)
        for s, e in self.targets:
            if not 0 <= s < e <= n:
                raise ValueError(f"target span ({s}, {e}) is not inside the text (length {n})")
        for r in self.routing:
            if not r.start < r.end <= n:
                raise ValueError(f"routing span ({r.start}, {r.end}) is not inside the text (length {n})")
        return self

    @classmethod
    def from_prompt(cls, prompt: str, completion: str, experts: Sequence[str] = ()) -> Example:
        """A prompt/completion pair: the completion is the target; the whole text routes to ``experts``."""
        text = prompt + completion
        routing = [RoutingSpan(start=0, end=len(text), experts=list(experts))] if experts and text else []
        return cls(text=text, targets=[(len(prompt), len(text))] if completion else [], routing=routing)

    @classmethod
    def from_row(cls, row: Any, experts: Sequence[str] = ()) -> Example:
        """Read a JSONL row: ``{"prompt", "completion"}``, ``{"text"}`` (all scored) or the full form
        ``{"text", "targets", "routing"}``. ``experts`` label rows that carry no routing of their own."""
        if isinstance(row, str):
            row = {"text": row}
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, found {type(row).__name__}")
        if "prompt" in row or "completion" in row:
            extra = set(row) - {"prompt", "completion", "routing"}
            if extra or not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
                raise ValueError(
                    'a prompt/completion row needs string "prompt" and "completion" fields'
                    + (f" (unexpected keys: {', '.join(sorted(extra))})" if extra else "")
                )
            ex = cls.from_prompt(row["prompt"], row["completion"], experts)
            if "routing" in row:
                ex = cls(text=ex.text, targets=ex.targets, routing=row["routing"])
            return ex
        if "text" not in row:
            raise ValueError(
                f'a row needs "prompt"/"completion" or "text" (found keys: {", ".join(sorted(row)) or "none"})'
            )
        fields = dict(row)
        text = fields["text"]
        if not isinstance(text, str):
            raise ValueError('"text" must be a string')
        fields.setdefault("targets", [(0, len(text))] if text else [])
        if "routing" not in fields and experts and text:
            fields["routing"] = [{"start": 0, "end": len(text), "experts": list(experts)}]
        return cls(**fields)

    def to_row(self) -> dict[str, Any]:
        """The full JSONL form (round-trips through `from_row`)."""
        return {
            "text": self.text,
            "targets": [list(t) for t in self.targets],
            "routing": [r.model_dump() for r in self.routing],
        }

    def as_training_row(self) -> dict[str, str]:
        """A `train_expert` row: prompt/completion when one target ends the text, else plain text."""
        if len(self.targets) == 1 and self.targets[0][1] == len(self.text):
            s = self.targets[0][0]
            return {"prompt": self.text[:s], "completion": self.text[s:]}
        return {"text": self.text}

    def char_experts(self) -> list[tuple[str, ...]]:
        """Ground-truth experts per character (``()`` = no expert); later spans win where spans overlap."""
        out: list[tuple[str, ...]] = [()] * len(self.text)
        for r in self.routing:
            out[r.start : r.end] = [tuple(r.experts)] * (r.end - r.start)
        return out

    def completions(self) -> list[str]:
        return [self.text[s:e] for s, e in self.targets]


class Task(BaseModel):
    """One benchmark task."""

    model_config = ConfigDict(extra="forbid")

    name: str
    split: Split
    condition: str = "in_distribution"
    metric: Metric = "exact_match"
    ceiling: float | None = Field(
        None, description="best achievable score: 1.0 for deterministic exact match, true entropy for nll"
    )
    experts: list[str] = Field(
        default_factory=list, description="experts relevant to this task (the oracle for a held-in task)"
    )
    description: str = ""
    train: list[Example] = Field(default_factory=list)
    validation: list[Example] = Field(
        default_factory=list,
        description="held-in: examples for tuning merge hyperparameters (not trained on)",
    )
    eval: list[Example] = Field(default_factory=list)
    target: list[Example] = Field(
        default_factory=list,
        description="labelled training examples of the task for recipes that learn from the target task's data "
        "(few-shot: the first N; full: all), disjoint from eval and validation; a held-in task without them "
        "uses its training examples (`target_examples`)",
    )

    @model_validator(mode="after")
    def _target_disjoint(self) -> Task:
        held = self._held_texts()
        leaked = [ex.text for ex in self.target if ex.text in held]
        if leaked:
            raise ValueError(
                f"task {self.name!r}: {len(leaked)} target example(s) also appear in its eval or "
                f"validation split (first: {leaked[0][:40]!r}); remove them from the target data"
            )
        return self

    @property
    def held_in(self) -> bool:
        return self.split == "held_in"

    @property
    def oracle_expert(self) -> str | None:
        """The expert trained on this task (held-in tasks with exactly one expert)."""
        return self.experts[0] if self.held_in and len(self.experts) == 1 else None

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "exact_match"

    def training_rows(self) -> list[dict[str, str]]:
        return [ex.as_training_row() for ex in self.train]

    def target_examples(self) -> list[Example]:
        """The labelled data a user of this task brings (few-shot or full): the task's ``target`` split, else,
        for a held-in task, its training examples (what its expert was trained on) less any whose text is also
        an eval or validation example. Never an eval example."""
        if self.target or not self.held_in:
            return list(self.target)
        held = self._held_texts()
        return [ex for ex in self.train if ex.text not in held]

    def _held_texts(self) -> set[str]:
        return {ex.text for ex in self.eval} | {ex.text for ex in self.validation}

    def eval_batches(
        self,
        tokenizer: Any,
        batch_size: int = 32,
        experts: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> Iterator[EvalBatch]:
        """The eval examples as padded tensors with token-aligned targets and routing labels."""
        examples = self.eval[:limit] if limit is not None else self.eval
        names = list(experts) if experts is not None else list(self.experts)
        for i in range(0, len(examples), batch_size):
            yield collate(self.name, examples[i : i + batch_size], tokenizer, names)


class Suite(BaseModel):
    """A named list of tasks plus where the base model and the experts live (if the suite ships them)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    tasks: list[Task]
    experts: list[str] = Field(default_factory=list, description="expert names, in routing-label order")
    base_model: str | None = None
    library: str | None = None
    baselines: str | None = Field(None, description="library of baseline experts (e.g. 'multitask')")
    root: str | None = None
    info: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_names(self) -> Suite:
        seen: set[str] = set()
        for t in self.tasks:
            if t.name in seen:
                raise ValueError(f"two tasks are named {t.name!r}")
            seen.add(t.name)
        return self

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise UnknownNameError(
            f"suite {self.name!r} has no task {name!r}; tasks: {', '.join(self.task_names())}"
        )

    def task_names(self, split: Split | None = None, condition: str | None = None) -> list[str]:
        return [t.name for t in self.select(split, condition)]

    def select(self, split: Split | None = None, condition: str | None = None) -> list[Task]:
        return [
            t
            for t in self.tasks
            if (split is None or t.split == split) and (condition is None or t.condition == condition)
        ]

    @property
    def held_in(self) -> list[Task]:
        return self.select("held_in")

    @property
    def held_out(self) -> list[Task]:
        return self.select("held_out")

    def conditions(self) -> list[str]:
        return sorted({t.condition for t in self.tasks})

    def training_data(self) -> dict[str, list[dict[str, str]]]:
        """``{task: train_expert rows}`` for the tasks that have training data."""
        return {t.name: t.training_rows() for t in self.tasks if t.train}

    def load_base(self):
        """``(model, tokenizer)`` from ``base_model`` (a transformers folder)."""
        if not self.base_model:
            raise SuiteError(f"suite {self.name!r} names no base_model")
        from moerge.train.lora import load_base

        model, tok, _, _ = load_base(self.base_model)
        model.eval()
        return model, tok

    def open_library(self):
        from moerge.experts.library import ExpertLibrary

        if not self.library:
            raise SuiteError(f"suite {self.name!r} names no library")
        return ExpertLibrary.open(self.library)


# ---------------------------------------------------------------- tensors


@dataclass
class EvalBatch:
    """Padded eval tensors for one batch of examples of one task.

    ``labels[b, t]`` is the token id where token ``t`` is scored (predicted from logits at ``t - 1``), else -100.
    ``span[b, t]`` numbers the scored spans within the batch (-1 elsewhere); ``n_spans`` of them.
    ``routes[b, t, e]`` is True where expert ``experts[e]`` should handle token ``t``.
    """

    task: str
    input_ids: Any  # [B, T] long
    attention_mask: Any  # [B, T] long
    labels: Any  # [B, T] long
    span: Any  # [B, T] long
    routes: Any  # [B, T, E] bool
    experts: list[str]
    examples: list[Example]
    n_spans: int

    @property
    def route_index(self):
        """[B, T] index of the first ground-truth expert per token (-1 where none)."""
        import torch

        has = self.routes.any(-1)
        idx = self.routes.float().argmax(-1) if self.routes.shape[-1] else torch.zeros_like(self.labels)
        return torch.where(has, idx, torch.full_like(idx, -1))


def token_char_starts(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (no special tokens) and each token's first character offset."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [int(s) for s, _ in enc["offset_mapping"]]


def encode_eval_example(
    tokenizer: Any, example: Example, experts: Sequence[str]
) -> tuple[list[int], list[int], list[int], list[list[bool]]]:
    """``(ids, labels, span, routes)`` for one example, with ``<bos>`` first (as in training)."""
    ids, starts = token_char_starts(tokenizer, example.text)
    span_of = [-1] * len(example.text)
    for k, (s, e) in enumerate(example.targets):
        span_of[s:e] = [k] * (e - s)
    char_exp = example.char_experts()
    index = {n: i for i, n in enumerate(experts)}
    labels, span, routes = [], [], []
    for tok, c in zip(ids, starts):
        k = span_of[c] if c < len(span_of) else -1
        labels.append(tok if k >= 0 else IGNORE_INDEX)
        span.append(k)
        row = [False] * len(experts)
        for name in char_exp[c] if c < len(char_exp) else ():
            if name in index:
                row[index[name]] = True
        routes.append(row)
    bos = tokenizer.bos_token_id
    if bos is not None:
        ids, labels, span = [bos] + ids, [IGNORE_INDEX] + labels, [-1] + span
        routes = [[False] * len(experts)] + routes
    return ids, labels, span, routes


def collate(task: str, examples: Sequence[Example], tokenizer: Any, experts: Sequence[str]) -> EvalBatch:
    import torch

    encoded = [encode_eval_example(tokenizer, ex, experts) for ex in examples]
    width = max(len(e[0]) for e in encoded)
    B, E = len(encoded), len(experts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((B, width), pad, dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    span = torch.full((B, width), -1, dtype=torch.long)
    routes = torch.zeros((B, width, E), dtype=torch.bool)
    offset = 0
    for b, (ids, lab, sp, rt) in enumerate(encoded):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        attention[b, :n] = 1
        labels[b, :n] = torch.tensor(lab)
        sp_t = torch.tensor(sp)
        span[b, :n] = torch.where(sp_t >= 0, sp_t + offset, sp_t)
        if E:
            routes[b, :n] = torch.tensor(rt, dtype=torch.bool).reshape(n, E)
        offset += len(examples[b].targets)
    return EvalBatch(task, input_ids, attention, labels, span, routes, list(experts), list(examples), offset)


# ---------------------------------------------------------------- suites on disk


class TaskSpec(BaseModel):
    """One task entry of ``suite.yaml``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    split: Split
    condition: str | None = None
    expert: str | None = Field(None, description="held-in: the expert trained on this task")
    experts: list[str] = Field(default_factory=list, description="experts relevant to the task (if several)")
    metric: Metric = "exact_match"
    ceiling: float | None = None
    description: str = ""
    eval: str = Field(description="JSONL file of eval examples, relative to the suite folder")
    train: str | None = Field(None, description="JSONL file of training examples (optional)")
    validation: str | None = Field(
        None, description="JSONL file of validation examples for tuning merges (optional; held-in tasks)"
    )
    target: str | None = Field(
        None,
        description="JSONL file of the task's labelled training examples for few-shot / full-data recipes "
        "(optional; disjoint from eval and validation)",
    )

    @model_validator(mode="after")
    def _held_in_has_expert(self) -> TaskSpec:
        if self.split == "held_in" and not (self.expert or self.experts):
            raise ValueError(f"held-in task {self.name!r} needs `expert:` (the expert trained on it)")
        return self

    def expert_names(self) -> list[str]:
        names = ([self.expert] if self.expert else []) + [e for e in self.experts if e != self.expert]
        return names


class SuiteSpec(BaseModel):
    """``suite.yaml``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    base_model: str | None = None
    library: str | None = None
    baselines: str | None = None
    experts: list[str] | None = Field(None, description="expert order for routing labels (default: held-in)")
    info: dict[str, Any] = Field(default_factory=dict)
    tasks: list[TaskSpec]


def _resolve(folder: Path, value: str | None) -> str | None:
    if value is None or "://" in value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (folder / p).resolve())


def _read_examples(path: Path, experts: Sequence[str]) -> list[Example]:
    if not path.is_file():
        raise SuiteError(f"{path}: no such task file (named in {SUITE_FILE})")
    from moerge.config_io import iter_jsonl

    out: list[Example] = []
    for lineno, row in iter_jsonl(path, SuiteError):
        try:
            out.append(Example.from_row(row, experts))
        except (ValueError, ValidationError) as e:
            msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
            raise SuiteError(f"{path}:{lineno}: {msg}") from e
    if not out:
        raise SuiteError(f"{path}: the file holds no examples")
    return out


def _spec_error(path: Path, e: ValidationError) -> SuiteError:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return SuiteError(f"{path}: {loc}: {err['msg']}")


def load_jsonl_suite(folder: str | Path) -> Suite:
    """Load a suite folder: ``suite.yaml`` plus the JSONL task files it names (see docs/suites.md)."""
    import yaml

    folder = Path(folder).expanduser()
    spec_file = folder / SUITE_FILE
    if not folder.is_dir():
        raise SuiteError(f"{folder}: no such suite folder")
    if not spec_file.is_file():
        raise SuiteError(
            f"{folder}: no {SUITE_FILE} (a suite folder holds {SUITE_FILE} and JSONL task files)"
        )
    try:
        raw = yaml.safe_load(spec_file.read_text())
    except yaml.YAMLError as e:
        raise SuiteError(f"{spec_file}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise SuiteError(f"{spec_file}: expected a mapping with `name:` and `tasks:`")
    try:
        spec = SuiteSpec(**raw)
    except ValidationError as e:
        raise _spec_error(spec_file, e) from e
    experts = spec.experts
    if experts is None:
        experts = list(dict.fromkeys(n for t in spec.tasks if t.split == "held_in" for n in t.expert_names()))
    tasks = []
    for t in spec.tasks:
        names = t.expert_names()
        unknown = [n for n in names if n not in experts]
        if unknown:
            raise SuiteError(
                f"{spec_file}: task {t.name!r} names expert {unknown[0]!r}, which is not in `experts:`"
            )
        label = names if t.split == "held_in" else []
        condition = t.condition or ("in_distribution" if t.split == "held_in" else "out_of_distribution")
        ceiling = t.ceiling if t.ceiling is not None else (1.0 if t.metric == "exact_match" else None)
        train = _read_examples(folder / t.train, label) if t.train else []
        validation = _read_examples(folder / t.validation, label) if t.validation else []
        target = _read_examples(folder / t.target, label) if t.target else []
        try:
            task = Task(
                name=t.name,
                split=t.split,
                condition=condition,
                metric=t.metric,
                ceiling=ceiling,
                experts=names,
                description=t.description,
                train=train,
                validation=validation,
                eval=_read_examples(folder / t.eval, label),
                target=target,
            )
        except ValidationError as e:
            raise SuiteError(f"{spec_file}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from e
        tasks.append(task)
    try:
        return Suite(
            name=spec.name,
            tasks=tasks,
            experts=list(experts),
            base_model=_resolve(folder, spec.base_model),
            library=_resolve(folder, spec.library),
            baselines=_resolve(folder, spec.baselines),
            root=str(folder.resolve()),
            info=spec.info,
        )
    except ValidationError as e:
        raise _spec_error(spec_file, e) from e


def write_jsonl_suite(suite: Suite, folder: str | Path, **paths: str | None) -> Path:
    """Write ``suite`` as a suite folder (``suite.yaml`` + ``tasks/<name>.{train,validation,eval,target}.jsonl``).

    ``paths`` may give ``base_model=``, ``library=``, ``baselines=`` relative to the folder.
    """
    import yaml

    folder = Path(folder)
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    specs = []
    for t in suite.tasks:
        entry: dict[str, Any] = {
            "name": t.name,
            "split": t.split,
            "condition": t.condition,
            "metric": t.metric,
        }
        if t.experts:
            entry["experts"] = list(t.experts)
        if t.ceiling is not None:
            entry["ceiling"] = t.ceiling
        if t.description:
            entry["description"] = t.description
        for part in ("train", "validation", "eval", "target"):
            rows = getattr(t, part)
            if rows:
                rel = f"tasks/{t.name}.{part}.jsonl"
                with (folder / rel).open("w", encoding="utf-8") as f:
                    for ex in rows:
                        f.write(json.dumps(ex.to_row(), separators=(",", ":")) + "\n")
                entry[part] = rel
        specs.append(entry)
    doc: dict[str, Any] = {"name": suite.name}
    for key in ("base_model", "library", "baselines"):
        if paths.get(key):
            doc[key] = paths[key]
    doc["experts"] = list(suite.experts)
    if suite.info:
        doc["info"] = suite.info
    doc["tasks"] = specs
    (folder / SUITE_FILE).write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return folder


__all__ = [
    "CONDITIONS",
    "EvalBatch",
    "Example",
    "RoutingSpan",
    "Suite",
    "Task",
    "collate",
    "load_jsonl_suite",
    "write_jsonl_suite",
]
