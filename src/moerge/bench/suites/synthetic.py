"""The built-in synthetic MoErging suite: a little world with ground truth, built here from a seed.

Held-in tasks are deterministic string transformations written ``input<sep>output``. Each task draws its
inputs from its own 8-character alphabet (neighbouring alphabets share 2 characters) and writes its own
separator character (a per-task template, as prompted data sets have), so a zero-shot router can tell the task
from the input. The tasks come in two families, chosen so that every method family has a fair chance and the
conditions still separate them (docs/suites.md has the measurements behind each choice):

- **selective, low-rank behaviours** (``constant``): every character of the task's alphabet maps to one
  character of its own. The change is keyed to a task-level feature of the inputs (which alphabet they are
  from), so an expert's update acts mainly on its own task's tokens: Arrow's premise (selectivity, measured
  by `moerge.bench.premise`) holds, gates and centroids can tell the tasks apart, and merging them costs
  little — the setting the literature's routers and merges are built for.
- **high-interference tasks** (``cipher``): a fixed permutation of the alphabet. The expert must rewire the
  shared machinery that aligns each output character with its input character, so its update fires on every
  task's tokens (selectivity 1.1–1.4 at seed 0, against 2.4–3.7 for the constant tasks): merging it in hurts
  everyone else, Arrow's premise fails for it, and only routing that applies it to its own sequences can use
  it.

==========  ========  =====  ===================================  ===============
task        alphabet  sep    transformation                       example
==========  ========  =====  ===================================  ===============
constant0   abcdefgh  ``:``  every character → ``c``              ``dbdbh:ccccc``
constant1   ghijklmn  ``;``  every character → ``k``              ``mmgll;kkkkk``
cipher2     mnopqrst  ``?``  a fixed permutation of the alphabet  ``mtmqt?snsmn``
constant3   stuvwxyz  ``@``  every character → ``x``              ``xwutx@xxxxx``
constant4   yzABCDEF  ``^``  every character → ``B``              ``FyBCz^BBBBB``
cipher5     EFGHIJKL  ``_``  a fixed permutation of the alphabet  ``GHIGF_KLGKF``
constant6   KLMNOPQR  ``|``  every character → ``N``              ``MMLKR|NNNNN``
constant7   QRSTUVWX  ``~``  every character → ``V``              ``VVVWR~VVVVV``
==========  ========  =====  ===================================  ===============

(seed 0; the constant character is drawn from the 4 characters no neighbour shares, the permutations are
seeded; ``SyntheticSuiteConfig.ops`` picks other transformations from `OPS`, e.g. ``classify``: two
characters of its own by a seeded 4/4 split, or ``walk``.)

Held-out conditions:

- ``switching``: 2–3 held-in segments in one sequence (``in:out in@out …``); per-token routing can pick the
  right expert for every segment, per-example routing for one at best.
- ``composition``: ``blend0_4`` and ``blend1_3`` mix the characters of two selective tasks with disjoint
  alphabets in one input (separator ``>``); each output character is its input character's task's output, so
  the two experts must be combined, position by position.
- ``unrelated``: ``copy9`` (copy a digit string) and ``markov9`` (text from a seeded order-1 Markov chain over
  punctuation, scored by NLL against its true entropy). The base model learnt both in pretraining and no
  expert covers them: the base model is the floor a good method keeps.

Every exact-match task is also scored per target token (`moerge.bench.metrics.target_token_accuracy`), a graded
companion to exact match.

The base model is a tiny Llama pretrained here on a broad mixture: every task's input format with *random*
outputs of the right length and alphabet (so it knows the formats but none of the mappings), switching and
blended formats, the copy task, the Markov text and random words. One LoRA expert per held-in task is trained
with `train_expert` on that task only (half of its examples follow 1-2 generic random segments, so the expert
also works mid-sequence); a multitask LoRA on the union is stored as a baseline. The contributors' routing
artifacts are computed beside each expert and stored in the library: PHATGOOSE gates (trained as the authors
do, `moerge.train.gates`) and hidden-state centroids. `measure_suite` scores the base, every oracle
expert, the multitask LoRA and oracle per-example / per-token routings, and `moerge.bench.premise` measures
each expert's selectivity and each zero-shot router's open-loop top-1; the build stores both in
``build.json``.

The build is cached in ``<root>/synthetic-<hash of the config>/`` (``~/.cache/moerge/suites`` by default,
``$MOERGE_CACHE/suites`` if set) as a suite folder (`moerge.bench.suites.format.load_jsonl_suite`) plus
``base/``, ``library/`` (held-in experts and their artifacts), ``baselines/`` (``multitask``) and
``build.json`` (timings, base and oracle scores, premise diagnostics). The same config gives the same data and
the same weights.

Measure a build: ``python -m moerge.bench.suites.synthetic [--reduced] [--root DIR] [--force]``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moerge.backbones.tiny import TinyModelConfig
from moerge.bench.suites.build import (
    BuildSteps,
    build_cached,
    contributor_signatures,
    default_root,
    suite_premise,
    train_suite_experts,
)
from moerge.bench.suites.format import Example, RoutingSpan, Suite, Task, write_jsonl_suite
from moerge.errors import MalformedConfigError, SuiteError
from moerge.train.lora import TrainConfig
from moerge.train.pretrain import PretrainConfig

SUITE_VERSION = 3
SEP = ">"
POOL = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX"  # 8 alphabets of 8, stride 6 (2 shared)
SEPARATORS = ":;?@^_|~"  # held-in task i's own separator (``separators="task"``); ">" everywhere else
DIGITS = "0123456789"
MARKOV_ALPHABET = "!#$%&*+="

# ---------------------------------------------------------------- transformations (a registry of pure fns)

OPS: dict[str, Callable[[str, dict[str, str]], str]] = {}


def op(name: str):
    def register(fn: Callable[[str, dict[str, str]], str]):
        OPS[name] = fn
        return fn

    return register


@op("cipher")
def cipher(s: str, table: dict[str, str]) -> str:
    return "".join(table[c] for c in s)


@op("reverse")
def reverse(s: str, table: dict[str, str]) -> str:
    return s[::-1]


@op("shift")
def shift(s: str, table: dict[str, str]) -> str:
    return "".join(table[c] for c in s)


@op("rotate")
def rotate(s: str, table: dict[str, str]) -> str:
    return s[1:] + s[:1]


@op("double")
def double(s: str, table: dict[str, str]) -> str:
    return "".join(c + c for c in s)


@op("swap")
def swap(s: str, table: dict[str, str]) -> str:
    pairs = [s[i : i + 2][::-1] for i in range(0, len(s), 2)]
    return "".join(pairs)


@op("classify")
def classify(s: str, table: dict[str, str]) -> str:
    return "".join(table[c] for c in s)


@op("constant")
def constant(s: str, table: dict[str, str]) -> str:
    return "".join(table[c] for c in s)


@op("walk")
def walk(s: str, table: dict[str, str]) -> str:
    out, c = [], s[-1]
    for _ in s:
        c = table[c]
        out.append(c)
    return "".join(out)


@op("copy")
def copy_op(s: str, table: dict[str, str]) -> str:
    return s


TABLE_OPS = ("cipher", "shift", "classify", "constant")  # per-character maps: they compose in blends
HELD_IN_OPS = ("constant", "constant", "cipher", "constant", "constant", "cipher", "constant", "constant")
BLENDS = [(0, 4), (1, 3)]  # pairs of held-in tasks with disjoint alphabets


class SyntheticSuiteConfig(BaseModel):
    """Everything that determines the synthetic suite; its hash names the cache folder."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    n_tasks: int = Field(8, ge=2, le=8, description="held-in tasks (the first n of `ops`)")
    ops: tuple[str, ...] = Field(HELD_IN_OPS, description="the held-in tasks' transformations, in order")
    min_len: int = Field(5, ge=2)
    max_len: int = Field(5, ge=2)
    n_train: int = Field(512, ge=8, description="training examples per held-in task")
    n_eval: int = Field(64, ge=4, description="eval examples per task")
    n_validation: int = Field(
        32, ge=0, description="validation examples per held-in task (for tuning merges; never trained on)"
    )
    n_target: int = Field(
        256,
        ge=1,
        description="labelled target examples per held-out task for few-shot / full-data recipes (drawn from "
        "streams of their own, disjoint from eval; not hashed: they change neither the experts nor the eval data)",
    )
    n_pretrain: int = Field(4000, ge=16, description="pretraining rows")
    switch_segments: tuple[int, int] = (2, 3)
    markov_len: int = Field(24, ge=4)
    separators: Literal["task", "shared"] = Field(
        "task",
        description="between input and output: each held-in task's own character (a per-task template), or '>'",
    )
    prefix_prob: float = Field(
        0.5, ge=0, le=1, description="share of training examples that follow a generic prefix segment"
    )
    model: TinyModelConfig = Field(
        default_factory=lambda: TinyModelConfig(
            hidden_size=64, num_layers=2, num_heads=4, intermediate_size=172
        )
    )
    pretrain: PretrainConfig = Field(
        default_factory=lambda: PretrainConfig(steps=500, lr=3e-3, batch_size=32, seq_len=64, warmup_steps=30)
    )
    expert: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            steps=250, lr=1e-2, batch_size=16, seq_len=32, rank=8, alpha=16.0, warmup_steps=10
        )
    )
    multitask: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            steps=600, lr=1e-2, batch_size=32, seq_len=32, rank=8, alpha=16.0, warmup_steps=20
        )
    )
    gate_steps: int = Field(
        100, ge=1, description="PHATGOOSE gate-training steps per expert (otherwise the authors' settings)"
    )
    progress: bool = Field(True, description="progress bars (not part of the hash)")
    threads: int | None = Field(
        1, description="torch threads while building (not hashed); 1 is fastest for tiny models on a busy CPU"
    )

    @classmethod
    def reduced(cls, **overrides: Any) -> SyntheticSuiteConfig:
        """A small build for tests (seconds): a smaller model, few steps, few examples."""
        base: dict[str, Any] = dict(
            n_train=64,
            n_eval=8,
            n_validation=4,
            n_target=24,
            n_pretrain=256,
            model=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
            pretrain=PretrainConfig(steps=30, lr=3e-3, batch_size=16, seq_len=64, warmup_steps=5),
            expert=TrainConfig(steps=8, lr=1e-2, batch_size=8, seq_len=32, rank=4, alpha=8.0),
            multitask=TrainConfig(steps=16, lr=1e-2, batch_size=8, seq_len=32, rank=4, alpha=8.0),
            gate_steps=4,
        )
        base.update(overrides)
        return cls(**base)

    def key(self) -> str:
        """Hash of everything that changes the build (not the progress flags)."""
        data = self.model_dump(mode="json")
        data.pop("progress")
        data.pop("threads")
        data.pop(
            "n_target"
        )  # target splits are generated on load (`target_splits`); the build does not use them
        for part in ("pretrain", "expert", "multitask"):
            data[part].pop("progress", None)
        blob = json.dumps({"version": SUITE_VERSION, "config": data}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- task data


class TaskDef(BaseModel):
    """A held-in task: its alphabet, separator and transformation (outputs are made of its alphabet)."""

    name: str
    op: str
    alphabet: str
    sep: str = SEP
    table: dict[str, str] = Field(default_factory=dict)

    def apply(self, s: str) -> str:
        return OPS[self.op](s, self.table)


def _rng(seed: int, *parts: Any) -> random.Random:
    h = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def task_defs(config: SyntheticSuiteConfig) -> list[TaskDef]:
    defs = []
    for i in range(config.n_tasks):
        opname = config.ops[i % len(config.ops)]
        if opname not in OPS:
            raise MalformedConfigError(f"unknown synthetic op {opname!r}; known: {', '.join(OPS)}")
        alphabet = POOL[6 * i : 6 * i + 8]
        table: dict[str, str] = {}
        if opname == "cipher":
            perm = list(alphabet)
            _rng(config.seed, "cipher", i).shuffle(perm)
            table = dict(zip(alphabet, perm))
        elif opname == "walk":
            cycle = list(alphabet)
            _rng(config.seed, "walk", i).shuffle(cycle)
            table = dict(zip(cycle, cycle[1:] + cycle[:1]))
        elif opname == "shift":
            table = dict(zip(alphabet, alphabet[1:] + alphabet[:1]))
        elif opname == "constant":  # one character of its own (not shared with a neighbour's alphabet)
            table = dict.fromkeys(alphabet, _rng(config.seed, "constant", i).choice(alphabet[2:6]))
        elif opname == "classify":  # two characters of its own; a seeded 4/4 split of the alphabet
            pair = _rng(config.seed, "classify", i).sample(alphabet[2:6], 2)
            order = list(alphabet)
            _rng(config.seed, "classify-split", i).shuffle(order)
            table = {c: pair[k % 2] for k, c in enumerate(order)}
        sep = SEPARATORS[i] if config.separators == "task" else SEP
        defs.append(TaskDef(name=f"{opname}{i}", op=opname, alphabet=alphabet, sep=sep, table=table))
    return defs


def _unique_inputs(rng: random.Random, alphabet: str, n: int, lo: int, hi: int, need: Callable | None = None):
    seen: set[str] = set()
    out: list[str] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))
        if s not in seen and (need is None or need(s)):
            seen.add(s)
            out.append(s)
    return out


