"""A model pool: named whole models, each with a cost and a description.

A member is any transformers model (a folder, a GGUF file or a hub id), or a base model with experts of a
library merged into its weights (`moerge.model.routed.merge_into`) or routed (a recipe attached by the
caller's ``route`` function — `moerge.recipes.attach`; this layer may not import recipes), or a base model cut to
its first layers (``layers``), so a LoRA library yields members for free. `PoolConfig` is the YAML form::

    members:
      - {name: small, model: path/to/small, description: "a 1-layer model"}
      - {name: base+math, base: HuggingFaceTB/SmolLM2-135M, experts: [math], description: "the math expert merged"}
      - {name: routed, base: HuggingFaceTB/SmolLM2-135M, experts: [math, code], combine: route, recipe: arrow}
    library: path/to/library

Cost: `linear_flops_per_token` (2 × the multiply-adds of every linear layer, LM head included; attention's
length-dependent score products and the embedding lookup are left out — equal across members of one
tokenizer and small at the pool suite's lengths) and the seconds per query `measure_seconds` measures.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from moerge.errors import MalformedConfigError


class PoolMemberConfig(BaseModel):
    """One member: ``model`` (a whole model), or ``base`` plus ``experts`` of the pool's library, ``merge``d into
    the weights (scaled by ``weights``, default 1 each) or ``route``d by ``recipe``; ``layers`` keeps only the
    first N decoder layers (a cheaper member)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    model: str | None = Field(None, description="a transformers folder, GGUF file or hub id")
    base: str | None = Field(None, description="the base model the experts were trained from")
    experts: list[str] = Field(default_factory=list, description="expert names in the pool's library")
    combine: Literal["merge", "route"] = "merge"
    recipe: str | None = Field(None, description="the routing recipe of a combine: route member")
    weights: list[float] | None = Field(None, description="merge weights, one per expert (default 1)")
    layers: int | None = Field(None, ge=1, description="keep only the first N decoder layers")
    description: str = ""
    flops_per_token: float | None = Field(None, gt=0, description="override the counted cost")

    @model_validator(mode="after")
    def _check(self) -> PoolMemberConfig:
        if (self.model is None) == (self.base is None):
            raise ValueError(
                f"member {self.name!r}: give exactly one of model (a whole model) or base (+ experts)"
            )
        if self.model is not None and self.experts:
            raise ValueError(f"member {self.name!r}: experts need base, not model")
        if self.combine == "route" and (not self.recipe or not self.experts):
            raise ValueError(f"member {self.name!r}: combine: route needs a recipe and experts")
        if self.weights is not None and len(self.weights) != len(self.experts):
            raise ValueError(
                f"member {self.name!r}: {len(self.weights)} weights for {len(self.experts)} experts"
            )
        return self


