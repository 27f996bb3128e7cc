"""A merge method's spec and the ``@merge_method`` decorator, which records the spec on the function and
registers nothing: `moerge.merging.registry` collects decorated functions from the built-in module, installed
entry points and plugins.

A method function takes ``x`` (the N input tensors stacked on dim 0, ``[N, *shape]``) and ``weight`` (``[N]``),
and returns the merged tensor (``shape``). Keyword-only parameters are the method's *parameters*; the
decorator records their names, types and defaults, so the YAML config, the CLI and ``moerge.merge(...)`` all
validate them the same way. A few keyword names are *reserved* and filled by the engine, not by the user:

- ``base``: the base tensor (methods in ``space="weights"`` that use a base model);
- ``stats``: per-model data statistics stacked like ``x`` (Fisher diagonals, Gram matrices);
- ``generator``: a seeded ``torch.Generator`` (random methods such as DARE; seeded per tensor name);
- ``layout``: ``"linear"`` or ``"fan_in_fan_out"`` for 2-D weights (RegMean needs to know the input axis);
- ``threshold``: per-model magnitude thresholds ``[N]`` computed over the whole model before merging (TIES with
  ``trim: model``; `moerge.merging.checkpoint.model_thresholds`), or None.

``space="delta"`` methods see task vectors ``x - base`` (the engine adds the base back); for LoRA experts they
see the per-module ΔW directly. A delta method owns the tensor it is given and may overwrite it (TIES trims in
place, so the stacked task vectors exist once). ``space="weights"`` methods see the weights themselves and must
not modify them.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from moerge.errors import PluginError

if TYPE_CHECKING:
    import torch

SPEC_ATTR = "merge_spec"  # the attribute `merge_method` sets on a decorated function

if TYPE_CHECKING:
    # A per-model parameter is a float in a config (validated per model) and arrives in the function as the
    # models' values stacked into a [N] tensor; the type checker is told both are fine.
    PerModel = Any
else:
    PerModel = float

RESERVED = ("base", "stats", "generator", "layout", "threshold")


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about one merge method."""

    name: str
    fn: Callable[..., torch.Tensor]
    paper: str
    space: Literal["delta", "weights"]
    base: Literal["required", "optional", "none"]
    per_model: tuple[str, ...]
    params: dict[str, tuple[Any, Any]]  # name -> (annotation, default); includes per-model ones
    stats: str | None = None  # kind of per-model statistics the method needs ("fisher", "gram")
    random: bool = False
    min_models: int = 1
    max_models: int | None = None
    coefficients: Callable[..., torch.Tensor] | None = None  # for methods linear in the inputs
    doc: str = ""
    uses: frozenset[str] = field(default_factory=frozenset)  # reserved kwargs the function accepts

    @property
    def linear(self) -> bool:
        """True when the result is ``Σ cᵢ xᵢ`` (so LoRA ``exact`` mode can store it without loss)."""
        return self.coefficients is not None

    @property
    def global_params(self) -> tuple[str, ...]:
        return tuple(p for p in self.params if p not in self.per_model)

    def describe(self) -> str:
        ps = ", ".join(
            f"{n}={d!r}" + (" (per model)" if n in self.per_model else "")
            for n, (_, d) in self.params.items()
        )
        return f"{self.name}({ps})"


def _parameter_hints(fn: Callable[..., Any], sig: inspect.Signature) -> dict[str, Any]:
    """The evaluated annotations of ``fn``'s keyword-only parameters other than the reserved ones: only those are
    read, so annotations such as ``torch.Tensor`` do not import torch (`moerge.merging.lazy`)."""
    wanted = {
        p.name
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in RESERVED
    }
    own = {k: v for k, v in inspect.get_annotations(fn).items() if k in wanted}
    holder = types.SimpleNamespace(__annotations__=own)
    return typing.get_type_hints(holder, globalns=getattr(fn, "__globals__", {}))


def merge_method(
    name: str,
    *,
    paper: str = "",
    space: Literal["delta", "weights"] = "delta",
    per_model: tuple[str, ...] = (),
    stats: str | None = None,
    min_models: int = 1,
    max_models: int | None = None,
    coefficients: Callable[..., torch.Tensor] | None = None,
    base: Literal["required", "optional", "none"] | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Declare ``fn(x, weight, *, params...) -> Tensor`` as merge method ``name`` (its spec is stored on the
    function as ``fn.merge_spec``; `moerge.merging.registry` registers it).

    ``per_model`` names the keyword parameters that take one value per input model (``weight`` always does);
    the function receives them as ``[N]`` tensors. ``coefficients(weight, **global_params) -> [N]`` marks a
    method whose result is ``Σ cᵢ xᵢ``.
    """

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        sig = inspect.signature(fn)
        hints = _parameter_hints(fn, sig)
        params: dict[str, tuple[Any, Any]] = {"weight": (float, 1.0)}
        uses = set()
        for p in sig.parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if p.name in RESERVED:
                uses.add(p.name)
                continue
            if p.default is inspect.Parameter.empty:
                raise PluginError(f"merge method {name!r}: parameter {p.name!r} needs a default value")
            params[p.name] = (hints.get(p.name, Any), p.default)
        unknown = set(per_model) - set(params)
        if unknown:
            raise PluginError(f"merge method {name!r}: per_model names unknown parameters {sorted(unknown)}")
        base_mode = base or ("required" if space == "delta" else ("optional" if "base" in uses else "none"))
        spec = MethodSpec(
            name=name,
            fn=fn,
            paper=paper,
            space=space,
            base=base_mode,
            per_model=("weight", *per_model),
            params=params,
            stats=stats,
            random="generator" in uses,
            min_models=min_models,
            max_models=max_models,
            coefficients=coefficients,
            doc=inspect.getdoc(fn) or "",
            uses=frozenset(uses),
        )
        setattr(fn, SPEC_ATTR, spec)
        return fn

    return wrap
