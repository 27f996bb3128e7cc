"""What every built-in suite builder shares: where built suites are cached, building into a partial folder that
is renamed into place only when complete and resumed after an interruption (`build_cached`, `BuildSteps`),
training the suite's experts (one LoRA per held-in task and a multitask LoRA on their union) into the suite's
libraries, the contributors' routing signatures stored beside them (`contributor_signatures`), the premise
diagnostics (`suite_premise`) and NLL measurements with an expert folded into the weights (`nll_table`).

A build of ``<root>/<name>`` happens in ``<root>/.<name>.partial`` while ``<root>/.<name>.lock`` (an ``flock``
holding the builder's pid) is held: a second builder of the same suite waits for the first and then loads its
result; a lock left by a dead process is free (the kernel drops it). Each completed step — an expert added to the
library, the multitask LoRA, a signature of an expert, the premise, the measurements — is kept there, so the next
call with the same configuration after an interruption (Ctrl-C, a kill, a crash) skips it; ``force=True``
(``--rebuild``) discards the partial folder first."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from moerge.bench.suites.format import Suite, load_jsonl_suite
from moerge.errors import SuiteError
from moerge.progress import stages
from moerge.recipes.progress import SignatureProgress

BUILD_FILE = "build.json"
STEPS_DIR = (
    ".steps"  # inside the partial folder: one record per completed step (removed when the build is done)
)

T = TypeVar("T")


def default_root() -> Path:
    """Where built suites are cached: ``$MOERGE_CACHE/suites`` or ``~/.cache/moerge/suites``."""
    base = os.environ.get("MOERGE_CACHE")
    return Path(base) / "suites" if base else Path.home() / ".cache" / "moerge" / "suites"


def is_built(folder: Path) -> bool:
    return (folder / BUILD_FILE).is_file() and (folder / "suite.yaml").is_file()


def partial_folder(folder: Path) -> Path:
    """Where the suite ``folder`` is built until it is complete (kept after an interruption, for resuming)."""
    return folder.parent / f".{folder.name}.partial"


def lock_file(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def build_cached(
    folder: Path, build: Callable[[Path, BuildSteps], None], force: bool = False, *, progress: bool = True
) -> Suite:
    """The suite in ``folder``: loaded when built, else ``build(partial, steps)`` into `partial_folder`, which is
    renamed into place when complete. Holding the build's lock (another builder of the same suite is waited
    for, and its result loaded); an interrupted build is resumed (``steps`` knows what it completed), unless
    ``force``. ``progress``: the build's stages on stderr (`moerge.progress.stages`)."""
    if is_built(folder) and not force:
        return load_jsonl_suite(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(folder.parent)
    with stages(f"building {folder.name}", enabled=progress) as stage, _build_lock(folder, stage):
        if is_built(folder) and not force:  # another process built it while this one waited
            return load_jsonl_suite(folder)
        partial = partial_folder(folder)
        if force:
            shutil.rmtree(partial, ignore_errors=True)
        elif (partial / STEPS_DIR).is_dir():
            stage(f"resuming the interrupted build in {partial}")
        partial.mkdir(exist_ok=True)
        try:
            build(partial, BuildSteps(partial, stage))
        except BaseException:
            print(
                f"moerge: the interrupted build of {folder.name} is kept in {partial}; the next run with the "
                "same settings resumes it (--rebuild starts over).",
                file=sys.stderr,
                flush=True,
            )
            raise
        shutil.rmtree(partial / STEPS_DIR)
        old = folder.parent / f".{folder.name}.old"
        if folder.exists():  # force: the previous build goes only once the new one is complete
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(partial, folder)
        shutil.rmtree(old, ignore_errors=True)
    return load_jsonl_suite(folder)


@contextlib.contextmanager
def _build_lock(folder: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Hold the build lock of ``folder`` (an ``flock`` on `lock_file`, which holds this process's pid), waiting
    for another builder; the file is removed when released."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: builds are not serialised
        yield
        return
    path = lock_file(folder)
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                say(f"waiting for process {_holder(fd)}, which is building this suite (lock {path})")
                waited = True
            os.close(fd)
            time.sleep(1.0)
            continue
        try:  # the holder before us may have removed the file after we opened it: lock the one at `path`
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip() or "?"
    except (OSError, UnicodeDecodeError):
        return "?"


def remove_dead_staging(root: Path) -> list[Path]:
    """Remove the per-process staging folders (``.<name>.<pid>.tmp``) that builds before resuming existed left
    behind when their process died; returns them."""
    removed = []
    for p in root.glob(".*.tmp"):
        m = re.fullmatch(r"\.(.+)\.(\d+)\.tmp", p.name)
        if m and p.is_dir() and not p.is_symlink() and not _alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    return True


class BuildSteps:
    """The steps of one suite build in its partial folder ``out``: which a previous, interrupted run completed
    (a record each in ``out/.steps``, written once the step's output is complete), how long each took, and the
    stage shown while one runs (``stage(text)``: `moerge.progress.stages`)."""

    def __init__(self, out: Path, stage: Callable[[str], None] = lambda text: None):
        self.folder = Path(out) / STEPS_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.earlier = sorted(p.stem for p in self.folder.glob("*.json"))  # completed before this run
        self.timings: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def _path(self, key: str) -> Path:
        return self.folder / (re.sub(r"[^\w.-]", "_", key) + ".json")

    def read(self, key: str) -> dict[str, Any] | None:
        """The record of step ``key`` if a run completed it."""
        try:
            return json.loads(self._path(key).read_text())
        except FileNotFoundError:
            return None

    def record(self, key: str, phase: str, seconds: float, cpu: float, **extra: Any) -> None:
        """Step ``key`` (of ``phase``) is complete: its record, written atomically."""
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"phase": phase, "seconds": seconds, "cpu_seconds": cpu, **extra}))
        os.replace(tmp, path)

    def run(
        self,
        key: str,
        phase: str,
        label: str,
        compute: Callable[[], T],
        done: Callable[[], T | None] | None = None,
    ) -> T:
        """Step ``key``'s result: ``done()`` when it finds the step's output complete (an expert in its library),
        else — without ``done`` — the JSON value a previous run recorded; otherwise ``compute()``, shown as
        ``label``, and recorded (with its value when there is no ``done``)."""
        if done is not None:
            found = done()
            if found is not None:
                return found
        else:
            rec = self.read(key)
            if rec is not None and "value" in rec:
                return rec["value"]
        self.stage(label)
        t, c = time.perf_counter(), time.process_time()
        value = compute()
        extra = {"value": value} if done is None else {}
        self.record(key, phase, time.perf_counter() - t, time.process_time() - c, **extra)
        return value

    def time(self, phase: str, seconds: float, cpu: float = 0.0) -> None:
        """A phase that runs on every call (reading data, loading the base model)."""
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds
        self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu

    def phase_times(self) -> tuple[dict[str, float], dict[str, float]]:
        """``(wall, cpu)`` seconds per phase: this run's `time` calls plus every recorded step, this run's and
        the interrupted runs' before it (so a resumed build reports what the whole build cost)."""
        wall, cpu = dict(self.timings), dict(self.cpu)
        for p in sorted(self.folder.glob("*.json")):
            rec = json.loads(p.read_text())
            wall[rec["phase"]] = wall.get(rec["phase"], 0.0) + rec["seconds"]
            cpu[rec["phase"]] = cpu.get(rec["phase"], 0.0) + rec["cpu_seconds"]
        return wall, cpu