def _segment(
    inp: str, out: str, experts: list[str], offset: int, sep: str = SEP
) -> tuple[str, tuple[int, int], RoutingSpan]:
    text = inp + sep + out
    target = (offset + len(inp) + 1, offset + len(text))
    return text, target, RoutingSpan(start=offset, end=offset + len(text), experts=experts)


def noise_segment(rng: random.Random, config: SyntheticSuiteConfig) -> str:
    """A generic ``input>output`` segment of random characters (no task's mapping)."""
    n = rng.randint(config.min_len, config.max_len)
    return (
        "".join(rng.choice(POOL + DIGITS) for _ in range(n))
        + SEP
        + "".join(rng.choice(POOL) for _ in range(n))
    )


def train_example(rng: random.Random, d: TaskDef, s: str, config: SyntheticSuiteConfig) -> Example:
    """A training example of task ``d``; with probability ``prefix_prob`` it follows 1-2 generic segments, so
    the expert also works mid-sequence (the prefix is not a target and routes to no expert)."""
    if rng.random() >= config.prefix_prob:
        return Example.from_prompt(s + d.sep, d.apply(s), [d.name])
    prefix = " ".join(noise_segment(rng, config) for _ in range(rng.randint(1, 2))) + " "
    text = prefix + s + d.sep + d.apply(s)
    routing = [RoutingSpan(start=len(prefix), end=len(text), experts=[d.name])]
    return Example(text=text, targets=[(len(prefix) + len(s) + 1, len(text))], routing=routing)


