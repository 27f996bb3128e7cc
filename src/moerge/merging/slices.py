"""mergekit's ``slices:``: an output model assembled from layer ranges of the inputs (frankenmerges with
``passthrough``; per-range merges such as the classic two-model SLERP YAML).

Follows mergekit 0.1.5's planner (``mergekit/plan.py`` ``plan_module``/``plan_slice``, ``merge.py``
``_model_out_config``): output layers are numbered across the slices in order; output layer ``idx`` of a slice
merges layer ``layer_range[0] + idx`` of each of its sources, with the layer position t = idx/(L − 1) of that
slice for gradients (1 when L = 1); tensors before the layers (embeddings) are merged from the first slice's
sources and those after them (final norm, LM head) from the last slice's; parameters resolve per source, then
per slice, then globally; ``num_hidden_layers`` of the output is the sum of the slices' lengths, and the config
comes from ``base_model``, else the first source.

Each slice must have the same number of sources (one for ``passthrough``), and, for a method that uses a base
model, ``base_model`` must be a source of every slice (its layers there are that slice's base): then slice
positions line up into N "virtual" input models whose tensors are renamed layer by layer (`SlicedReader`), and
the ordinary streaming engine merges them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from moerge.errors import MalformedConfigError
from moerge.merging.config import MergeConfig, OutputSlice, check_param_ranges
from moerge.merging.folders import CheckpointReader
from moerge.merging.registry import MethodSpec, Setting, validate_params

_LAYER = re.compile(r"(\.(?:layers|h|blocks|layer)\.)(\d+)(\.)")
_PRE = ("embed", "wte", "wpe")  # tensors before the layers; everything else outside them comes after


class SlicedReader:
    """One input position across the slices: output layer j is layer ``start + idx`` of that slice's source."""

    def __init__(self, slices: list[tuple[CheckpointReader, int, int]]):
        self.parts = slices  # per slice: (reader, first source layer, number of layers)
        first, last = slices[0][0], slices[-1][0]
        self.folder: Path = first.folder
        self.config: dict[str, Any] = first.config
        self.map: dict[str, tuple[CheckpointReader, str]] = {}
        offset = 0
        for name in first.names():
            if _LAYER.search(name) is None:
                self.map[name] = (first if _is_pre(name) else last, name)
        for reader, start, length in slices:
            for name in reader.names():
                m = _LAYER.search(name)
                if m is None:
                    continue
                src = int(m.group(2))
                if start <= src < start + length:
                    out = name[: m.start(2)] + str(offset + src - start) + name[m.end(2) :]
                    self.map[out] = (reader, name)
            offset += length
        self.num_layers = offset

    def names(self) -> list[str]:
        return list(self.map)

    def shape(self, key: str) -> tuple[int, ...]:
        r, name = self.map[key]
        return r.shape(name)

    def dtype(self, key: str) -> str:
        r, name = self.map[key]
        return r.dtype(name)

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        r, name = self.map[key]
        return r.get(name, out)

    def close(self) -> None:
        for r, _, _ in self.parts:
            r.close()


def _is_pre(name: str) -> bool:
    return any(p in name for p in _PRE)


def _layer_t(idx: int, length: int) -> float:
    return idx / (length - 1) if length > 1 else 1.0


