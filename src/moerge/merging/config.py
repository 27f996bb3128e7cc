"""The merge configuration: one pydantic model behind ``moerge merge CONFIG.yaml OUT`` and ``moerge.merge(...)``.

The shape follows mergekit's YAML (``merge_method``, ``base_model``, ``models`` with per-model ``parameters``,
global ``parameters``, ``dtype`` — the compute dtype — and ``out_dtype``, the stored one), so a mergekit config
for the methods both tools have runs unchanged; moerge adds keys for LoRA experts from a library (``library``, ``lora_mode``, ``rank`` …) and for data statistics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moerge.errors import MalformedConfigError, ParameterRangeError
from moerge.experts.metadata import EXPERT_NAME_PATTERN

# mergekit names that are presets of a moerge method
METHOD_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "della_linear": ("della", {"sign": None, "normalize": False}),
    "breadcrumbs_ties": ("breadcrumbs", {"sign": "mass"}),
    "soup": ("linear", {}),
    "model_soup": ("linear", {}),
}
# mergekit parameter spellings
PARAM_ALIASES = {"lambda": "scale"}
METHOD_PARAM_ALIASES = {"multislerp": {"normalize_weights": "normalize"}}
IGNORED_PARAMS = {"int8_mask"}  # mergekit memory options with no effect on the result

# Where each parameter means something: (low, high, low inclusive, high inclusive). Outside, a merge would be
# silently clamped, extrapolated or degenerate (density -0.5 keeps nothing and writes the base), so it is refused.
PARAM_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "density": (0.0, 1.0, False, True),
    "t": (0.0, 1.0, True, True),
    "epsilon": (0.0, 1.0, True, False),
    "gamma": (0.0, 1.0, True, False),
    "alpha": (0.0, 1.0, True, True),
    "fisher_floor": (0.0, math.inf, True, False),
    "eps": (0.0, math.inf, False, False),
}
SIZE_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
              "TB": 10**12, "B": 1}  # fmt: skip


def parse_size(size: int | str) -> int:
    """Bytes from ``123``, ``"500MB"``, ``"2GB"``, ``"1.5GiB"``; anything else (or ≤ 0) is refused."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise MalformedConfigError(f"shard_size: expected a size like 2GB or 500MB, got {size!r}.")
    if isinstance(size, int):
        value = float(size)
    else:
        s = size.strip().upper().replace(" ", "")
        mult = 1
        for unit, m in SIZE_UNITS.items():
            if s.endswith(unit):
                s, mult = s[: -len(unit)], m
                break
        try:
            value = float(s) * mult
        except ValueError:
            value = math.nan
    if not math.isfinite(value) or value < 1 or value > 2**60:
        raise MalformedConfigError(
            f"shard_size: expected a size like 2GB or 500MB (at least 1 byte), got {size!r}."
        )
    return int(value)


def _values(v: Any) -> list[Any]:
    """The scalar values inside a parameter: itself, or those of a gradient / conditional `Setting`."""
    gradient = getattr(v, "gradient", None)
    conditions = getattr(v, "conditions", None)
    fallback = getattr(v, "fallback", None)
    extra = _values(fallback) if fallback is not None else []
    if gradient is not None:
        return [x for g in gradient for x in _values(g)] + extra
    if conditions is not None:
        return [x for _, c in conditions for x in _values(c)] + extra
    return [v]


def _check_filters(
    global_params: dict[str, Any], per_model: list[dict[str, Any]], method: str, where: str
) -> None:
    """Conditional parameters (``[{filter: …, value: …}]``) need string filters (or none)."""

    def walk(v: Any, label: str) -> None:
        for flt, inner in getattr(v, "conditions", None) or []:
            if flt is not None and not isinstance(flt, str):
                raise MalformedConfigError(
                    f"{where}: merge method {method!r}, parameter {label}: filter {flt!r} is not a string; write "
                    "the part of a tensor name it should match (e.g. mlp, self_attn)."
                )
            walk(inner, label)
        if getattr(v, "fallback", None) is not None:
            walk(v.fallback, label)

    for k, v in global_params.items():
        walk(v, k)
    for i, pm in enumerate(per_model):
        for k, v in pm.items():
            walk(v, f"models[{i}].{k}")


def check_param_ranges(
    method: str, global_params: dict[str, Any], per_model: list[dict[str, Any]], where: str = "merge config"
) -> None:
    """Refuse non-finite numbers, values outside `PARAM_RANGES`, and weights that sum to zero where the method
    divides by their sum (``normalize: true``). Parameters are those `validate_params` returned."""
    _check_filters(global_params, per_model, method, where)
    labelled = [(k, v, k) for k, v in global_params.items()]
    labelled += [(k, v, f"models[{i}].{k}") for i, pm in enumerate(per_model) for k, v in pm.items()]
    for name, value, label in labelled:
        for x in _values(value):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            if not math.isfinite(x):
                raise ParameterRangeError(
                    f"{where}: merge method {method!r}, parameter {label}: {x} is not a finite number."
                )
            if name in PARAM_RANGES:
                lo, hi, lo_in, hi_in = PARAM_RANGES[name]
                if (x < lo or (x == lo and not lo_in)) or (x > hi or (x == hi and not hi_in)):
                    rng = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
                    raise ParameterRangeError(
                        f"{where}: merge method {method!r}, parameter {label}: {x} is outside {rng}, where "
                        f"{name} means something; use a value in {rng}."
                    )
    normalize = global_params.get("normalize")
    weights = [w for pm in per_model if isinstance(w := pm.get("weight"), (int, float))]
    scalar = bool(weights) and len(weights) == len(per_model)
    if normalize is True and scalar and abs(math.fsum(weights)) < 1e-8:
        raise ParameterRangeError(
            f"{where}: merge method {method!r} divides by the sum of the weights (normalize: true), and "
            f"{weights} sum to 0; change the weights or set normalize: false."
        )