def describe(d: TaskDef) -> str:
    what = {
        "constant": f"every character → {next(iter(d.table.values()), '')!r}",
        "classify": f"each character → one of {''.join(sorted(set(d.table.values())))!r}",
        "cipher": "a fixed permutation of the alphabet",
        "walk": "continue a fixed cycle through the alphabet from the last character",
    }.get(d.op, d.op)
    return f"{what}; inputs over {d.alphabet!r}, separator {d.sep!r}"


def held_in_task(d: TaskDef, config: SyntheticSuiteConfig) -> Task:
    rng = _rng(config.seed, "inputs", d.name)
    inputs = _unique_inputs(rng, d.alphabet, config.n_train + config.n_eval, config.min_len, config.max_len)
    eval_examples = [Example.from_prompt(s + d.sep, d.apply(s), [d.name]) for s in inputs[: config.n_eval]]
    train_examples = [train_example(rng, d, s, config) for s in inputs[config.n_eval :]]
    # a stream of its own, so adding a validation split changes neither the training nor the eval data
    used = set(inputs)
    more = _unique_inputs(_rng(config.seed, "validation", d.name), d.alphabet, config.n_validation,
                          config.min_len, config.max_len, need=lambda s: s not in used)  # fmt: skip
    validation = [Example.from_prompt(s + d.sep, d.apply(s), [d.name]) for s in more]
    return Task(
        name=d.name,
        split="held_in",
        condition="in_distribution",
        metric="exact_match",
        ceiling=1.0,
        experts=[d.name],
        description=describe(d),
        train=train_examples,
        validation=validation,
        eval=eval_examples,
    )


