"""Training many experts from a manifest (``moerge train --manifest tasks.jsonl``), on any executor.

A manifest is JSONL, one expert per line: ``{"name": …, "data": "path/to/rows.jsonl", "task": …, "tags": […],
"config": {TrainConfig fields}}`` (``data`` relative to the manifest's folder; ``config`` overrides the shared
training settings for that expert). Every line is validated and every data file read before anything trains.
Workers train and return the experts; this process adds them to the library, one at a time, so the library has
one writer — an expert is in the library once its add commits, and a rerun skips the experts already there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moerge.errors import DataFormatError, InputNotFoundError, MalformedConfigError


class ManifestEntry(BaseModel):
    """One expert of a manifest."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    data: str = Field(min_length=1, description="JSONL training rows, relative to the manifest's folder")
    task: str | None = None
    tags: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields for this expert")


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """The manifest's entries, each checked (fields, a unique name, an existing data file)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such manifest file")
    entries: list[ManifestEntry] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(ManifestEntry.model_validate(json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{i}: not JSON ({e.msg}); one JSON object per line") from None
        except ValidationError as e:
            err = e.errors()[0]
            raise MalformedConfigError(
                f"{path}:{i}: {'.'.join(map(str, err['loc'])) or 'line'}: {err['msg']} (fields: name, data, task, "
                "tags, config)"
            ) from None
    if not entries:
        raise DataFormatError(f"{path}: the manifest lists no experts")
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise MalformedConfigError(f"{path}: expert {e.name!r} is listed twice")
        seen.add(e.name)
        if not (path.parent / e.data).is_file():
            raise InputNotFoundError(
                f"{path}: expert {e.name!r}: data file {path.parent / e.data} does not exist"
            )
    return entries


@dataclass(frozen=True)
class TrainJob:
    """What a worker needs to train one expert (plain data: it is pickled to the worker)."""

    base: str
    name: str
    task: str | None
    tags: list[str]
    rows: list[dict[str, str]]
    config: dict[str, Any]


def train_job(job: TrainJob) -> Any:
    """Train one expert (module-level: an executor's worker runs it); returns the `Expert`, not stored."""
    from transformers.utils import logging as hf_logging

    from moerge.train.lora import TrainConfig, train_expert

    hf_logging.disable_progress_bar()
    return train_expert(job.base, None, job.rows, TrainConfig(**job.config), name=job.name, task=job.task,
                        tags=job.tags)  # fmt: skip


def train_manifest(
    base: str,
    manifest: str | Path,
    library: Any,
    shared: dict[str, Any] | None = None,
    *,
    executor: str = "local",
    overwrite: bool = False,
    on_done: Callable[[str], None] | None = None,
) -> list[Any]:
    """Train every expert of ``manifest`` on ``base`` (``shared`` TrainConfig fields, each entry's ``config`` on
    top) with ``executor`` (``local`` or ``ray``) and add each to ``library`` as it arrives. Experts already in
    the library are skipped unless ``overwrite``. Returns the added experts' metadata."""
    from moerge.executor import get_executor
    from moerge.train.data import read_jsonl
    from moerge.train.lora import TrainConfig

    manifest = Path(manifest)
    entries = read_manifest(manifest)
    todo = [e for e in entries if overwrite or e.name not in library]
    jobs = []
    for e in todo:
        fields = {**(shared or {}), **e.config}
        try:
            TrainConfig(**fields)
        except ValidationError as err:
            first = err.errors()[0]
            raise MalformedConfigError(
                f"{manifest}: expert {e.name!r}: config.{'.'.join(map(str, first['loc']))}: {first['msg']}"
            ) from None
        rows = read_jsonl(manifest.parent / e.data)
        jobs.append(TrainJob(base, e.name, e.task, list(e.tags), rows, fields))
    added = []

    def store(i: int, expert: Any) -> None:  # as each arrives: a killed run keeps what finished
        added.append(library.add(expert, overwrite=overwrite, source=f"{manifest}: expert {expert.name!r}"))
        if on_done is not None:
            on_done(expert.name)

    get_executor(executor).map(train_job, jobs, on_done=store)
    return added
