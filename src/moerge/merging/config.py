"""The merge configuration: one pydantic model behind ``moerge merge CONFIG.yaml OUT`` and ``moerge.merge(...)``.

The shape follows mergekit's YAML (``merge_method``, ``base_model``, ``models`` with per-model ``parameters``,
global ``parameters``, ``dtype``), so a mergekit config for the methods both tools have runs unchanged; moerge
adds keys for LoRA experts from a library (``library``, ``lora_mode``, ``rank`` …) and for data statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moerge.errors import MalformedConfigError

# mergekit names that are presets of a moerge method
METHOD_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "della_linear": ("della", {"sign": None, "normalize": False}),
    "breadcrumbs_ties": ("breadcrumbs", {"sign": "mass"}),
    "soup": ("linear", {}),
    "model_soup": ("linear", {}),
}
# mergekit parameter spellings
PARAM_ALIASES = {"lambda": "scale"}
IGNORED_PARAMS = {"int8_mask"}  # mergekit memory options with no effect on the result


class ModelEntry(BaseModel):
    """One input: a model folder, or an expert name when ``library`` is set."""

    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    stats: str | None = None  # safetensors file from moerge.merging.stats.save_stats (Fisher / Gram)


class MergeConfig(BaseModel):
    """A merge: method, inputs, parameters and output options."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    seed: int = 0
    shard_size: int | str = "2GB"
    copy_tokenizer: bool = True
    # moerge extensions: LoRA experts
    library: str | None = None
    lora_mode: Literal["exact", "factor", "svd", "dense"] | None = None
    rank: int | None = Field(default=None, ge=1)
    factor_weights: Literal["sqrt", "linear"] = "sqrt"
    name: str | None = None
    add_to_library: bool = False
    stats_config: dict[str, Any] = Field(default_factory=dict)  # library artifact config for Fisher / Gram

    @field_validator("models", mode="before")
    @classmethod
    def _models_shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"model": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_params(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        if not self.models:
            raise ValueError("models: at least one model (or expert) to merge is needed")
        if self.library is not None and self.lora_mode is None:
            raise ValueError(
                "lora_mode: merging LoRA experts needs an explicit lora_mode: exact (lossless, linear methods), "
                "factor (approximation), svd (rank-truncated) or dense"
            )
        if self.add_to_library and self.library is None:
            raise ValueError("add_to_library needs library")
        return self

    @property
    def is_lora(self) -> bool:
        return self.library is not None or self.lora_mode is not None

    def resolved_method(self) -> tuple[str, dict[str, Any]]:
        """The registry method name and the global parameters after mergekit aliases."""
        name, preset = METHOD_ALIASES.get(self.merge_method, (self.merge_method, {}))
        return name, {**preset, **normalize_params(self.parameters)}


def normalize_params(params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        if k in IGNORED_PARAMS:
            continue
        k = PARAM_ALIASES.get(k, k)
        if k == "rescale" and isinstance(v, bool):
            v = "inverse" if v else "none"
        out[k] = v
    return out


def load_config(source: MergeConfig | dict[str, Any] | str | Path, **overrides: Any) -> MergeConfig:
    """Build a `MergeConfig` from a model, a dict or a YAML file; bad input raises one `MalformedConfigError`."""
    where = "merge config"
    if isinstance(source, MergeConfig):
        data = source.model_dump()
    elif isinstance(source, dict):
        data = dict(source)
    else:
        from moerge.config_io import read_yaml_mapping

        where = str(source)
        data = read_yaml_mapping(source, "a mapping with merge_method, models, …")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return MergeConfig(**data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key; valid keys: {', '.join(MergeConfig.model_fields)}"
            msgs.append(f"{loc}: {msg}")
        raise MalformedConfigError(f"{where}: " + "; ".join(msgs)) from None