def switching_example(
    rng: random.Random, defs: list[TaskDef], config: SyntheticSuiteConfig, fn=None
) -> Example:
    k = rng.randint(*config.switch_segments)
    chosen: list[TaskDef] = []
    while len(chosen) < k:
        d = rng.choice(defs)
        if not chosen or d.name != chosen[-1].name:
            chosen.append(d)
    parts, targets, routing, offset = [], [], [], 0
    for d in chosen:
        s = "".join(rng.choice(d.alphabet) for _ in range(rng.randint(config.min_len, config.max_len)))
        out = fn(d, s) if fn else d.apply(s)
        text, target, span = _segment(s, out, [d.name], offset, d.sep)
        parts.append(text)
        targets.append(target)
        routing.append(span)
        offset += len(text) + 1
    return Example(text=" ".join(parts), targets=targets, routing=routing)


def blend_example(
    rng: random.Random, a: TaskDef, b: TaskDef, config: SyntheticSuiteConfig, fn=None
) -> Example:
    n = rng.randint(max(2, config.min_len), config.max_len)
    while True:
        s = "".join(rng.choice(a.alphabet + b.alphabet) for _ in range(n))
        if any(c in a.alphabet for c in s) and any(c in b.alphabet for c in s):
            break
    owner = [a if c in a.alphabet else b for c in s]
    out = fn(s, owner) if fn else "".join(o.table[c] for c, o in zip(s, owner))
    text = s + SEP + out
    labels = [[o.name] for o in owner] + [[a.name, b.name]] + [[o.name] for o in owner]
    return Example(text=text, targets=[(n + 1, len(text))], routing=label_runs(labels))


def label_runs(labels: list[list[str]]) -> list[RoutingSpan]:
    """Per-character expert lists → routing spans, one per run of equal labels."""
    spans: list[RoutingSpan] = []
    for i, lab in enumerate(labels):
        if spans and spans[-1].experts == lab and spans[-1].end == i:
            spans[-1].end = i + 1
        else:
            spans.append(RoutingSpan(start=i, end=i + 1, experts=lab))
    return spans


def markov_chain(config: SyntheticSuiteConfig) -> list[list[float]]:
    """A seeded order-1 transition matrix over `MARKOV_ALPHABET` with low entropy (2 likely successors)."""
    rng = _rng(config.seed, "markov")
    n = len(MARKOV_ALPHABET)
    rows = []
    for _ in range(n):
        w = [rng.random() * 0.2 for _ in range(n)]
        for j in rng.sample(range(n), 2):
            w[j] += 2.0 + rng.random() * 3.0
        total = sum(w)
        rows.append([x / total for x in w])
    return rows


