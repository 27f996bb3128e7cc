"""Train a LoRA expert with PEFT and turn it into an `Expert` (optionally straight into a library).

    expert = train_expert("base/", None, "task.jsonl", TrainConfig(steps=200), library=lib, name="math")

The loop is lean: the data is tokenised once, every batch is built before the first step, and a step is one
forward, one backward and one AdamW step (no HF Trainer). The caller's model is never modified: a loaded
model is deep-copied before PEFT wraps it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from moerge.errors import MoergeError
from moerge.experts.expert import Expert, ExpertMetadata
from moerge.train.data import DataSource, build_batches, encode_examples, load_examples
from moerge.train.loop import LoopResult, loop_settings, run_loop


class TrainConfig(BaseModel):
    """How to train one LoRA expert. The same object drives the Python API, YAML and `moerge train` flags."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, ge=1, description="optimizer steps")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (AdamW)")
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(64, ge=2, description="examples are truncated to this many tokens")
    rank: int = Field(4, ge=1, description="LoRA rank r")
    alpha: float = Field(
        8.0, gt=0, description="LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rslora)"
    )
    use_rslora: bool = False
    target_modules: list[str] | None = Field(
        None, description="module name suffixes to adapt; None = every linear layer except the LM head"
    )
    layers: list[int] | None = Field(
        None,
        description="decoder layers to adapt (negative counts from the top: [-4, -3, -2, -1] is the top 4); "
        "None = every layer. With target_modules, only those modules within these layers",
    )
    cache_prefix: bool = Field(
        True,
        description="when only upper layers are adapted, compute the frozen layers below once per example "
        "instead of at every step (the same loss and gradients: moerge.train.prefix)",
    )
    weight_decay: float = 0.0
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    seed: int = 0
    progress: bool = Field(True, description="show a progress bar")


def load_base(base_model: Any, tokenizer: Any = None) -> tuple[torch.nn.Module, Any, str | None, bool]:
    """``(model, tokenizer, base_model_id, owned)``: load a source with `moerge.backbones.loading.load_base_model`
    (a transformers folder, a GGUF file or a hub id), or take a loaded model.

    ``base_model_id`` resolves from any working folder (`moerge.backbones.loading.base_model_id`): the absolute
    path of a local folder or file, else the hub id. ``owned`` says whether the model was loaded here (so it
    may be modified in place).
    """
    from moerge.backbones.loading import base_model_id, load_base_model

    if isinstance(base_model, (str, Path)):
        model, loaded_tokenizer = load_base_model(base_model, fingerprint=False)
        return model, tokenizer or loaded_tokenizer, base_model_id(base_model), True
    if tokenizer is None:
        raise MoergeError("train_expert: pass the tokenizer along with a loaded base model")
    name = getattr(base_model, "moerge_base_model", None)
    if name is None:
        name = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
        name = base_model_id(name) if name else None
    return base_model, tokenizer, name, False


def check_target_modules(model: torch.nn.Module, target_modules: list[str] | None) -> None:
    """Refuse (one line, with near matches) a target module that names none of ``model``'s modules, PEFT's way:
    a name matches a module whose full name equals it or ends with ``"." + name``."""
    if not target_modules:
        return
    from moerge.model.routed import unmatched_target_error

    names = [n for n, _ in model.named_modules() if n]
    adaptable = [n for n, m in model.named_modules() if n and _is_adaptable(m)]
    for t in target_modules:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise unmatched_target_error(t, adaptable or names, "the base model has")


def _is_adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or type(module).__name__ == "Conv1D"


def lora_target_modules(model: Any, config: TrainConfig) -> str | list[str]:
    """PEFT's ``target_modules`` for ``config`` on ``model``: the configured suffixes (or ``"all-linear"``), or,
    when ``config.layers`` restricts the layers, the full names of the linear modules in those decoder layers
    (`moerge.train.prefix.layer_modules`; never the LM head)."""
    if config.layers is None:
        return config.target_modules or "all-linear"
    from moerge.train.prefix import layer_modules

    return layer_modules(model, config.layers, config.target_modules)


def lora_config_for(config: TrainConfig, model: Any = None):
    """PEFT's ``LoraConfig`` for ``config`` (``model`` resolves ``config.layers`` into module names)."""
    from peft import LoraConfig

    if config.layers is not None and model is None:
        raise MoergeError(
            "lora_config_for: restricting LoRA to layers needs the model, to name their modules"
        )
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=lora_target_modules(model, config),
        use_rslora=config.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def expert_from_peft_model(peft_model, metadata: ExpertMetadata) -> Expert:
    """Convert a trained PEFT LoRA model (adapter ``default``) into an `Expert` (float32 CPU copies)."""
    from peft import get_peft_model_state_dict

    from moerge.experts.peft_io import lora_modules_from_peft

    pc = peft_model.peft_config["default"]
    config = {
        "peft_type": "LORA",
        "r": pc.r,
        "lora_alpha": pc.lora_alpha,
        "rank_pattern": dict(pc.rank_pattern or {}),
        "alpha_pattern": dict(pc.alpha_pattern or {}),
        "use_rslora": pc.use_rslora,
        "fan_in_fan_out": pc.fan_in_fan_out,
        "bias": "none",
    }
    state = {
        k: v.detach().to("cpu", torch.float32).clone()
        for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()
    }
    lora = lora_modules_from_peft(config, state, source=f"trained adapter {metadata.name!r}")
    expert = Expert(
        metadata=metadata,
        lora=lora,
        peft_config={"task_type": "CAUSAL_LM", "base_model_name_or_path": metadata.base_model},
    )
    expert.check()
    return expert