class _SignatureSteps(SignatureProgress):
    """`prepare_signatures`' progress as build steps: each (signature, expert) is shown as ``kind i/n expert``
    (counting those a previous run computed) and recorded with its time."""

    def __init__(self, steps: BuildSteps, n_experts: int):
        self.build, self.n = steps, n_experts
        self.i = self.of = 0
        self.label = ""
        self.t = self.c = 0.0

    def add(self, total: int) -> None:  # a recipe's signatures: ``total`` (signature, expert) pairs missing
        self.i, self.of = (self.n - total, self.n) if total <= self.n else (0, total)

    def start(self, label: str) -> None:
        self.i += 1
        self.label = label
        kind, _, name = label.partition(" · ")
        self.build.stage(f"{kind} {self.i}/{self.of} {name}")
        self.t, self.c = time.perf_counter(), time.process_time()

    def finish(self) -> None:
        self.build.record(
            "signature-" + self.label.replace(" · ", "-"), "signatures",
            time.perf_counter() - self.t, time.process_time() - self.c,
        )  # fmt: skip


def _library(folder: Path, base_id: str, fingerprint: str) -> Any:
    """The library at ``folder``: opened when a previous run created it, else created (afresh when a previous
    run died before the library's own file was written)."""
    from moerge.experts.library import LIBRARY_FILE, ExpertLibrary

    if not (folder / LIBRARY_FILE).is_file():
        shutil.rmtree(folder, ignore_errors=True)
    return ExpertLibrary.create(folder, base_model=base_id, base_fingerprint=fingerprint, exist_ok=True)