def markov_text(rng: random.Random, chain: list[list[float]], length: int) -> str:
    idx = [rng.randrange(len(chain))]
    while len(idx) < length:
        idx.append(rng.choices(range(len(chain)), weights=chain[idx[-1]])[0])
    return "".join(MARKOV_ALPHABET[i] for i in idx)


def markov_entropy(text: str, chain: list[list[float]]) -> float:
    """Sum of the true conditional entropies (nats) of every character of ``text`` given the previous one."""
    n = len(chain)
    total = math.log(n)  # the first character is uniform
    for c in text[:-1]:
        row = chain[MARKOV_ALPHABET.index(c)]
        total -= sum(p * math.log(p) for p in row if p > 0)
    return total


def build_tasks(config: SyntheticSuiteConfig) -> tuple[list[Task], list[dict[str, str]], dict[str, Any]]:
    """``(tasks, pretraining rows, info)``, all from the seed."""
    defs = task_defs(config)
    tasks = [held_in_task(d, config) for d in defs]
    names = [d.name for d in defs]

    rng = _rng(config.seed, "switching")
    tasks.append(
        Task(
            name="switch",
            split="held_out",
            condition="switching",
            ceiling=1.0,
            experts=names,
            description=f"{config.switch_segments[0]}-{config.switch_segments[1]} held-in segments per sequence",
            eval=[switching_example(rng, defs, config) for _ in range(config.n_eval)],
        )
    )
    for i, j in BLENDS:
        if j < len(defs) and defs[i].op in TABLE_OPS and defs[j].op in TABLE_OPS:
            rng = _rng(config.seed, "blend", i, j)
            tasks.append(
                Task(
                    name=f"blend{i}_{j}",
                    split="held_out",
                    condition="composition",
                    ceiling=1.0,
                    experts=[defs[i].name, defs[j].name],
                    description=f"characters of {defs[i].name} and {defs[j].name} mixed, each mapped by its own task",
                    eval=[blend_example(rng, defs[i], defs[j], config) for _ in range(config.n_eval)],
                )
            )
    rng = _rng(config.seed, "copy")
    copy_inputs = _unique_inputs(rng, DIGITS, config.n_eval + 200, config.min_len, config.max_len)
    copy_eval = [Example.from_prompt(s + SEP, s) for s in copy_inputs[: config.n_eval]]
    tasks.append(
        Task(
            name="copy9",
            split="held_out",
            condition="unrelated",
            ceiling=1.0,
            description="copy a digit string (the base model learnt it; no expert covers it)",
            eval=copy_eval,
        )
    )
    chain = markov_chain(config)
    rng = _rng(config.seed, "markov-eval")
    markov_eval = [markov_text(rng, chain, config.markov_len) for _ in range(config.n_eval)]
    entropy = sum(markov_entropy(t, chain) for t in markov_eval) / (config.n_eval * config.markov_len)
    tasks.append(
        Task(
            name="markov9",
            split="held_out",
            condition="unrelated",
            metric="nll",
            ceiling=round(entropy, 6),
            description="order-1 Markov text over punctuation; nll per character against its true entropy",
            eval=[Example(text=t, targets=[(0, len(t))]) for t in markov_eval],
        )
    )
    pretrain = pretraining_rows(config, defs, copy_inputs[config.n_eval :], chain)
    info = {
        "alphabets": {d.name: d.alphabet for d in defs},
        "separators": {d.name: d.sep for d in defs},
        "markov_alphabet": MARKOV_ALPHABET,
    }
    return tasks, pretrain, info


def target_splits(config: SyntheticSuiteConfig, tasks: list[Task]) -> dict[str, list[Example]]:
    """``{held-out task: n_target labelled examples}``, the task's own training split for recipes that learn from
    the target task (few-shot: the first N; full: all). Each comes from a seeded stream of its own (so the
    experts, eval and pretraining data do not change) and no example's text equals one of the task's eval
    examples. Held-in tasks use their training examples (`Task.target_examples`)."""
    defs = {d.name: d for d in task_defs(config)}
    chain = markov_chain(config)
    out: dict[str, list[Example]] = {}
    for task in tasks:
        if task.held_in:
            continue
        rng = _rng(config.seed, "target", task.name)
        make: Callable[[], Example]
        if task.condition == "switching":
            order = list(defs.values())

            def make(rng: random.Random = rng, order: list[TaskDef] = order) -> Example:
                return switching_example(rng, order, config)
        elif task.condition == "composition":
            a, b = (defs[n] for n in task.experts)

            def make(rng: random.Random = rng, a: TaskDef = a, b: TaskDef = b) -> Example:
                return blend_example(rng, a, b, config)
        elif task.metric == "nll":

            def make(rng: random.Random = rng) -> Example:
                t = markov_text(rng, chain, config.markov_len)
                return Example(text=t, targets=[(0, len(t))])
        else:  # copy

            def make(rng: random.Random = rng) -> Example:
                n = rng.randint(config.min_len, config.max_len)
                s = "".join(rng.choice(DIGITS) for _ in range(n))
                return Example.from_prompt(s + SEP, s)

        held = {ex.text for ex in task.eval} | {ex.text for ex in task.validation}
        rows: list[Example] = []
        for _ in range(50 * config.n_target):
            if len(rows) == config.n_target:
                break
            ex = make()
            if ex.text not in held:
                held.add(ex.text)  # no duplicates within the split either
                rows.append(ex)
        out[task.name] = rows
    return out