class PoolConfig(BaseModel):
    """A pool: its members and the library their experts come from."""

    model_config = ConfigDict(extra="forbid")

    members: list[PoolMemberConfig] = Field(min_length=1)
    library: str | None = None

    @model_validator(mode="after")
    def _unique(self) -> PoolConfig:
        names = [m.name for m in self.members]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"member names must be unique; repeated: {', '.join(dup)}")
        if any(m.experts for m in self.members) and self.library is None:
            raise ValueError("members with experts need the pool's library: set library")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> PoolConfig:
        from pydantic import ValidationError

        from moerge.config_io import read_yaml_mapping

        data = read_yaml_mapping(Path(path), "a pool: members (name, model or base + experts, …) and library")
        try:
            return cls(**data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise MalformedConfigError(f"{path}: {loc}: {err['msg']}") from e


@dataclass
class PoolMember:
    """A loaded member: the model (eval mode, frozen), its tokenizer, description and cost."""

    name: str
    model: Any
    tokenizer: Any
    description: str = ""
    flops_per_token: float = 0.0
    seconds_per_query: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_flops_per_token(model: nn.Module) -> float:
    """FLOPs of one token's forward pass through every linear layer (LM head included): 2 × their weights'
    entries (one multiply and one add per entry). Tied weights count once per use — a tied LM head is a
    matmul, so it counts; the embedding it shares is a lookup, which does not."""
    total = 0
    for module in model.modules():
        if _is_linear(module):
            total += module.weight.numel()
    return 2.0 * total


def truncate_layers(model: nn.Module, keep: int) -> nn.Module:
    """A copy of ``model`` with only its first ``keep`` decoder layers (the config's layer count updated)."""
    from moerge.train.prefix import decoder_layers

    found = decoder_layers(model)
    if found is None:
        raise MalformedConfigError(f"cannot find the decoder layers of {type(model).__name__} to truncate")
    n = len(found[1])
    if not 1 <= keep <= n:
        raise MalformedConfigError(f"layers: {keep} is out of range; this model has {n} decoder layers")
    out = copy.deepcopy(model)
    path = found[0]
    layers = out.get_submodule(path)
    parent_name, _, child = path.rpartition(".")
    parent = out.get_submodule(parent_name) if parent_name else out
    setattr(parent, child, nn.ModuleList(list(layers)[:keep]))
    if hasattr(out.config, "num_hidden_layers"):
        out.config.num_hidden_layers = keep
    if getattr(out.config, "layer_types", None) is not None:
        out.config.layer_types = list(out.config.layer_types)[:keep]
    return out


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_member(
    config: PoolMemberConfig,
    library: Any = None,
    route: Callable[..., Any] | None = None,
    bases: dict[str, tuple[Any, Any]] | None = None,
) -> PoolMember:
    """Load one member. ``bases`` caches loaded base models by source (each member gets its own copy);
    ``route(model, library, recipe, experts=[...], tokenizer=...)`` attaches a routing recipe (a
    ``combine: route`` member; `moerge.recipes.attach`)."""
    from moerge.model.routed import merge_into
    from moerge.train.lora import load_base

    bases = {} if bases is None else bases
    source = config.model or config.base
    assert source is not None
    if source not in bases:
        model, tok, _, _ = load_base(source)
        bases[source] = (frozen(model), tok)
    base, tok = bases[source]
    model = copy.deepcopy(base)
    info: dict[str, Any] = {"source": source}
    if config.layers is not None:
        model = truncate_layers(model, config.layers)
        info["layers"] = config.layers
    if config.experts:
        if library is None:
            raise MalformedConfigError(f"member {config.name!r} names experts but the pool has no library")
        experts = [library.get(n) for n in config.experts]
        info["experts"] = list(config.experts)
        if config.combine == "merge":
            with torch.no_grad():
                for e, w in zip(experts, config.weights or [1.0] * len(experts)):
                    merge_into(model, e, w)
        else:
            if route is None:
                raise MalformedConfigError(
                    f"member {config.name!r} routes its experts: build the pool with route=moerge.recipes.attach"
                )
            model = route(model, library, config.recipe, experts=list(config.experts), tokenizer=tok)
            info["recipe"] = config.recipe
    flops = config.flops_per_token or linear_flops_per_token(getattr(model, "model", model))
    return PoolMember(config.name, frozen(model), tok, config.description, flops, info=info)


def build_pool(config: PoolConfig, route: Callable[..., Any] | None = None) -> list[PoolMember]:
    """Every member of ``config`` (base models loaded once)."""
    library = None
    if config.library is not None:
        from moerge.experts.library import ExpertLibrary

        library = ExpertLibrary.open(config.library)
    bases: dict[str, tuple[Any, Any]] = {}
    return [build_member(m, library, route, bases) for m in config.members]


def measure_seconds(
    members: Sequence[PoolMember], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    repeats: int = 3,
) -> list[float]:  # fmt: skip
    """Each member's wall seconds per query: the best of ``repeats`` forward passes over the batch, divided by
    its rows (members measured interleaved, so load on a shared machine affects them alike)."""
    best = [float("inf")] * len(members)
    with torch.no_grad():
        for _ in range(repeats):
            for i, m in enumerate(members):
                t0 = time.perf_counter()
                m.logits(input_ids, attention_mask)
                best[i] = min(best[i], time.perf_counter() - t0)
    return [b / max(1, input_ids.shape[0]) for b in best]