def train_suite_experts(
    model: Any,
    tokenizer: Any,
    suite: Suite,
    out: Path,
    steps: BuildSteps,
    *,
    expert_config: Any,
    multitask_config: Any,
    base_id: str,
    fingerprint: str,
    tags: list[str],
    progress: bool = True,
    multitask_description: str = "LoRA on the union of the held-in tasks' training data",
) -> tuple[dict[str, Any], Any]:
    """Train one LoRA per held-in task into ``out/library`` (seeds ``expert_config.seed + i``) and a multitask
    LoRA on their union into ``out/baselines``, each a step of ``steps`` (one found in its library is loaded,
    not trained again); returns ``(experts by task, multitask expert)``."""
    from moerge.train.lora import train_expert, train_multitask_expert

    lib = _library(out / "library", base_id, fingerprint)
    held_in = suite.held_in
    experts = {}
    for i, task in enumerate(held_in):
        cfg = expert_config.model_copy(update={"seed": expert_config.seed + i, "progress": progress})
        experts[task.name] = steps.run(
            f"expert-{task.name}", "experts", f"expert {i + 1}/{len(held_in)} {task.name}",
            lambda task=task, cfg=cfg: train_expert(
                model, tokenizer, task.training_rows(), cfg, library=lib, name=task.name, task=task.name,
                base_model_id=base_id, tags=tags, description=task.description,
            ),
            done=lambda name=task.name: lib.get(name) if name in lib else None,
        )  # fmt: skip

    baselines = _library(out / "baselines", base_id, fingerprint)
    multitask = steps.run(
        "multitask", "multitask", f"multitask LoRA on {len(experts)} tasks",
        lambda: train_multitask_expert(
            model, tokenizer, {k: v for k, v in suite.training_data().items() if k in experts},
            multitask_config.model_copy(update={"progress": progress}), library=baselines, name="multitask",
            base_model_id=base_id, description=multitask_description,
        ),
        done=lambda: baselines.get("multitask") if "multitask" in baselines else None,
    )  # fmt: skip
    return experts, multitask


def contributor_signatures(
    model: Any,
    tokenizer: Any,
    suite: Suite,
    library: Any,
    *,
    gate_steps: int = 100,
    steps: BuildSteps | None = None,
) -> list[str]:
    """What each contributor computes beside its expert and stores in ``library``, through the recipes' own
    signatures (`moerge.recipes.facade.prepare_signatures`) from the held-in tasks' training rows: PHATGOOSE
    gates (trained as the authors do, `moerge.train.gates`; ``gate_steps`` steps, theirs: 100) and the
    hidden-state centroids of its training data (average activation). The benchmark runner finds them there and
    does not recompute them; those already there (a resumed build) are kept. ``steps``: each (signature,
    expert) is shown and recorded as a step of that build. Returns one line per signature computed."""
    from moerge.recipes.facade import prepare_signatures
    from moerge.train.prefix import cached_prefix

    data = {task.name: task.training_rows() for task in suite.held_in}
    progress = _SignatureSteps(steps, len(data)) if steps is not None else None
    with cached_prefix(model, _first_adapted_layer(model, [library.get(n) for n in data if n in library])):
        return prepare_signatures(
            "phatgoose", model, tokenizer, library, data, gate_steps=gate_steps, progress=progress
        ) + prepare_signatures("average_activation", model, tokenizer, library, data, progress=progress)


def _first_adapted_layer(model: Any, experts: Sequence[Any]) -> int | None:
    """The lowest decoder layer any of ``experts`` adapts (None: none, or a module outside the layers)."""
    from moerge.train.prefix import first_layer

    modules = set().union(*(e.lora for e in experts)) if experts else set()
    return first_layer(model, modules) if modules else None