def with_targets(suite: Suite, config: SyntheticSuiteConfig) -> Suite:
    """``suite`` with `target_splits` on its held-out tasks (a suite built before they existed gets them too)."""
    splits = target_splits(config, suite.tasks)
    tasks = [Task.model_validate({**dict(t), "target": splits[t.name]}) if t.name in splits else t
             for t in suite.tasks]  # fmt: skip
    return suite.model_copy(update={"tasks": tasks})


def pretraining_rows(
    config: SyntheticSuiteConfig, defs: list[TaskDef], copy_inputs: list[str], chain: list[list[float]]
) -> list[dict[str, str]]:
    """The broad mixture: formats with random outputs, switching/blended formats, copy, Markov, random words."""
    rng = _rng(config.seed, "pretrain")

    def random_out(d: TaskDef, s: str) -> str:
        return "".join(rng.choice(d.alphabet) for _ in range(len(d.apply(s))))

    def random_mix(s: str, owner: list[TaskDef]) -> str:
        return "".join(rng.choice(o.alphabet) for o in owner)

    kinds = ["format"] * 8 + ["switch"] * 3 + ["blend"] * 2 + ["copy"] * 3 + ["markov"] * 2 + ["words"] * 2
    rows: list[dict[str, str]] = []
    for _ in range(config.n_pretrain):
        kind = rng.choice(kinds)
        if kind == "format":
            d = rng.choice(defs)
            s = "".join(rng.choice(d.alphabet) for _ in range(rng.randint(config.min_len, config.max_len)))
            rows.append({"text": s + d.sep + random_out(d, s)})
        elif kind == "switch":
            rows.append({"text": switching_example(rng, defs, config, fn=random_out).text})
        elif kind == "blend":
            a, b = rng.sample(defs, 2)
            shared = set(a.alphabet) & set(b.alphabet)
            if shared:
                continue
            rows.append({"text": blend_example(rng, a, b, config, fn=random_mix).text})
        elif kind == "copy":
            s = rng.choice(copy_inputs)
            rows.append({"text": s + SEP + s})
        elif kind == "markov":
            rows.append({"text": markov_text(rng, chain, config.markov_len)})
        else:
            words = [
                "".join(rng.choice(POOL + DIGITS) for _ in range(rng.randint(2, 6)))
                for _ in range(rng.randint(2, 5))
            ]
            rows.append({"text": " ".join(words)})
    return rows


# ---------------------------------------------------------------- building and caching


def suite_folder(config: SyntheticSuiteConfig, root: str | Path | None = None) -> Path:
    return Path(root or default_root()).expanduser() / f"synthetic-{config.key()}"


def build_synthetic_suite(
    config: SyntheticSuiteConfig | None = None, root: str | Path | None = None, force: bool = False
) -> Suite:
    """The synthetic suite for ``config``: loaded from the cache, or built (a few minutes) and cached."""
    config = config or SyntheticSuiteConfig()
    suite = build_cached(
        suite_folder(config, root),
        lambda out, steps: _build_into(out, steps, config),
        force,
        progress=config.progress,
    )
    return with_targets(suite, config)


def dense_merged(model, expert):
    """A copy of ``model`` with ``expert``'s LoRA deltas added into its weights (for measuring an expert)."""
    import copy

    import torch

    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, lm in expert.lora.items():
            modules[name].weight += lm.delta_for_weight().to(modules[name].weight.dtype)
    return merged


