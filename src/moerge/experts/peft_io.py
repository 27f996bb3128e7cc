"""Read and write PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

Only safetensors and JSON are read. A pickle-based adapter (``adapter_model.bin`` and friends) is refused
with a message that says how to convert it; it is never unpickled.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from moerge.errors import InputNotFoundError, MalformedConfigError, ShapeMismatchError, UnsafeFormatError
from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
from moerge.experts.formats import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DENSE_WEIGHTS,
    METADATA_FILE,
    PEFT_PREFIX,
    PICKLE_SUFFIXES,
)
from moerge.experts.schema import explain, parse_adapter_config, parse_json_bytes, parse_stored_metadata

_PATTERN_TIMEOUT_S = 2.0  # a hostile rank/alpha pattern may backtrack for ever; it gets this long per match

# adapter_config.json keys moerge understands; the rest are carried through round trips untouched.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters are not supported yet",
    "modules_to_save": "adapters with modules_to_save (fully trained extra modules) are not supported yet",
}


def conversion_hint(path: Path) -> str:
    return (
        f"{path}: pickle-based weights are refused (moerge never unpickles files from outside). If you trust the "
        'file, convert it once: python -c "import torch; from safetensors.torch import save_file; '
        f"save_file(torch.load('{path.name}', weights_only=True), '{ADAPTER_WEIGHTS}')\" and remove the original."
    )


def refuse_pickles(folder: Path) -> None:
    """Raise `UnsafeFormatError` if ``folder`` holds pickle weights and no safetensors to use instead."""
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not (folder / ADAPTER_WEIGHTS).exists() and not (folder / DENSE_WEIGHTS).exists():
        raise UnsafeFormatError(conversion_hint(pickles[0]))


def read_json(path: Path) -> dict[str, Any]:
    data = parse_json_bytes(path.read_bytes(), str(path))
    if not isinstance(data, dict):
        raise MalformedConfigError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    return data


def load_safetensors(data: bytes | Path, source: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (or its bytes); a malformed or hostile header is one `MalformedConfigError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        return load(data) if isinstance(data, bytes) else load_file(str(data))
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError, MemoryError) as e:
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise MalformedConfigError(
            f"{source}: not a readable safetensors file ({detail}); re-save the weights with safetensors."
        ) from None


def _compile_pattern(key: str, source: str) -> Any:
    try:
        re.compile(rf"(.*\.)?({key})$")  # PEFT matches with `re`: refuse what `re` cannot compile
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        raise MalformedConfigError(
            f"{source}: rank_pattern/alpha_pattern key {key!r} is not a valid regular expression ({e}); "
            "use module names (PEFT matches keys as regexes against module paths)."
        ) from None
    try:
        import regex  # the same syntax, with a timeout (a dependency of transformers)
    except ImportError:  # pragma: no cover
        return re.compile(rf"(.*\.)?({key})$")
    try:
        return regex.compile(rf"(.*\.)?({key})$", flags=regex.VERSION0)
    except Exception as e:  # regex and re disagree on a corner of the syntax: refuse it as well
        raise MalformedConfigError(
            f"{source}: rank_pattern/alpha_pattern key {key!r} is not a regular expression moerge accepts ({e})."
        ) from None


def pattern_value(patterns: dict[str, Any], module: str, default: Any, source: str = ADAPTER_CONFIG) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches a module path ending in it (keys are regexes)."""
    for key, value in patterns.items():
        compiled = _compile_pattern(key, source)
        try:
            hit = (
                compiled.match(module, timeout=_PATTERN_TIMEOUT_S)
                if compiled.__class__.__module__.startswith("_regex")
                else compiled.match(module)
            )
        except TimeoutError:
            raise MalformedConfigError(
                f"{source}: rank_pattern/alpha_pattern key {key!r} takes too long to match {module!r} "
                "(a catastrophically backtracking regex); use plain module names."
            ) from None
        if hit:
            return value
    return default


