"""`ExpertMetadata`: everything about an expert except its weights (no torch import, so listing is fast)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EXPERT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"


class ExpertMetadata(BaseModel):
    """Everything about an expert except its weights. Stored as ``moerge_expert.json`` beside the weights."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=EXPERT_NAME_PATTERN)
    kind: Literal["lora", "dense"] = "lora"
    base_model: str | None = None
    base_fingerprint: str | None = None
    task: str | None = None
    domain: str | None = None
    tags: list[str] = Field(default_factory=list)
    contributor: str | None = None
    license: str | None = None
    description: str | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    scores: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("tags")
    @classmethod
    def _unique_tags(cls, tags: list[str]) -> list[str]:
        return sorted(set(tags))