def measure_suite(
    model, tokenizer, suite: Suite, experts: dict, multitask=None
) -> dict[str, dict[str, float]]:
    """Reference scores per task, computed with dense merges (no routing code involved):

    - ``base``, ``multitask``; ``oracle``: the task's own expert (held-in);
    - ``best_single``: the best one expert for the whole task (max exact match, min NLL);
    - ``oracle_per_example``: the best expert chosen per example (oracle per-example routing);
    - ``oracle_per_token``: each scored token predicted by the model of its ground-truth expert (the merge
      mean of its experts' logits when it has several; the base where it has none): oracle per-token
      model-level routing;
    - ``merge_task_experts``: the task's experts' deltas summed into the base (composition tasks).
    """
    import torch

    from moerge.bench.metrics import evaluate_task, span_exact_match

    names = list(experts)
    merged = {n: dense_merged(model, experts[n]) for n in names}
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for task in suite.tasks:
            row = {"base": evaluate_task(model, tokenizer, task)}
            if multitask is not None:
                row["multitask"] = evaluate_task(dense_merged(model, multitask), tokenizer, task)
            if task.oracle_expert in merged:
                row["oracle"] = evaluate_task(merged[task.oracle_expert], tokenizer, task)
            if task.condition == "composition" and all(n in experts for n in task.experts):
                combo = model
                for n in task.experts:
                    combo = dense_merged(combo, experts[n])
                row["merge_task_experts"] = evaluate_task(combo, tokenizer, task)
            if task.metric == "nll":
                row["best_single"] = min(evaluate_task(merged[n], tokenizer, task) for n in names)
                out[task.name] = {k: round(v, 4) for k, v in row.items()}
                continue
            per_expert, per_token, total = [], [], 0
            for batch in task.eval_batches(tokenizer, 64, experts=names):
                logits = torch.stack(
                    [merged[n](input_ids=batch.input_ids).logits for n in names]
                )  # [E,B,T,V]
                base_logits = model(input_ids=batch.input_ids).logits
                per_expert.append(torch.stack([span_exact_match(lg, batch) for lg in logits]))  # [E, S]
                # the logits at t predict token t + 1: route them by token t + 1's ground-truth experts
                want = batch.routes[:, 1:].float()  # [B, T-1, E]
                count = want.sum(-1, keepdim=True)
                mixed = torch.einsum("bte,ebtv->btv", want / count.clamp(min=1), logits[:, :, :-1])
                routed = torch.where(count > 0, mixed, base_logits[:, :-1])
                routed = torch.cat([routed, base_logits[:, -1:]], dim=1)
                per_token.append(span_exact_match(routed, batch))
                total += batch.n_spans
            em = torch.cat(per_expert, dim=1)  # [E, spans]
            row["best_single"] = float(em.mean(1).max())
            spans_per_example = [len(ex.targets) for ex in task.eval]
            per_example = [float(chunk.mean(1).max()) for chunk in em.split(spans_per_example, dim=1)]
            row["oracle_per_example"] = sum(n * v for n, v in zip(spans_per_example, per_example)) / max(
                1, total
            )
            row["oracle_per_token"] = float(torch.cat(per_token).mean())
            out[task.name] = {k: round(v, 4) for k, v in row.items()}
    return out


def _build_into(out: Path, steps: BuildSteps, config: SyntheticSuiteConfig) -> None:
    import torch

    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        _build_steps(out, steps, config)
    finally:
        torch.set_num_threads(threads)