class ModelEntry(BaseModel):
    """One input: a model folder, or an expert name when ``library`` is set."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=4096)
    parameters: dict[str, Any] = Field(default_factory=dict)
    stats: str | None = Field(
        default=None, min_length=1, max_length=4096
    )  # from moerge.merging.stats.save_stats

    @field_validator("model", "stats")
    @classmethod
    def _no_nul(cls, v: str | None) -> str | None:
        if v is not None and "\x00" in v:
            raise ValueError("a path cannot hold a NUL character")
        return v

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_params(cls, v: Any) -> Any:
        return {} if v is None else v


class SliceSource(BaseModel):
    """One input of an output slice: layers ``layer_range`` = [start, end) of ``model`` (mergekit's syntax)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=4096)
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_params(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _range(self) -> SliceSource:
        lo, hi = self.layer_range
        if lo < 0 or hi <= lo:
            raise ValueError(
                f"layer_range {list(self.layer_range)}: expected [start, end) with 0 ≤ start < end"
            )
        return self


class OutputSlice(BaseModel):
    """A run of output layers: the sources' layers merged position by position (one source: copied)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_params(cls, v: Any) -> Any:
        return {} if v is None else v


class ZeroEmbedding(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class ModelTokenEmbedding(BaseModel):
    """A row of ``model``'s own vocabulary: ``token`` (by its text) or ``token_id``."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str = Field(min_length=1, max_length=4096)
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class TokenEmbedding(BaseModel):
    """Where one output token's row comes from (mergekit's ``TokenEmbeddingConfig``)."""

    model_config = ConfigDict(extra="forbid")
    source: ZeroEmbedding | ModelTokenEmbedding | str | None = None
    force: bool = False


class TokenizerSpec(BaseModel):
    """mergekit's ``tokenizer:`` block."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(default="union", min_length=1, max_length=4096)  # union, base, or a model
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class MergeConfig(BaseModel):
    """A merge: method, inputs, parameters and output options."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str = Field(min_length=1, max_length=200)
    base_model: str | None = Field(default=None, min_length=1, max_length=4096)
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[OutputSlice] | None = None  # mergekit's layer slices (frankenmerges); instead of models
    parameters: dict[str, Any] = Field(default_factory=dict)
    # as in mergekit: `dtype` is the dtype the merge computes in, `out_dtype` the one it stores (default: dtype)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    seed: int = Field(default=0, ge=0, lt=2**63)
    shard_size: int | str = "2GB"
    copy_tokenizer: bool = True
    # which engine computes a full-checkpoint merge: numpy (linear, task_arithmetic; no torch import) where it
    # can under auto, else torch (`moerge.merging.numpy_engine.why_not`)
    engine: Literal["auto", "torch", "numpy"] = "auto"
    # mergekit's output tokenizer with embedding alignment (`moerge.merging.vocab`): union, base, or a model
    tokenizer_source: str | None = Field(default=None, min_length=1, max_length=4096)
    tokenizer: TokenizerSpec | None = None
    # moerge extensions: LoRA experts
    library: str | None = Field(default=None, min_length=1, max_length=4096)
    lora_mode: Literal["exact", "factor", "svd", "dense"] | None = None
    rank: int | None = Field(default=None, ge=1)
    factor_weights: Literal["sqrt", "linear"] = "sqrt"
    name: str | None = Field(default=None, pattern=EXPERT_NAME_PATTERN)  # of the merged expert
    add_to_library: bool = False
    stats_config: dict[str, Any] = Field(default_factory=dict)  # library artifact config for Fisher / Gram

    @field_validator("models", mode="before")
    @classmethod
    def _models_shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"model": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("base_model", "library")
    @classmethod
    def _no_nul(cls, v: str | None) -> str | None:
        if v is not None and "\x00" in v:
            raise ValueError("a path cannot hold a NUL character")
        return v

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        try:
            parse_size(v)
        except MalformedConfigError as e:
            raise ValueError(str(e).removeprefix("shard_size: ")) from None
        return v

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_params(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give tokenizer_source or tokenizer, not both (as in mergekit)")
        if self.tokenizer_spec() is not None and (self.slices is not None or self.is_lora):
            raise ValueError(
                "tokenizer_source / tokenizer: an output tokenizer is supported for merges of full models "
                "(models:), not with slices: or LoRA experts"
            )
        if self.slices is not None:
            if self.models:
                raise ValueError("give either models or slices, not both (as in mergekit)")
            if self.library is not None or self.lora_mode is not None:
                raise ValueError("slices: layer slices are for full checkpoints, not LoRA experts")
            if not self.slices:
                raise ValueError("slices: at least one slice is needed")
            return self
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

    def tokenizer_spec(self) -> TokenizerSpec | None:
        """The output tokenizer asked for (``tokenizer:``, or ``tokenizer_source:`` alone), or None."""
        if self.tokenizer is not None:
            return self.tokenizer
        return None if self.tokenizer_source is None else TokenizerSpec(source=self.tokenizer_source)

    @property
    def is_lora(self) -> bool:
        return self.library is not None or self.lora_mode is not None

    def resolved_method(self) -> tuple[str, dict[str, Any]]:
        """The registry method name and the global parameters after mergekit aliases."""
        name, preset = METHOD_ALIASES.get(self.merge_method, (self.merge_method, {}))
        aliases = METHOD_PARAM_ALIASES.get(name, {})
        params = {aliases.get(k, k): v for k, v in normalize_params(self.parameters).items()}
        return name, {**preset, **params}


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