def suite_premise(
    model: Any,
    tokenizer: Any,
    suite: Suite,
    experts: Mapping[str, Any],
    library: Any,
    *,
    gate_steps: int = 100,
    seq_len: int | None = None,
    max_rows: int | None = None,
) -> Any:
    """`moerge.bench.premise.measure_premise` of the held-in experts on their tasks' training rows, against the
    zero-shot routers' signatures in ``library`` (PHATGOOSE's at ``gate_steps``): a `PremiseReport`.

    When every expert adapts only decoder layers ``K…``, the inputs are collected from layer ``K`` on, fed the
    output of the layers below for each training row as training computed it
    (`moerge.train.prefix.prefix_batches`, shared inside ``shared_prefix()``; checked against the full model on
    each expert's first batch): the same inputs, without running the frozen layers again."""
    from moerge.bench.premise import (
        collect_target_inputs,
        measure_premise,
        premise_diagnostics,
        recipe_signatures,
    )
    from moerge.train.data import encode_examples, pad_batch
    from moerge.train.prefix import check_truncation, prefix_batches, truncated

    held_in = [t for t in suite.held_in if t.name in experts]
    chosen = [experts[t.name] for t in held_in]
    data = {t.name: t.training_rows() for t in held_in}
    options = {"phatgoose": {"gate_steps": gate_steps}}
    start = _first_adapted_layer(model, chosen) or 0
    modules = sorted(set.intersection(*(set(e.lora) for e in chosen))) if chosen else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inputs = {}
    for e in chosen if start else []:
        length = seq_len or int((e.metadata.training or {}).get("seq_len", 128))
        enc = encode_examples(tokenizer, list(data[e.name])[:max_rows], length)
        batches = [
            pad_batch(enc.ids[i : i + 64], enc.labels[i : i + 64], pad) for i in range(0, len(enc), 64)
        ]
        cached = prefix_batches(model, batches, start)
        if not check_truncation(model, batches[0], cached[0][0], start):
            break  # the model does not take a later layer's input as inputs_embeds: the plain path below
        with truncated(model, start):
            inputs[e.name] = collect_target_inputs(model, cached, modules)
    if len(inputs) == len(chosen) >= 2:
        signatures = recipe_signatures(model, library, chosen, modules, options=options)
        return premise_diagnostics(chosen, inputs, signatures, modules)
    return measure_premise(
        model, tokenizer, data, chosen, library, seq_len=seq_len, max_rows=max_rows, options=options
    )


@contextlib.contextmanager
def expert_merged(model: Any, expert: Any = None) -> Iterator[Any]:
    """Within the block, ``model``'s weights hold ``expert``'s LoRA deltas (exact for LoRA); the touched
    weights are restored bit for bit afterwards. ``expert=None``: the base model."""
    import torch

    saved = {}
    try:
        with torch.no_grad():
            for name, lm in expert.lora.items() if expert is not None else ():
                w = model.get_submodule(name).weight
                saved[name] = w.detach().clone()
                w += lm.delta_for_weight().to(w.dtype)
        yield model
    finally:
        with torch.no_grad():
            for name, w0 in saved.items():
                model.get_submodule(name).weight.copy_(w0)


def nll_table(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Any],
    models: Mapping[str, Any],
    *,
    part: str = "eval",
    limit: int | None = None,
    batch_size: int = 32,
) -> dict[str, dict[str, float]]:
    """Mean NLL per target token (nats) of ``{name: expert or None (the base)}`` on each task's ``part``
    examples (``eval``, ``validation`` or ``train``, the first ``limit``): ``{name: {task: nll}}``.

    Each expert is folded into the weights (`expert_merged`). When every expert adapts only decoder layers
    ``K…``, the layers below run once per passage (`moerge.train.prefix.cached_prefix`)."""
    import torch

    from moerge.bench.metrics import target_nll
    from moerge.train.prefix import cached_prefix

    out: dict[str, dict[str, float]] = {name: {} for name in models}
    adapted = [e for e in models.values() if e is not None]
    with torch.no_grad(), cached_prefix(model, _first_adapted_layer(model, adapted)):
        for task in tasks:
            examples = list(getattr(task, part))[:limit]
            if not examples:
                continue
            view = task.model_copy(update={"eval": examples})
            batches = list(view.eval_batches(tokenizer, batch_size, experts=[]))
            for name, expert in models.items():
                total, count = 0.0, 0
                with expert_merged(model, expert):
                    for b in batches:
                        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                        s, c = target_nll(logits, b.labels)
                        total, count = total + s, count + c
                out[name][task.name] = round(total / max(1, count), 4)
    return out


def full_library_folder(suite: Suite, config: Any) -> Path:
    """Where `build_full_library` keeps ``suite``'s full-fine-tune library for ``config`` (a
    `moerge.train.full.FullTrainConfig`): ``<suite folder>/full-<hash of the config>/``, beside the suite's own
    files, so the suite's cache key is unchanged and each training setting has its own library."""
    if not suite.root:
        raise SuiteError(
            f"suite {suite.name!r} was not loaded from a folder; a full-fine-tune library is built beside one"
        )
    data = config.model_dump(mode="json")
    data.pop("progress", None)
    key = hashlib.sha256(json.dumps({"full": 1, "config": data}, sort_keys=True).encode()).hexdigest()[:12]
    return Path(suite.root) / f"full-{key}"