def _build_steps(out: Path, steps: BuildSteps, config: SyntheticSuiteConfig) -> None:
    """The build's steps in order; each one `steps` finds complete (an interrupted build) is skipped."""
    import shutil

    import torch
    from peft import get_peft_model  # noqa: F401  (import cost outside the timings)
    from transformers import LlamaForCausalLM  # noqa: F401

    from moerge.backbones.tiny import build_tiny_model
    from moerge.experts.fingerprint import fingerprint_model
    from moerge.experts.library import ExpertLibrary
    from moerge.progress import quiet_transformers
    from moerge.train.pretrain import pretrain_model

    t0, c0 = time.perf_counter(), time.process_time()
    tasks, pretrain_rows, info = build_tasks(config)
    key = config.key()
    suite = Suite(name=f"synthetic-{key}", tasks=tasks, experts=[t.name for t in tasks if t.held_in], info={})
    suite = with_targets(suite, config)  # written with the suite, so its folder alone is complete
    steps.time("data", time.perf_counter() - t0, time.process_time() - c0)

    model, tokenizer = build_tiny_model(config.model)
    base_id = f"moerge-synthetic-{key}"

    def pretrain() -> dict[str, Any]:
        shutil.rmtree(out / "base", ignore_errors=True)  # what an interrupted pretraining left
        pre = pretrain_model(
            model, tokenizer, pretrain_rows, config.pretrain.model_copy(update={"progress": config.progress})
        )
        model.config._name_or_path = base_id
        with quiet_transformers():  # no "Writing model shards" bar in a build's log
            model.save_pretrained(out / "base")
            tokenizer.save_pretrained(out / "base")
        return {"first_loss": pre.first_loss, "final_loss": pre.final_loss, "steps": pre.steps}

    pre = steps.run("pretrain", "pretrain", "pretraining the base model", pretrain)
    if "pretrain" in steps.earlier:  # pretrained by an interrupted run: its weights, bit for bit
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(out / "base" / "model.safetensors")))
        model.config._name_or_path = base_id
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fingerprint = fingerprint_model(model)

    experts, multitask = train_suite_experts(
        model, tokenizer, suite, out, steps, expert_config=config.expert, multitask_config=config.multitask,
        base_id=base_id, fingerprint=fingerprint, tags=["synthetic"], progress=config.progress,
    )  # fmt: skip
    lib = ExpertLibrary.open(out / "library")

    # The contributors' routing artifacts: PHATGOOSE gates (trained as the authors do) and hidden centroids.
    contributor_signatures(model, tokenizer, suite, lib, gate_steps=config.gate_steps, steps=steps)

    # Does each zero-shot router's premise hold on this suite? (moerge.bench.premise)
    premise = steps.run(
        "premise", "premise", "premise diagnostics",
        lambda: suite_premise(
            model, tokenizer, suite, experts, lib, gate_steps=config.gate_steps, seq_len=config.expert.seq_len
        ).to_dict(),
    )  # fmt: skip

    # Measure what the build produced: base, oracle expert, multitask and oracle routings per task.
    scores = steps.run(
        "measure", "measure", "scores of the base, the oracle experts, the multitask LoRA and oracle routings",
        lambda: measure_suite(model, tokenizer, suite, experts, multitask),
    )  # fmt: skip

    steps.stage("writing the suite")
    timings, cpu = steps.phase_times()
    for times in (timings, cpu):
        times["artifacts"] = times.pop("signatures", 0.0)
        times["total"] = sum(
            times.get(k, 0.0) for k in ("data", "pretrain", "experts", "multitask", "artifacts")
        )
    cpu["experts+multitask"] = cpu.pop("experts", 0.0) + cpu.pop("multitask", 0.0)
    suite.info = {
        "generator": "moerge.bench.suites.synthetic",
        "version": SUITE_VERSION,
        "key": key,
        "base_model_id": base_id,
        "base_fingerprint": fingerprint,
        **info,
    }
    write_jsonl_suite(suite, out, base_model="base", library="library", baselines="baselines")
    (out / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pretrain_rows))
    build = {
        "config": config.model_dump(mode="json"),
        "key": key,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "resumed": steps.earlier,
        "torch_threads": torch.get_num_threads(),
        "pretrain": pre,
        "experts": {n: e.metadata.training for n, e in experts.items()},
        "multitask": multitask.metadata.training,
        "scores": scores,
        "premise": premise,
        "markov_chain": markov_chain(config),
    }
    (out / "build.json").write_text(json.dumps(build, indent=2))


def read_build_info(suite: Suite) -> dict[str, Any]:
    """The ``build.json`` of a built synthetic suite (timings, training summaries, base/oracle scores)."""
    if not suite.root:
        raise SuiteError(f"suite {suite.name!r} was not loaded from a folder, so it has no build.json")
    return json.loads((Path(suite.root) / "build.json").read_text())


SCORE_COLUMNS = [
    ("base", "base"),
    ("oracle", "oracle"),
    ("best_single", "best1"),
    ("oracle_per_example", "or/ex"),
    ("oracle_per_token", "or/tok"),
    ("merge_task_experts", "merge"),
    ("multitask", "multi"),
]


def format_scores(suite: Suite, scores: dict[str, dict[str, float]]) -> str:
    """A plain-text table of `measure_suite` scores (Markdown-compatible)."""
    head = ["task", "split", "condition", "metric", "ceiling"] + [short for _, short in SCORE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in suite.tasks:
        s = scores.get(task.name, {})
        cells = [
            task.name,
            task.split,
            task.condition,
            task.metric,
            f"{task.ceiling:.3f}" if task.ceiling else "-",
        ]
        cells += [f"{s[k]:.3f}" if k in s else "-" for k, _ in SCORE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Build (or load) the synthetic suite and print its build report."
    )
    parser.add_argument("--reduced", action="store_true", help="the reduced test configuration")
    parser.add_argument("--root", default=None, help="cache root (default ~/.cache/moerge/suites)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while building")
    args = parser.parse_args(argv)
    kw: dict[str, Any] = {"seed": args.seed, "threads": args.threads}
    config = SyntheticSuiteConfig.reduced(**kw) if args.reduced else SyntheticSuiteConfig(**kw)
    t = time.perf_counter()
    suite = build_synthetic_suite(config, root=args.root, force=args.force)
    wall = time.perf_counter() - t
    build = read_build_info(suite)
    print(f"suite {suite.name} at {suite.root} ({wall:.1f} s wall for this call)")
    print("build wall (s):", json.dumps(build["timings_s"]), "torch threads:", build["torch_threads"])
    print("build CPU  (s):", json.dumps(build["cpu_s"]))
    print(format_scores(suite, build["scores"]))
    if "premise" in build:
        from moerge.bench.premise import PremiseReport, format_premise

        print()
        print(format_premise(PremiseReport.from_dict(build["premise"])))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
