"""Validation at the boundary: pydantic models for the JSON files that come from outside.

``adapter_config.json`` (PEFT's, from any contributor) and ``moerge_expert.json`` (an expert's record inside a
library) are parsed with *strict* types: a string is not a bool (``"fan_in_fan_out": "false"`` is refused,
not read as true), ``lora_alpha`` is a finite positive number, ranks are integers ≥ 1, and checksum keys are
the file names an expert folder may hold — so no value in them can steer a read or a write elsewhere.
Every failure is one `MalformedConfigError` naming the file, the field and the fix. No torch here.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moerge.errors import MalformedConfigError
from moerge.experts.admission import AdmissionPolicy
from moerge.experts.formats import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DENSE_WEIGHTS,
    FORMAT_VERSION,
    METADATA_FILE,
)
from moerge.experts.metadata import ExpertMetadata

PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Rank = Annotated[int, Field(ge=1, le=1 << 20)]
PatternKey = Annotated[str, Field(min_length=1, max_length=1024)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ExpertFile = Literal["adapter_config.json", "adapter_model.safetensors", "delta_model.safetensors"]


class AdapterConfig(BaseModel):
    """The keys of PEFT's ``adapter_config.json`` that change what a LoRA computes. Other keys are kept as they
    are (``extra="allow"``) and carried through round trips."""

    model_config = ConfigDict(extra="allow", strict=True)

    peft_type: str = "LORA"
    r: Rank = 8
    lora_alpha: PositiveFinite | None = None  # PEFT's default: lora_alpha = 8
    rank_pattern: dict[PatternKey, Rank] | None = None
    alpha_pattern: dict[PatternKey, PositiveFinite] | None = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    bias: str | None = "none"
    use_dora: bool = False
    modules_to_save: list[str] | None = None

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 8.0


class ExpertRecord(BaseModel):
    """``moerge_expert.json`` inside a library: format, metadata, and one sha256 per file of the expert."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: int = Field(ge=1, le=FORMAT_VERSION)
    metadata: ExpertMetadata
    checksums: dict[ExpertFile, Sha256]

    @model_validator(mode="after")
    def _files_fit_kind(self) -> ExpertRecord:
        want = {DENSE_WEIGHTS} if self.metadata.kind == "dense" else {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
        if set(self.checksums) != want:
            raise ValueError(
                f"a {self.metadata.kind} expert has checksums for exactly {sorted(want)}, "
                f"this one for {sorted(self.checksums)}"
            )
        return self


def parse_json_bytes(data: bytes, source: str) -> Any:
    """``json.loads`` with every way it can fail on hostile bytes turned into one `MalformedConfigError`."""
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
        raise MalformedConfigError(f"{source}: not valid JSON ({e}); fix or regenerate the file.") from None


def explain(e: ValidationError, limit: int = 3) -> str:
    """``field: message (got …)`` for the first errors of a pydantic validation."""
    parts = []
    for err in e.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = repr(got)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        parts.append(
            f"{loc}: {msg}" + ("" if err["type"] in ("missing", "value_error") else f" (got {shown})")
        )
    more = len(e.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def parse_adapter_config(data: Any, source: str) -> AdapterConfig:
    """Validate a parsed ``adapter_config.json``; `MalformedConfigError` naming ``source`` on failure."""
    if not isinstance(data, dict):
        raise MalformedConfigError(f"{source}: expected a JSON object, found {type(data).__name__}.")
    try:
        return AdapterConfig.model_validate(data)
    except ValidationError as e:
        raise MalformedConfigError(
            f"{source}: {explain(e)}. Fix the file (numbers as JSON numbers, true/false unquoted, r ≥ 1, "
            "lora_alpha finite and > 0) or re-save the adapter with PEFT."
        ) from None


def parse_expert_record(data: Any, source: str) -> ExpertRecord:
    """Validate a parsed ``moerge_expert.json`` of a library expert; `MalformedConfigError` on failure."""
    if not isinstance(data, dict):
        raise MalformedConfigError(f"{source}: expected a JSON object, found {type(data).__name__}.")
    try:
        return ExpertRecord.model_validate(data, strict=True)
    except ValidationError as e:
        raise MalformedConfigError(
            f"{source}: not a valid {METADATA_FILE}: {explain(e)}. The expert's record was edited or damaged; "
            "restore the folder or remove the expert."
        ) from None


def parse_stored_metadata(data: Any, source: str) -> dict[str, Any]:
    """The metadata fields of a ``moerge_expert.json`` found in a folder being imported (flat metadata, or a
    record with ``metadata``), validated strictly; returned as a dict for the caller's overrides."""
    if not isinstance(data, dict):
        raise MalformedConfigError(f"{source}: expected a JSON object, found {type(data).__name__}.")
    fields = data.get("metadata", data) if "metadata" in data else data
    if not isinstance(fields, dict):
        raise MalformedConfigError(f"{source}: metadata: expected a JSON object.")
    fields = {k: v for k, v in fields.items() if k not in ("checksums", "format")}
    try:
        partial = ExpertMetadata.model_validate({"name": "placeholder", **fields}, strict=True)
    except ValidationError as e:
        raise MalformedConfigError(f"{source}: invalid expert metadata: {explain(e)}.") from None
    out = partial.model_dump()
    if "name" not in fields:
        out.pop("name")
    return {k: v for k, v in out.items() if k in fields}


class LibraryInfo(BaseModel):
    """``moerge-library.json``: format version, the base model, and (when recorded) its tensors' shapes."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: int = Field(default=FORMAT_VERSION, ge=0)
    base_model: str | None = None
    base_fingerprint: str | None = None
    base_shapes: dict[str, list[Annotated[int, Field(ge=0)]]] | None = None
    admission: AdmissionPolicy | None = None


def parse_library_info(data: Any, source: str) -> dict[str, Any]:
    """Validate a parsed ``moerge-library.json``; returns it as a dict (unknown keys kept)."""
    if not isinstance(data, dict):
        raise MalformedConfigError(f"{source}: expected a JSON object, found {type(data).__name__}.")
    try:
        info = LibraryInfo.model_validate(data)
    except ValidationError as e:
        raise MalformedConfigError(
            f"{source}: not a valid library file: {explain(e)}; restore it from a backup or recreate the library."
        ) from None
    out = info.model_dump(mode="json")
    if out.get("admission") is None:
        out.pop("admission", None)
    return out
