"""`ServeConfig`: the server's limits and batching, one pydantic model for the CLI flags and the Python API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeConfig(BaseModel):
    """How `moerge serve` batches, queues and limits requests."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=16, ge=1, description="requests decoded together in one forward")
    max_prefill_tokens: int = Field(
        default=4096,
        ge=1,
        description="requests admitted together are prefilled together while (requests × longest prompt) fits",
    )
    max_queue: int = Field(default=64, ge=0, description="requests waiting for a slot; beyond it: 429")
    request_timeout_s: float = Field(default=120.0, gt=0, description="a request running longer fails (504)")
    max_prompt_tokens: int = Field(default=1024, ge=1, description="longer prompts are refused (400)")
    max_tokens_limit: int = Field(default=512, ge=1, description="the largest max_tokens a request may ask")
    default_max_tokens: int = Field(default=16, ge=1, description="max_tokens when a request gives none")
    max_variants: int = Field(
        default=16,
        ge=1,
        description="recipe variants (recipe:key=value) kept built at once (least recent out)",
    )
    retry_after_s: int = Field(default=1, ge=1, description="the Retry-After header of a 429")
