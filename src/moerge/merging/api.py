"""``moerge.merge(...)``: the Python entry point behind ``moerge merge CONFIG.yaml OUT``.

Examples::

    moerge.merge("ties.yaml", "out/")                                  # full checkpoints, mergekit-like YAML
    moerge.merge(merge_method="ties", base_model="base/", models=["ft0/", "ft1/"],
                 parameters={"density": 0.5}, out="out/")
    expert = moerge.merge(merge_method="linear", library="lib/", models=["a", "b"], lora_mode="exact",
                          name="a_plus_b", add_to_library=True)      # LoRA experts → an Expert
    expert = moerge.merge(merge_method="ties", experts=[e1, e2], lora_mode="svd", rank=8)  # Expert objects
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.errors import ConfigWarning, ExpertExistsError, InputNotFoundError, MalformedConfigError
from moerge.experts.paths import atomic_output_dir, check_output_dir
from moerge.merging.config import MergeConfig, check_param_ranges, load_config
from moerge.merging.registry import MethodSpec, get_method, validate_params

if TYPE_CHECKING:  # a merge the numpy engine runs imports neither (moerge.merging.lazy)
    import torch

    from moerge.experts.expert import Expert
else:
    from moerge.merging.lazy import torch


def _same_path(a: str, b: str | None) -> bool:
    return b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _inputs(cfg: MergeConfig) -> list[str | None]:
    """Every local path a merge reads (models, base, statistics): the output may be none of them."""
    models = [] if cfg.is_lora else [m.model for m in cfg.models]
    models += [src.model for s in cfg.slices or [] for src in s.sources]
    return [*models, cfg.base_model, *(m.stats for m in cfg.models)]


def _guarded(cfg: MergeConfig) -> dict[str, Any]:
    """What `check_output_dir` / `atomic_output_dir` protect for this merge: its inputs and its library."""
    return {"inputs": _inputs(cfg), "libraries": [cfg.library]}


def _used_per_model(spec: MethodSpec, models: list[Any]) -> list[dict[str, Any]]:
    """Each model's parameters less those ``spec`` does not take per model, which are dropped with one
    `ConfigWarning` naming them: mergekit ignores them (its resolver only asks for the method's own
    parameters, ``parameter_resolver.resolve_parameters``), so a YAML that runs there runs here."""
    kept: list[dict[str, Any]] = []
    dropped: dict[str, list[int]] = {}
    for i, m in enumerate(models):
        params = {}
        for k, v in m.parameters.items():
            if k in spec.per_model:
                params[k] = v
            else:
                dropped.setdefault(k, []).append(i)
        kept.append(params)
    if dropped:
        import warnings

        def why(k: str) -> str:
            return "set globally only" if k in spec.params else "not a parameter of it"

        names = "; ".join(f"{k} (models {', '.join(map(str, ix))}: {why(k)})" for k, ix in dropped.items())
        warnings.warn(
            f"merge method {spec.name!r} ignores per-model parameters it does not take per model, as mergekit "
            f"does: {names}. Per-model parameters of {spec.name}: {', '.join(spec.per_model)}.",
            ConfigWarning,
            stacklevel=3,
        )
    return kept


def plan(config: MergeConfig) -> tuple[MethodSpec, MergeConfig, dict[str, Any], list[dict[str, Any]]]:
    """Validate ``config`` against the registry: ``(spec, config with inputs resolved, globals, per-model)``.

    For methods that take a base model, a model entry that *is* the base model is dropped from the inputs (as in
    mergekit, where the base may also be listed under ``models``)."""
    name, global_params = config.resolved_method()
    spec = get_method(name)
    models = config.models
    if spec.base != "none" and not config.is_lora and config.base_model is not None:
        models = [m for m in models if not _same_path(m.model, config.base_model)]
    if not config.is_lora and spec.base == "required" and config.base_model is None:
        raise MalformedConfigError(
            f"merge method {spec.name!r} needs base_model (task vectors are taken against it)."
        )
    cfg = config.model_copy(update={"models": models})
    g, per_model = validate_params(spec, global_params, _used_per_model(spec, models), where="merge config")
    check_param_ranges(spec.name, g, per_model)
    if spec.stats and not config.is_lora and any(m.stats is None for m in models):
        raise MalformedConfigError(
            f"merge method {spec.name!r} needs {spec.stats} statistics for every model: set `stats: FILE` on each "
            "model (compute them with moerge.merging.stats and save_stats)."
        )
    return spec, cfg, g, per_model


def _load_stats(spec: MethodSpec, cfg: MergeConfig) -> tuple[list[dict[str, torch.Tensor]] | None, set[str]]:
    if not spec.stats or any(m.stats is None for m in cfg.models):
        return None, set()
    from moerge.merging.stats import load_stats

    out, fifo = [], set()
    for m in cfg.models:
        if m.stats is None or not Path(m.stats).is_file():
            raise InputNotFoundError(f"{m.stats}: no such statistics file (stats of model {m.model}).")
        try:
            tensors, kind, f = load_stats(m.stats)
        except Exception as e:  # safetensors' own error type, or malformed JSON in its metadata
            raise MalformedConfigError(
                f"{m.stats}: not a statistics file written by moerge.merging.stats.save_stats ({str(e)[:120]})."
            ) from None
        if kind is not None and kind != spec.stats:
            raise MalformedConfigError(
                f"{m.stats}: holds {kind} statistics; merge method {spec.name!r} needs {spec.stats}."
            )
        out.append(tensors)
        fifo |= f
    return out, fifo


def merge(
    config: MergeConfig | dict[str, Any] | str | Path | None = None,
    out: str | Path | None = None,
    *,
    experts: Sequence[Expert] | None = None,
    evaluate: Callable[[Any], float] | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    intermediate_dir: str | Path | None = None,
    **fields: Any,
) -> Path | Expert:
    """Run a merge described by ``config`` (a `MergeConfig`, a dict, or a YAML path) and/or keyword fields.

    Full checkpoints (folders) are merged into the folder ``out`` (returned). LoRA experts (``library=...`` or
    ``experts=[...]``, with ``lora_mode``) give an `Expert`, also written to ``out`` as a PEFT folder when
    ``out`` is given and added to the library when ``add_to_library``. ``merge_method="greedy_soup"`` needs
    ``evaluate(candidate) -> score`` (a state dict or an `Expert`).

    ``out`` is written atomically (a temporary sibling renamed into place when complete): a failing merge leaves
    it as it was. A non-empty ``out`` is refused unless ``overwrite``, and always when it is (or holds) an input.
    ``progress(tensor name, done, total)`` is called as a full-checkpoint merge writes each tensor.

    A YAML file of several documents is a multi-stage merge (mergekit-multi; `moerge.merging.multi`): named
    stages go to ``intermediate_dir/<name>`` (default: ``<out>.stages``), cached by config digest."""
    if isinstance(config, (str, Path)) and not fields and experts is None:
        from moerge.merging.multi import is_multi_stage, merge_multi

        if is_multi_stage(config):
            return merge_multi(config, out, intermediate_dir=intermediate_dir, overwrite=overwrite)
    if (
        experts is not None
        and not fields.get("models")
        and (config is None or isinstance(config, (str, Path)))
    ):
        fields.setdefault("models", [e.name for e in experts])
    cfg = load_config(config if config is not None else {}, **fields)
    if experts is not None and cfg.lora_mode is None:
        raise MalformedConfigError(
            "lora_mode: merging LoRA experts needs an explicit lora_mode (exact, factor, svd, dense)."
        )
    if out is not None:
        check_output_dir(out, overwrite=overwrite, **_guarded(cfg))  # before any work
    if cfg.merge_method == "greedy_soup":
        return _greedy(cfg, out, experts, evaluate, overwrite)
    if cfg.slices is not None:
        if out is None:
            raise MalformedConfigError("out: a full-checkpoint merge needs an output folder.")
        from moerge.merging.slices import merge_sliced

        name, global_params = cfg.resolved_method()
        return merge_sliced(
            get_method(name),
            cfg,
            global_params,
            out,
            recipe=cfg.model_dump(mode="json", exclude_none=True, exclude_defaults=False),
            overwrite=overwrite,
            progress=progress,
        )
    spec, cfg, g, per_model = plan(cfg)
    recipe = cfg.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
    if cfg.is_lora:
        return _merge_lora(spec, cfg, g, per_model, out, experts, recipe, overwrite)
    if out is None:
        raise MalformedConfigError("out: a full-checkpoint merge needs an output folder.")
    from moerge.merging import numpy_engine

    if numpy_engine.use_numpy_engine(spec, cfg, cfg.engine):
        return numpy_engine.merge_checkpoints(
            spec,
            [m.model for m in cfg.models],
            cfg.base_model,
            out,
            g,
            per_model,
            out_dtype=cfg.out_dtype or cfg.dtype,
            shard_size=cfg.shard_size,
            recipe=recipe,
            copy_tokenizer=cfg.copy_tokenizer,
            overwrite=overwrite,
            inputs=_inputs(cfg) + [cfg.library],
            progress=progress,
        )
    from moerge.merging.checkpoint import merge_checkpoints

    stats, fifo = _load_stats(spec, cfg)
    return merge_checkpoints(
        spec,
        [m.model for m in cfg.models],
        cfg.base_model,
        out,
        g,
        per_model,
        dtype=cfg.dtype,
        out_dtype=cfg.out_dtype,
        seed=cfg.seed,
        shard_size=cfg.shard_size,
        stats=stats,
        fan_in_fan_out=fifo,
        recipe=recipe,
        copy_tokenizer=cfg.copy_tokenizer,
        overwrite=overwrite,
        inputs=_inputs(cfg) + [cfg.library],
        tokenizer=cfg.tokenizer_spec(),
        progress=progress,
    )


def _resolve_experts(cfg: MergeConfig, experts: Sequence[Expert] | None):
    lib = None
    if cfg.library is not None:
        from moerge.experts.library import ExpertLibrary

        lib = ExpertLibrary.open(cfg.library)
    if experts is not None:
        by_name = {e.name: e for e in experts}
        missing = [m.model for m in cfg.models if m.model not in by_name]
        if missing:
            raise MalformedConfigError(f"models: no expert named {missing}; given: {sorted(by_name)}.")
        return [by_name[m.model] for m in cfg.models], lib
    if lib is None:
        raise MalformedConfigError("library: LoRA merges need `library:` (or experts=[...] in Python).")
    return [lib.get(m.model) for m in cfg.models], lib


def _write_adapter(expert: Expert, out: str | Path, cfg: MergeConfig, overwrite: bool) -> None:
    from moerge.experts.peft_io import write_peft_folder

    with atomic_output_dir(out, overwrite=overwrite, **_guarded(cfg)) as tmp:
        write_peft_folder(expert, tmp)


def _merge_lora(spec, cfg: MergeConfig, g, per_model, out, experts, recipe, overwrite: bool) -> Expert:
    from moerge.merging.lora import merge_lora_experts

    loaded, lib = _resolve_experts(cfg, experts)
    name = cfg.name or f"{spec.name}-{cfg.lora_mode}-merge"
    if cfg.add_to_library and lib is not None and name in lib:
        raise ExpertExistsError(
            f"{lib.url}: an expert named {name!r} exists; give the merged expert another name (name: / --name)."
        )
    stats = None
    if spec.stats:
        stats, _ = _load_stats(spec, cfg)
        if stats is None and lib is not None:
            found = [lib.get_artifact(spec.stats, cfg.stats_config, m.model) for m in cfg.models]
            if any(f is None for f in found):
                lacking = [m.model for m, f in zip(cfg.models, found) if f is None]
                raise MalformedConfigError(
                    f"merge method {spec.name!r} needs {spec.stats} artifacts for {lacking} in the library "
                    f"(config {cfg.stats_config}); compute them with moerge.merging.stats and lib.put_artifact."
                )
            stats = [f[0] for f in found]
    assert cfg.lora_mode is not None  # MergeConfig and merge() refuse LoRA merges without one
    expert = merge_lora_experts(
        spec,
        loaded,
        g,
        per_model,
        mode=cfg.lora_mode,
        name=name,
        rank=cfg.rank,
        factor_weights=cfg.factor_weights,
        seed=cfg.seed,
        stats=stats,
        recipe=recipe,
    )
    stored = (
        cfg.out_dtype or cfg.dtype
    )  # LoRA merges compute in float32; the factors are stored in this dtype
    if stored:
        expert = expert.to(dtype=getattr(torch, stored))
    if out is not None:
        _write_adapter(expert, out, cfg, overwrite)
    if cfg.add_to_library and lib is not None:
        lib.add(expert)
    return expert


def _greedy(cfg: MergeConfig, out, experts, evaluate, overwrite: bool = False) -> Path | Expert:
    from moerge.merging.greedy import greedy_soup

    if evaluate is None:
        raise MalformedConfigError(
            "greedy_soup needs evaluate=callable(candidate) -> held-out score (Python API only)."
        )
    if cfg.is_lora:
        from moerge.merging.lora import merge_lora_experts

        loaded, _ = _resolve_experts(cfg, experts)
        spec = get_method("linear")

        def average(items):
            if len(items) == 1:
                return items[0]
            per = [{"weight": 1.0}] * len(items)
            return merge_lora_experts(
                spec, list(items), {"normalize": True}, per, mode="exact", name=cfg.name or "greedy-soup"
            )

        res = greedy_soup(loaded, evaluate, average=average)
        soup = res.soup
        soup.metadata.extra["greedy_soup"] = {
            "chosen": [loaded[i].name for i in res.chosen],
            "score": res.score,
        }
        if out is not None:
            _write_adapter(soup, out, cfg, overwrite)
        return soup
    from moerge.merging.folders import CheckpointReader

    if out is None:
        raise MalformedConfigError("out: a full-checkpoint greedy soup needs an output folder.")
    candidates = []
    for m in cfg.models:  # greedy soup evaluates whole models, so candidates are held in memory
        with CheckpointReader(m.model) as r:
            candidates.append({k: r.get(k) for k in r.names()})
    res = greedy_soup(candidates, evaluate)
    from moerge.merging.checkpoint import ShardWriter
    from moerge.merging.config import parse_size
    from moerge.merging.folders import write_model_files

    out = Path(out)
    recipe = cfg.model_dump(exclude_none=True) | {
        "greedy_soup": {"chosen": [cfg.models[i].model for i in res.chosen], "score": res.score}
    }
    with atomic_output_dir(out, overwrite=overwrite, **_guarded(cfg)) as tmp:
        stored = cfg.out_dtype or cfg.dtype
        w = ShardWriter(tmp, parse_size(cfg.shard_size))
        for k, v in res.soup.items():
            w.add(k, v.to(getattr(torch, stored)) if stored and v.is_floating_point() else v)
        w.finish()
        write_model_files(Path(cfg.models[res.chosen[0]].model), tmp, stored, recipe, cfg.copy_tokenizer)
    return out