def training_summary(
    config: TrainConfig, result: LoopResult, n_examples: int, prefix_layers: int = 0
) -> dict[str, Any]:
    return {
        "method": "lora",
        "steps": result.steps,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "rank": config.rank,
        "alpha": config.alpha,
        "use_rslora": config.use_rslora,
        "seed": config.seed,
        "layers": config.layers,
        "target_modules": config.target_modules,
        "frozen_prefix_layers": prefix_layers,
        "examples": n_examples,
        "tokens": result.tokens,
        "first_loss": round(result.first_loss, 6),
        "final_loss": round(result.final_loss, 6),
        "seconds": round(result.seconds, 3),
    }


def train_expert(
    base_model: Any,
    tokenizer: Any,
    data: DataSource,
    config: TrainConfig | None = None,
    library: Any = None,
    name: str = "expert",
    task: str | None = None,
    overwrite: bool = False,
    base_model_id: str | None = None,
    **metadata: Any,
) -> Expert:
    """Train a LoRA expert on ``data`` and return it as an `Expert` (added to ``library`` when given).

    ``base_model`` is a loaded causal LM (with ``tokenizer``) or a source for
    `moerge.backbones.loading.load_base_model` (a transformers folder, a GGUF file, a hub id; tokenizer optional).
    ``data`` is a JSONL path or an iterable of ``{"text": …}`` / ``{"prompt": …, "completion": …}`` dicts or
    strings. ``base_model_id`` overrides the base model id stored in the metadata and in the exported adapter's
    ``base_model_name_or_path`` (default: `moerge.backbones.loading.base_model_id` of the source, or of a
    loaded model's ``name_or_path``: an absolute path for a local folder, so the adapter loads from anywhere). Extra keyword arguments are `ExpertMetadata` fields (``tags=…, description=…``).
    """
    from peft import get_peft_model

    from moerge.experts.fingerprint import fingerprint_model

    config = config or TrainConfig()
    examples = load_examples(data)
    model, tokenizer, base_id, owned = load_base(base_model, tokenizer)
    check_target_modules(model, config.target_modules)
    fingerprint = fingerprint_model(model)
    encoded = encode_examples(tokenizer, examples, config.seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = build_batches(encoded, config.batch_size, config.steps, config.seed, pad_id)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        work = model if owned else copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation noise; Conv1D → fan_in_fan_out notice
            peft_model = get_peft_model(work, lora_config_for(config, work))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    start, cached = 0, None
    if config.cache_prefix and config.layers is not None:
        from moerge.train.prefix import first_layer, frozen_prefix_plan, truncated

        adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
        start = first_layer(peft_model, adapted) or 0
        cached = frozen_prefix_plan(peft_model, start, batches)
    if cached is not None:
        with truncated(peft_model, start):
            result = run_loop(
                peft_model, params, cached, **loop_settings(config), description=f"training {name}"
            )
    else:
        start = 0
        result = run_loop(
            peft_model, params, batches, **loop_settings(config), description=f"training {name}"
        )
    fields: dict[str, Any] = {
        "base_model": base_model_id or base_id,
        "base_fingerprint": fingerprint,
        "task": task,
    }
    fields.update(metadata)
    fields["name"] = name
    fields["kind"] = "lora"
    fields["training"] = {
        **training_summary(config, result, len(encoded), start),
        **dict(fields.get("training") or {}),
    }
    expert = expert_from_peft_model(peft_model, ExpertMetadata(**fields))
    if library is not None:
        library.add(expert, overwrite=overwrite)
    return expert


def union_data(datasets: Mapping[str, DataSource] | Iterable[DataSource]) -> list[dict[str, str]]:
    """All examples of several data sets, in order (for a multitask expert)."""
    sources = datasets.values() if isinstance(datasets, Mapping) else datasets
    return [ex for src in sources for ex in load_examples(src)]


def train_multitask_expert(
    base_model: Any,
    tokenizer: Any,
    datasets: Mapping[str, DataSource] | Iterable[DataSource],
    config: TrainConfig | None = None,
    library: Any = None,
    name: str = "multitask",
    **metadata: Any,
) -> Expert:
    """A LoRA trained on the union of several tasks' data: `train_expert` on `union_data` (tagged ``multitask``)."""
    tags = sorted(set(metadata.pop("tags", [])) | {"multitask"})
    if isinstance(datasets, Mapping):
        metadata.setdefault("extra", {})["tasks"] = sorted(datasets)
    return train_expert(
        base_model, tokenizer, union_data(datasets), config, library=library, name=name, tags=tags, **metadata
    )
