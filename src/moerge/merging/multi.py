"""Multi-stage merges: mergekit-multi's YAML (several documents, each a merge config; a ``name:`` makes a stage
whose output later stages use by that name as a model; the one unnamed document is the final merge).

As in mergekit's ``scripts/multimerge.py``: named stages are written to ``intermediate_dir/<name>``, references
to a stage's name (``model: NAME``, ``base_model: NAME``, slice sources, ``NAME+lora``) are replaced by that folder,
and stages run in dependency order. Intermediates are cached: a stage is skipped when its folder records the
same config digest (the stage's config with its inputs' digests), so editing one stage re-runs it and the stages
that use it, and nothing else (mergekit skips a stage whenever its folder holds a model, stale or not).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moerge.errors import InputNotFoundError, MalformedConfigError

STAGE_FILE = "moerge_stage.json"


def read_stages(path: str | Path) -> list[tuple[str | None, dict[str, Any]]]:
    """The YAML documents of ``path`` as ``(name or None, merge config)``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such config file")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except yaml.YAMLError as e:
        raise MalformedConfigError(f"{path}: not valid YAML ({e}).") from None
    stages: list[tuple[str | None, dict[str, Any]]] = []
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise MalformedConfigError(f"{path}: document {i + 1} is not a mapping (a merge config).")
        d = dict(d)
        name = d.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name or "/" in name or name in (".", "..")):
            raise MalformedConfigError(
                f"{path}: document {i + 1}: name {name!r} must be a plain folder name."
            )
        stages.append((name, d))
    names = [n for n, _ in stages if n is not None]
    if len(set(names)) != len(names):
        raise MalformedConfigError(
            f"{path}: stage names repeat ({sorted(names)}); give each stage its own name."
        )
    if sum(n is None for n, _ in stages) > 1:
        raise MalformedConfigError(
            f"{path}: more than one unnamed document; only the final merge has no name."
        )
    return stages


def is_multi_stage(path: str | Path) -> bool:
    """Whether ``path`` holds more than one YAML document (a mergekit-multi config)."""
    p = Path(path)
    if not p.is_file():
        return False
    text = p.read_text(encoding="utf-8", errors="replace")
    return any(line.rstrip() == "---" for line in text.splitlines()[1:]) and len(read_stages(p)) > 1


def _refs(cfg: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(holder, key) of every model reference in a config: models (entries or plain strings), base_model and
    slice sources."""
    out: list[tuple[Any, Any]] = []
    if isinstance(cfg.get("base_model"), str):
        out.append((cfg, "base_model"))
    models = cfg.get("models") or []
    for i, m in enumerate(models):
        if isinstance(m, str):
            out.append((models, i))
        elif isinstance(m, dict) and isinstance(m.get("model"), str):
            out.append((m, "model"))
    for s in cfg.get("slices") or []:
        for src in (s.get("sources") or []) if isinstance(s, dict) else []:
            if isinstance(src, dict) and isinstance(src.get("model"), str):
                out.append((src, "model"))
    return out


def _stage_of(ref: str, names: set[str]) -> str | None:
    head = ref.split("+", 1)[0]
    return head if head in names else None


def merge_multi(
    path: str | Path,
    out: str | Path | None,
    *,
    intermediate_dir: str | Path | None = None,
    lazy: bool = True,
    overwrite: bool = False,
    on_stage: Callable[[str, str], None] | None = None,
) -> Path:
    """Run every stage of the multi-document config ``path``; returns the final output (``out``, or the last
    stage's folder when every document is named). ``on_stage(name, "merged" | "cached")`` reports each stage."""
    from moerge.merging.api import merge

    stages = read_stages(path)
    names = {n for n, _ in stages if n is not None}
    if any(n is None for n, _ in stages) and out is None:
        raise MalformedConfigError(f"{path}: the unnamed (final) merge needs an output folder.")
    inter = (
        Path(intermediate_dir)
        if intermediate_dir
        else Path(out or ".").with_name(Path(out or "merge").name + ".stages")
    )
    deps = {n: {d for h, k in _refs(c) if (d := _stage_of(h[k], names))} for n, c in stages}
    order: list[str | None] = []
    state: dict[str | None, str] = {}

    def visit(n: str | None, chain: tuple[str | None, ...]) -> None:
        if state.get(n) == "done":
            return
        if n in chain:
            raise MalformedConfigError(
                f"{path}: stages depend on each other in a cycle: {' → '.join(map(str, chain))}."
            )
        for d in sorted(deps[n]):
            visit(d, (*chain, n))
        state[n] = "done"
        order.append(n)

    for n, _ in stages:
        visit(n, ())
    configs = dict(stages)
    digests: dict[str, str] = {}
    for n in order:
        cfg = json.loads(json.dumps(configs[n]))  # a copy
        for holder, key in _refs(cfg):
            stage = _stage_of(holder[key], names)
            if stage is not None:
                holder[key] = str(inter / stage) + holder[key][len(stage) :]
        used = sorted({s for h, k in _refs(configs[n]) if (s := _stage_of(h[k], names))})
        digest = hashlib.sha256(
            json.dumps([cfg, [digests[u] for u in used]], sort_keys=True, default=str).encode()
        ).hexdigest()
        target = inter / n if n is not None else Path(out)  # type: ignore[arg-type]
        digests[n or ""] = digest
        record = target / STAGE_FILE
        if lazy and record.is_file() and json.loads(record.read_text()).get("digest") == digest:
            if on_stage:
                on_stage(n or "final", "cached")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        merge(cfg, target, overwrite=overwrite or n is not None or record.is_file())
        record.write_text(json.dumps({"stage": n, "digest": digest}, indent=2))
        if on_stage:
            on_stage(n or "final", "merged")
    return Path(out) if out is not None else inter / str(order[-1])
