"""What every built-in suite builder shares: where built suites are cached, building into a staging folder that
is renamed into place only when complete, training the suite's experts (one LoRA per held-in task and a
multitask LoRA on their union) into the suite's libraries, the contributors' routing signatures stored beside
them (`contributor_signatures`), the premise diagnostics (`suite_premise`) and NLL measurements with an expert
folded into the weights (`nll_table`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from moerge.bench.suites.format import Suite, load_jsonl_suite

BUILD_FILE = "build.json"


def default_root() -> Path:
    """Where built suites are cached: ``$MOERGE_CACHE/suites`` or ``~/.cache/moerge/suites``."""
    base = os.environ.get("MOERGE_CACHE")
    return Path(base) / "suites" if base else Path.home() / ".cache" / "moerge" / "suites"


def is_built(folder: Path) -> bool:
    return (folder / BUILD_FILE).is_file() and (folder / "suite.yaml").is_file()


def build_cached(folder: Path, build: Callable[[Path], None], force: bool = False) -> Suite:
    """The suite in ``folder``: loaded when built, else ``build(staging)`` into a hidden sibling folder that is
    renamed into place when complete, so an interrupted build leaves nothing half-written behind. When another
    process finishes the same build first, its result is kept."""
    if is_built(folder) and not force:
        return load_jsonl_suite(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        build(staging)
        if folder.exists():
            if not force and is_built(folder):  # another process finished first
                return load_jsonl_suite(folder)
            shutil.rmtree(folder)
        try:
            os.replace(staging, folder)
        except OSError:
            if not is_built(folder):  # not a concurrent build finishing first: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_jsonl_suite(folder)


def train_suite_experts(
    model: Any,
    tokenizer: Any,
    suite: Suite,
    out: Path,
    *,
    expert_config: Any,
    multitask_config: Any,
    base_id: str,
    fingerprint: str,
    tags: list[str],
    progress: bool = True,
    multitask_description: str = "LoRA on the union of the held-in tasks' training data",
) -> tuple[dict[str, Any], Any, dict[str, float]]:
    """Train one LoRA per held-in task into ``out/library`` (seeds ``expert_config.seed + i``) and a multitask
    LoRA on their union into ``out/baselines``; returns ``(experts by task, multitask expert, timings)``."""
    from moerge.experts.library import ExpertLibrary
    from moerge.train.lora import train_expert, train_multitask_expert

    timings: dict[str, float] = {}
    t = time.perf_counter()
    lib = ExpertLibrary.create(out / "library", base_model=base_id, base_fingerprint=fingerprint)
    experts = {}
    for i, task in enumerate(suite.held_in):
        cfg = expert_config.model_copy(update={"seed": expert_config.seed + i, "progress": progress})
        experts[task.name] = train_expert(
            model, tokenizer, task.training_rows(), cfg, library=lib, name=task.name, task=task.name,
            base_model_id=base_id, tags=tags, description=task.description,
        )  # fmt: skip
    timings["experts"] = time.perf_counter() - t

    t = time.perf_counter()
    baselines = ExpertLibrary.create(out / "baselines", base_model=base_id, base_fingerprint=fingerprint)
    multitask = train_multitask_expert(
        model, tokenizer, {k: v for k, v in suite.training_data().items() if k in experts},
        multitask_config.model_copy(update={"progress": progress}), library=baselines, name="multitask",
        base_model_id=base_id, description=multitask_description,
    )  # fmt: skip
    timings["multitask"] = time.perf_counter() - t
    return experts, multitask, timings


def contributor_signatures(
    model: Any, tokenizer: Any, suite: Suite, library: Any, *, gate_steps: int = 100
) -> list[str]:
    """What each contributor computes beside its expert and stores in ``library``, through the recipes' own
    signatures (`moerge.recipes.facade.prepare_signatures`) from the held-in tasks' training rows: PHATGOOSE
    gates (trained as the authors do, `moerge.train.gates`; ``gate_steps`` steps, theirs: 100) and the
    hidden-state centroids of its training data (average activation). The benchmark runner finds them there and
    does not recompute them. Returns one line per signature computed."""
    from moerge.recipes.facade import prepare_signatures
    from moerge.train.prefix import cached_prefix

    data = {task.name: task.training_rows() for task in suite.held_in}
    with cached_prefix(model, _first_adapted_layer(model, [library.get(n) for n in data if n in library])):
        return prepare_signatures(
            "phatgoose", model, tokenizer, library, data, gate_steps=gate_steps
        ) + prepare_signatures("average_activation", model, tokenizer, library, data)


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