def build_full_library(suite: Suite, config: Any, *, force: bool = False, progress: bool = True) -> Any:
    """The suite's second, optional library: one full fine-tune per held-in task (`moerge.train.full`, on the
    same training rows as its LoRA expert, seed ``config.seed + i``), stored as dense task vectors under the
    same names. Built on first use and cached (`full_library_folder`; ``build.json`` marks it complete and
    records each expert's training summary); an interrupted build keeps the experts it finished. Returns the
    `ExpertLibrary`."""
    from moerge.experts.library import ExpertLibrary
    from moerge.train.full import train_full_expert

    folder = full_library_folder(suite, config)
    done = folder / "build.json"
    if done.is_file() and not force:
        return ExpertLibrary.open(folder / "library")
    folder.mkdir(parents=True, exist_ok=True)
    with stages(f"full fine-tunes for {suite.name}", enabled=progress) as stage, _build_lock(folder, stage):
        if done.is_file() and not force:
            return ExpertLibrary.open(folder / "library")
        if force:
            shutil.rmtree(folder / "library", ignore_errors=True)
            done.unlink(missing_ok=True)
        model, tokenizer = suite.load_base()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        base_id = str(
            suite.info.get("base_model_id") or getattr(model.config, "_name_or_path", "") or suite.name
        )
        from moerge.experts.fingerprint import fingerprint_model

        lib = _library(folder / "library", base_id, fingerprint_model(model))
        summaries: dict[str, Any] = {}
        t0 = time.perf_counter()
        held_in = [t for t in suite.held_in if t.name in suite.experts or not suite.experts]
        for i, task in enumerate(held_in):
            if task.name in lib:
                summaries[task.name] = lib.get(task.name).metadata.training
                continue
            stage(f"full fine-tune {i + 1}/{len(held_in)} {task.name}")
            cfg = config.model_copy(update={"seed": config.seed + i, "progress": progress})
            expert = train_full_expert(
                model, tokenizer, task.training_rows(), cfg, library=lib, name=task.name, task=task.name,
                base_model_id=base_id, tags=["full"], description=task.description,
            )  # fmt: skip
            summaries[task.name] = expert.metadata.training
        for task in held_in if config.stats_rows else ():  # the contributors' statistics (Fisher, RegMean)
            stage(f"merge statistics of {task.name}")
            full_expert_stats(model, tokenizer, lib, task.name, task.training_rows()[: config.stats_rows],
                              config.seq_len)  # fmt: skip
        info = {
            "config": config.model_dump(mode="json"),
            "suite": suite.name,
            "seconds": round(time.perf_counter() - t0, 2),
            "experts": summaries,
        }
        tmp = done.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, done)
    return ExpertLibrary.open(folder / "library")


STATS_CONFIG = {"data": "expert training rows", "fisher": "sampled"}


def full_expert_stats(
    model: Any, tokenizer: Any, lib: Any, name: str, rows: Sequence[Mapping[str, str]], seq_len: int
) -> None:
    """What a full fine-tune's contributor shares for the data-aware merges, computed with its task vector
    folded into ``model`` on ``rows`` (its first training rows) and stored as library
    artifacts (kinds ``fisher`` and ``gram``, config `STATS_CONFIG`, which `moerge.merging.api.merge` reads as
    ``stats_config``): the diagonal Fisher of the parameters it updates (Matena & Raffel) and the Gram matrices
    of its linear layers' inputs (RegMean, Jin et al.). Those already stored are kept."""
    import copy

    import torch

    from moerge.merging.stats import fisher_diagonal, gram_matrices

    if lib.get_artifact("fisher", STATS_CONFIG, name) and lib.get_artifact("gram", STATS_CONFIG, name):
        return
    expert = lib.get(name)
    tuned = copy.deepcopy(model)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for key, d in expert.dense.items():
            params[key] += d.to(params[key].dtype)
    texts = [r["text"] if "text" in r else r["prompt"] + r["completion"] for r in rows]
    batches = [
        dict(
            tokenizer(
                texts[i : i + 16], return_tensors="pt", padding=True, truncation=True, max_length=seq_len
            )
        )
        for i in range(0, len(texts), 16)
    ]
    for key in expert.dense:
        params[key].requires_grad_(True)
    fisher = fisher_diagonal(tuned, batches, params=list(expert.dense), seed=0)
    grams, _ = gram_matrices(tuned, batches)
    info = {"rows": len(texts)}
    lib.put_artifact("fisher", STATS_CONFIG, name, {k: v.contiguous() for k, v in fisher.items()}, info)
    lib.put_artifact("gram", STATS_CONFIG, name, {k: v.contiguous() for k, v in grams.items()}, info)
