"""What every built-in suite builder shares: where built suites are cached, building into a staging folder that
is renamed into place only when complete, and training the suite's experts (one LoRA per held-in task and a
multitask LoRA on their union) into the suite's libraries."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
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