def _same(a: str, b: str | None) -> bool:
    return b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def merge_sliced(
    spec: MethodSpec,
    cfg: MergeConfig,
    global_params: dict[str, Any],
    out: str | Path,
    *,
    recipe: dict[str, Any],
    overwrite: bool,
    progress: Any = None,
) -> Path:
    """Run a ``slices:`` merge of full checkpoints into ``out`` (see the module doc)."""
    from moerge.backbones.loading import model_folder
    from moerge.merging.api import _used_per_model
    from moerge.merging.checkpoint import merge_checkpoints

    slices: list[OutputSlice] = cfg.slices or []
    width = len(slices[0].sources)
    for i, s in enumerate(slices):
        if len(s.sources) != width:
            raise MalformedConfigError(
                f"slices[{i}]: {len(s.sources)} sources, but slices[0] has {width}; moerge merges slices whose "
                "sources line up (the same number in every slice)."
            )
        lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
        if len(lengths) != 1:
            raise MalformedConfigError(
                f"slices[{i}]: the sources' layer ranges differ in length {sorted(lengths)}; all inputs to a "
                "slice must contain the same number of layers (as in mergekit)."
            )
    uses_base = spec.base != "none" and cfg.base_model is not None
    base_pos: list[int | None] = []
    for i, s in enumerate(slices):
        pos = next((j for j, src in enumerate(s.sources) if _same(src.model, cfg.base_model)), None)
        if spec.base == "required" and (cfg.base_model is None or pos is None):
            raise MalformedConfigError(
                f"slices[{i}]: merge method {spec.name!r} needs base_model among every slice's sources."
            )
        base_pos.append(pos if uses_base else None)
    if uses_base and any(p is None for p in base_pos):
        missing = [i for i, p in enumerate(base_pos) if p is None]
        raise MalformedConfigError(
            f"slices {missing}: base_model is not among their sources; with slices, the base's layers come from "
            "the slice's source that is base_model, so list it in every slice (with its layer_range)."
        )
    n = width - (1 if uses_base and base_pos[0] is not None else 0)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        most = f" and at most {spec.max_models}" if spec.max_models is not None else ""
        raise MalformedConfigError(
            f"slices: merge method {spec.name!r} takes at least {spec.min_models}{most} sources per slice "
            f"(besides the base model); got {n}."
        )

    def others(i: int) -> list[Any]:
        return [src for j, src in enumerate(slices[i].sources) if j != base_pos[i]]

    # parameters per slice, validated once: per-source (warned if unused) over slice over global
    per_slice: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for i, s in enumerate(slices):
        g_i = {**global_params, **s.parameters}
        g, pm = validate_params(
            spec, g_i, _used_per_model(spec, others(i)), where=f"merge config slices[{i}]"
        )
        for k in spec.global_params:
            if isinstance(g[k], Setting) and k in s.parameters and k in global_params:
                g[k] = g[k].with_fallback(global_params[k])
        check_param_ranges(spec.name, g, pm, where=f"merge config slices[{i}]")
        per_slice.append((g, pm))

    readers_by_path: dict[str, CheckpointReader] = {}

    def reader(path: str) -> CheckpointReader:
        key = str(Path(path).expanduser().resolve())
        if key not in readers_by_path:
            readers_by_path[key] = CheckpointReader(model_folder(path))
        return readers_by_path[key]

    spans: list[tuple[int, int, int]] = []  # per slice: (first output layer, length, slice index)
    offset = 0
    for i, s in enumerate(slices):
        length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
        spans.append((offset, length, i))
        offset += length

    def open_readers():
        virtual = [
            SlicedReader(
                [
                    (reader(others(i)[p].model), others(i)[p].layer_range[0], spans[i][1])
                    for i in range(len(slices))
                ]
            )
            for p in range(n)
        ]
        base = None
        if uses_base:
            base = SlicedReader(
                [
                    (reader(slices[i].sources[bp].model), slices[i].sources[bp].layer_range[0], spans[i][1])
                    for i, bp in enumerate(base_pos)
                    if bp is not None
                ]
            )
        return virtual, base

    def params_for(name: str) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
        m = _LAYER.search(name)
        if m is None:
            g, pm = per_slice[0] if _is_pre(name) else per_slice[-1]
            return g, pm, 0.0
        j = int(m.group(2))
        for start, length, i in spans:
            if start <= j < start + length:
                g, pm = per_slice[i]
                return g, pm, _layer_t(j - start, length)
        raise AssertionError(name)

    ref_model = cfg.base_model or slices[0].sources[0].model
    ref_cfg = reader(ref_model).config
    overrides: dict[str, Any] = {"num_hidden_layers": offset}
    if isinstance(ref_cfg.get("layer_types"), list):
        types: list[Any] = []
        for (_, length, _), s in zip(spans, slices):
            src_types = reader(s.sources[0].model).config.get("layer_types") or []
            lo = s.sources[0].layer_range[0]
            types += src_types[lo : lo + length]
        overrides["layer_types"] = types
    models: list[str | Path] = [src.model for s in slices for src in s.sources]
    return merge_checkpoints(
        spec,
        models,
        cfg.base_model if uses_base else None,
        out,
        per_slice[0][0],
        per_slice[0][1],
        dtype=cfg.dtype,
        out_dtype=cfg.out_dtype,
        seed=cfg.seed,
        shard_size=cfg.shard_size,
        recipe=recipe,
        copy_tokenizer=cfg.copy_tokenizer,
        overwrite=overwrite,
        inputs=models,
        progress=progress,
        open_readers=open_readers,
        params_for=params_for,
        config_overrides=overrides,
    )