def is_peft_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def read_peft_folder(path: str | Path, metadata: ExpertMetadata | None = None, **meta: Any) -> Expert:
    """Read a PEFT LoRA folder (and ``moerge_expert.json`` if present) into an `Expert`.

    ``metadata`` or keyword fields (``name=…, task=…``) override what the folder says; without either, the
    name is the folder's name.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputNotFoundError(f"{path}: no such adapter folder")
    refuse_pickles(path)
    stored: dict[str, Any] = {}
    if (path / METADATA_FILE).is_file():
        stored = parse_stored_metadata(read_json(path / METADATA_FILE), str(path / METADATA_FILE))
    if (path / DENSE_WEIGHTS).is_file() and not (path / ADAPTER_CONFIG).is_file():
        return _read_dense(path, stored, metadata, meta)
    if not (path / ADAPTER_CONFIG).is_file():
        raise MalformedConfigError(
            f"{path}: not a PEFT adapter folder (no {ADAPTER_CONFIG}); save the adapter with "
            "`model.save_pretrained(dir)` or point at the folder that holds it."
        )
    config = read_json(path / ADAPTER_CONFIG)
    weights_file = path / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise MalformedConfigError(f"{path}: {ADAPTER_WEIGHTS} is missing next to {ADAPTER_CONFIG}.")
    weights = load_safetensors(weights_file, str(weights_file))
    lora = lora_modules_from_peft(config, weights, source=str(path / ADAPTER_CONFIG))
    md = _metadata(path, stored, metadata, meta, kind="lora", config=config)
    expert = Expert(metadata=md, lora=lora, peft_config=_carried_config(config))
    expert.check(str(path))
    return expert


def lora_modules_from_peft(
    config: dict[str, Any], weights: dict[str, torch.Tensor], source: str = ADAPTER_CONFIG
) -> dict[str, LoraModule]:
    """Turn a PEFT LoRA config and its state dict into ``{module: LoraModule}`` (the config validated strictly)."""
    cfg = parse_adapter_config(config, source)
    peft_type = cfg.peft_type.upper()
    if peft_type != "LORA":
        raise MalformedConfigError(f"{source}: peft_type is {peft_type!r}; moerge reads LoRA adapters only.")
    if cfg.use_dora:
        raise MalformedConfigError(f"{source}: {_UNSUPPORTED['use_dora']} (use_dora is set).")
    if cfg.modules_to_save:
        raise MalformedConfigError(f"{source}: {_UNSUPPORTED['modules_to_save']} (modules_to_save is set).")
    if cfg.bias not in ("none", None):
        raise MalformedConfigError(
            f"{source}: bias={cfg.bias!r} adapters are not supported; use bias='none'."
        )
    default_r, default_alpha = cfg.r, cfg.alpha
    rank_pattern = cfg.rank_pattern or {}
    alpha_pattern = cfg.alpha_pattern or {}
    use_rslora, fan_in_fan_out = cfg.use_rslora, cfg.fan_in_fan_out
    for key in (*rank_pattern, *alpha_pattern):
        _compile_pattern(key, source)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m is None or not isinstance(tensor, torch.Tensor):
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise MalformedConfigError(
                    f"{source}: tensor {key} (embedding LoRA / DoRA) is not supported."
                )
            raise MalformedConfigError(f"{source}: unexpected tensor {key} in the adapter weights.")
        factors.setdefault(m.group(1), {})[m.group(2)] = tensor
    if not factors:
        raise MalformedConfigError(f"{source}: the adapter weights hold no lora_A/lora_B tensors.")

    lora: dict[str, LoraModule] = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise ShapeMismatchError(
                f"{source}: module {module} has lora_{''.join(ab)} but not both factors."
            )
        A, B = ab["A"], ab["B"]
        r = int(pattern_value(rank_pattern, module, default_r, source))
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ShapeMismatchError(
                f"{source}: module {module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit."
            )
        if A.shape[0] != r:
            raise ShapeMismatchError(
                f"{source}: module {module}: the config gives rank {r} but lora_A has rank {A.shape[0]}."
            )
        alpha = float(pattern_value(alpha_pattern, module, default_alpha, source))
        lora[module] = LoraModule(A=A, B=B, alpha=alpha, use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out)
    return lora


def _carried_config(config: dict[str, Any]) -> dict[str, Any]:
    keep = ("task_type", "base_model_name_or_path", "revision", "inference_mode")
    return {k: config[k] for k in keep if k in config}


def _metadata(
    path: Path,
    stored: dict[str, Any],
    metadata: ExpertMetadata | None,
    meta: dict[str, Any],
    kind: str,
    config: dict[str, Any] | None = None,
) -> ExpertMetadata:
    if metadata is not None:
        fields = metadata.model_dump()
    else:
        fields = dict(stored.get("metadata", stored))
        fields.pop("checksums", None)
        fields.setdefault("name", path.name)
        if config and not fields.get("base_model") and config.get("base_model_name_or_path"):
            fields["base_model"] = config["base_model_name_or_path"]
    fields.update({k: v for k, v in meta.items() if v is not None})
    fields["kind"] = kind
    try:
        return ExpertMetadata(**fields)
    except ValidationError as e:
        raise MalformedConfigError(f"{path}: invalid expert metadata: {explain(e, limit=1)}") from e


def _read_dense(path: Path, stored: dict[str, Any], metadata, meta) -> Expert:
    md = _metadata(path, stored, metadata, meta, kind="dense")
    dense = load_safetensors(path / DENSE_WEIGHTS, str(path / DENSE_WEIGHTS))
    expert = Expert(metadata=md, dense=dense)
    expert.check(str(path))
    return expert


def peft_config_for(expert: Expert, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """A PEFT ``adapter_config.json`` for a LoRA expert: the most common rank/alpha as defaults,
    deviating modules in ``rank_pattern``/``alpha_pattern`` keyed by their escaped full path."""
    if expert.kind != "lora":
        raise MalformedConfigError(
            f"expert {expert.name!r} is a dense delta, not a LoRA; export it with `moerge merge` as a full model."
        )
    mods = expert.lora
    flags = {(m.use_rslora, m.fan_in_fan_out) for m in mods.values()}
    if len(flags) > 1:
        raise MalformedConfigError(
            f"expert {expert.name!r} mixes rslora/fan_in_fan_out settings across modules; PEFT cannot express that."
        )
    use_rslora, fan_in_fan_out = flags.pop()
    r = Counter(m.rank for m in mods.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in mods.values()).most_common(1)[0][0]
    rank_pattern = {f"^{re.escape(k)}$": m.rank for k, m in mods.items() if m.rank != r}
    alpha_pattern = {f"^{re.escape(k)}$": m.alpha for k, m in mods.items() if m.alpha != alpha}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": expert.peft_config.get("task_type"),
        "base_model_name_or_path": base_model_name_or_path
        or expert.peft_config.get("base_model_name_or_path")
        or expert.metadata.base_model,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(mods),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    return config


def peft_state_dict_for(expert: Expert) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for module, m in expert.lora.items():
        sd[f"{PEFT_PREFIX}{module}.lora_A.weight"] = m.A.contiguous()
        sd[f"{PEFT_PREFIX}{module}.lora_B.weight"] = m.B.contiguous()
    return sd


def write_peft_folder(
    expert: Expert,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    with_metadata: bool = True,
) -> Path:
    """Write ``expert`` as a folder that ``PeftModel.from_pretrained`` loads (LoRA) or a dense-delta folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if expert.kind == "lora":
        config = peft_config_for(expert, base_model_name_or_path)
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(peft_state_dict_for(expert), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    else:
        save_file(
            {k: v.contiguous() for k, v in expert.dense.items()},
            str(out / DENSE_WEIGHTS),
            metadata={"format": "pt"},
        )
    if with_metadata:
        (out / METADATA_FILE).write_text(expert.metadata.model_dump_json(indent=2))
    return out
