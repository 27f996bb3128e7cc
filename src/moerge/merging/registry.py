"""The registry of merge methods, plus parameter validation and the per-tensor execution of a method.

Methods are one decorated pure function each (`moerge.merging.spec.merge_method`). The registry collects them
explicitly: the built-ins from `moerge.merging.methods`, then every installed ``moerge.merge_methods`` entry
point, then plugins given at run time (`moerge.plugins.load_plugins`) or `register_merge_method` from Python.
"""

from __future__ import annotations

import inspect
import re
import zlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from moerge.errors import MalformedConfigError, PluginError, UnknownNameError
from moerge.merging.spec import RESERVED, SPEC_ATTR, MethodSpec, merge_method

if TYPE_CHECKING:
    import torch
else:
    from moerge.merging.lazy import torch

__all__ = [
    "RESERVED",
    "MethodSpec",
    "available_methods",
    "get_method",
    "merge_method",
    "merge_tensor",
    "register_from",
    "register_merge_method",
    "validate_params",
]

_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False


def register_merge_method(
    fn_or_spec: Callable[..., torch.Tensor] | MethodSpec, *, source: str = ""
) -> MethodSpec:
    """Register a ``@merge_method`` function (or its spec). A name registered twice is refused."""
    spec = fn_or_spec if isinstance(fn_or_spec, MethodSpec) else getattr(fn_or_spec, SPEC_ATTR, None)
    if not isinstance(spec, MethodSpec):
        raise PluginError(f"{fn_or_spec!r} is not decorated with @merge_method")
    known = _REGISTRY.get(spec.name)
    if known is not None and known.fn is not spec.fn:
        where = f" (from {source})" if source else ""
        raise PluginError(f"merge method {spec.name!r}{where} is already registered; rename it")
    _REGISTRY[spec.name] = spec
    return spec


def register_from(value: ModuleType | Any, *, source: str = "") -> list[str]:
    """Register every ``@merge_method`` function a module (or list, or single function) offers."""
    from moerge.entrypoints import objects_in

    _ensure_loaded()
    found = [o for o in objects_in(value) if isinstance(getattr(o, SPEC_ATTR, None), MethodSpec)]
    return [register_merge_method(fn, source=source).name for fn in found]


def _ensure_loaded() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from moerge.entrypoints import MERGE_METHOD_GROUP, entry_point_objects, objects_in
    from moerge.merging import methods

    for obj in objects_in(methods):
        if isinstance(getattr(obj, SPEC_ATTR, None), MethodSpec):
            register_merge_method(obj, source="moerge.merging.methods")
    for label, value in entry_point_objects(MERGE_METHOD_GROUP):
        for obj in objects_in(value):
            if isinstance(getattr(obj, SPEC_ATTR, None), MethodSpec):
                register_merge_method(obj, source=f"entry point {label}")


def available_methods() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The spec of method ``name``; an unknown name raises one error listing the valid ones."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown merge method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))} "
            "(a method of your own: --plugin MODULE_OR_FILE, see docs/extending.md)."
        ) from None


# ----------------------------------------------------------------------------------------------- validation


def _param_model(spec: MethodSpec, names: tuple[str, ...], label: str) -> type[BaseModel]:
    fields = {n: (spec.params[n][0], spec.params[n][1]) for n in names}
    return create_model(f"{spec.name}_{label}", __config__=ConfigDict(extra="forbid"), **fields)  # type: ignore[call-overload]


class Setting:
    """A parameter that varies by tensor, as in mergekit: a *gradient* (a list of values interpolated over the
    layer position t ∈ [0, 1]) or *conditionals* (``[{filter: substring, value: …}, …]``, first match wins; a
    filter-less entry matches everything).

    ``fallback`` is what a tensor that no filter matches gets: a per-model setting falls through to the global
    value of the same parameter, as in mergekit (``ConfigReader.parameter_sources`` yields the model's, then the
    global settings, and ``parameter_resolver.resolve_parameter`` takes the first that is not None)."""

    def __init__(
        self,
        gradient: list[Any] | None = None,
        conditions: list[tuple[str | None, Any]] | None = None,
        fallback: Any = None,
    ):
        self.gradient, self.conditions, self.fallback = gradient, conditions, fallback

    def with_fallback(self, fallback: Any) -> Setting:
        """This setting, falling through to ``fallback`` (a value or a `Setting`) where no filter matches."""
        return Setting(self.gradient, self.conditions, fallback)

    @classmethod
    def parse(cls, value: Any, check: Callable[[Any], Any], label: str, where: str) -> Setting:
        if isinstance(value, dict):
            value = [value]
        if value and all(not isinstance(v, (list, dict)) for v in value):
            return cls(gradient=[check(v) for v in value])
        conds = []
        for v in value:
            if not isinstance(v, dict) or "value" not in v or set(v) - {"filter", "value"}:
                raise MalformedConfigError(
                    f"{where}: parameter {label}: expected a number, a list of numbers (a gradient over layers) or "
                    f"a list of {{filter: name-substring, value: …}}; got {v!r}."
                )
            inner = v["value"]
            conds.append(
                (
                    v.get("filter"),
                    cls.parse(inner, check, label, where)
                    if isinstance(inner, (list, dict))
                    else check(inner),
                )
            )
        return cls(conditions=conds)

    def at(self, name: str, t: float) -> Any:
        got = self._own(name, t)
        if got is None and self.fallback is not None:
            return self.fallback.at(name, t) if isinstance(self.fallback, Setting) else self.fallback
        return got

    def _own(self, name: str, t: float) -> Any:
        if self.gradient is not None:
            vals = self.gradient
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                return vals[int(t * (len(vals) - 1))]
            scaled = t * (len(vals) - 1)
            i0 = int(scaled)
            i1 = min(len(vals) - 1, i0 + 1)
            return (1 - (scaled - i0)) * vals[i0] + (scaled - i0) * vals[i1]
        for flt, val in self.conditions or []:
            if flt is None or flt == "*" or flt in name:
                return val.at(name, t) if isinstance(val, Setting) else val
        return None

    def __repr__(self) -> str:
        return (
            f"Setting(gradient={self.gradient})"
            if self.gradient is not None
            else f"Setting({self.conditions})"
        )


_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_position(name: str, num_layers: int | None) -> float:
    """mergekit's t for a tensor: idx/(L−1) inside layer idx of L, 1 when L = 1, 0 outside the layers."""
    m = _LAYER.search(name)
    if m is None or not num_layers:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def count_layers(names: list[str]) -> int:
    idx = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    return max(idx) + 1 if idx else 0


def resolve_params(
    spec: MethodSpec,
    global_params: dict[str, Any],
    per_model: list[dict[str, Any]],
    name: str,
    num_layers: int | None,
    t: float | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Scalar parameters for tensor ``name``: `Setting` values are evaluated (no matching filter → the default).
    ``t`` overrides the layer position (in a slice, mergekit's t runs over the slice's layers)."""
    if not any(isinstance(v, Setting) for v in global_params.values()) and not any(
        isinstance(v, Setting) for pm in per_model for v in pm.values()
    ):
        return global_params, per_model
    if t is None:
        t = layer_position(name, num_layers)

    def one(k: str, v: Any) -> Any:
        if not isinstance(v, Setting):
            return v
        got = v.at(name, t)
        return spec.params[k][1] if got is None else got

    def ev(d: dict[str, Any]) -> dict[str, Any]:
        return {k: one(k, v) for k, v in d.items()}

    return ev(global_params), [ev(pm) for pm in per_model]


def validate_params(
    spec: MethodSpec, global_params: dict[str, Any], per_model: list[dict[str, Any]], where: str = "config"
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check and complete parameters: returns (global values, one dict of per-model values per model).

    Per-model parameters may be given globally (a default for every model) and overridden per model, as in
    mergekit. Unknown names or bad values raise one `MalformedConfigError` listing the valid parameters.
    """
    valid = ", ".join(f"{n} (default {d!r})" for n, (_, d) in spec.params.items())
    unknown = sorted(set(global_params) - set(spec.params))
    if unknown:
        raise MalformedConfigError(
            f"{where}: merge method {spec.name!r} has no parameter {', '.join(map(repr, unknown))}; valid: {valid}."
        )
    for i, pm in enumerate(per_model):
        bad = sorted(set(pm) - set(spec.per_model))
        if bad:
            hint = (
                f" ({', '.join(b for b in bad if b in spec.params)} can only be set globally)"
                if any(b in spec.params for b in bad)
                else ""
            )
            raise MalformedConfigError(
                f"{where}: model {i}: merge method {spec.name!r} takes no per-model parameter "
                f"{', '.join(map(repr, bad))}{hint}; per-model parameters: {', '.join(spec.per_model)}; valid: {valid}."
            )

    def check(name: str, value: Any, label: str) -> Any:
        """Validate one scalar value of parameter ``name``."""
        model = _param_model(spec, (name,), "one")
        try:
            return getattr(model(**{name: value}), name)
        except ValidationError as e:
            err = e.errors()[0]
            raise MalformedConfigError(
                f"{where}: merge method {spec.name!r}, parameter {label}: {err['msg']} (got {value!r})."
            ) from None

    def setting(name: str, value: Any, label: str) -> Any:
        if isinstance(value, (list, dict)):
            return Setting.parse(value, lambda v: check(name, v, label), label, where)
        return check(name, value, label)

    defaults = {n: setting(n, v, n) for n, v in global_params.items() if n in spec.per_model}
    g = {n: setting(n, global_params.get(n, spec.params[n][1]), n) for n in spec.global_params}

    def one_model(n: str, pm: dict[str, Any], label: str) -> Any:
        if n not in pm:
            return defaults.get(n, spec.params[n][1])
        value = setting(n, pm[n], label)
        if isinstance(value, Setting) and n in defaults:  # unmatched filters fall through to the global value
            return value.with_fallback(defaults[n])
        return value

    models = [
        {n: one_model(n, pm, f"models[{i}].{n}") for n in spec.per_model} for i, pm in enumerate(per_model)
    ]
    n = len(per_model)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        most = f" and at most {spec.max_models}" if spec.max_models is not None else ""
        raise MalformedConfigError(
            f"{where}: merge method {spec.name!r} takes at least {spec.min_models}{most} models "
            f"(besides the base model); got {n}."
        )
    return g, models


# ------------------------------------------------------------------------------------------------ execution


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: results do not depend on the order in which tensors are merged."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def merge_tensor(
    spec: MethodSpec,
    x: torch.Tensor,
    *,
    base: torch.Tensor | None,
    global_params: dict[str, Any],
    per_model: list[dict[str, Any]],
    name: str = "",
    seed: int = 0,
    stats: torch.Tensor | None = None,
    layout: str = "linear",
    inplace: bool = False,
    threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one stacked tensor ``x`` ``[N, *shape]`` (float32) with already validated parameters.
    ``inplace=True`` lets the engine reuse ``x`` as scratch (task vectors are formed in place)."""
    kwargs: dict[str, Any] = dict(global_params)
    for p in spec.per_model:
        # float32 even when the merge computes in bfloat16: methods round them where mergekit does
        kwargs[p] = torch.tensor(
            [pm[p] for pm in per_model], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device
        )
    weight = kwargs.pop("weight")
    if "generator" in spec.uses:
        kwargs["generator"] = torch.Generator(device=x.device).manual_seed(tensor_seed(seed, name))
    if "stats" in spec.uses:
        kwargs["stats"] = stats
    if "layout" in spec.uses:
        kwargs["layout"] = layout
    if "threshold" in spec.uses:
        if global_params.get("trim") == "model" and threshold is None:
            raise MalformedConfigError(
                f"merge method {spec.name!r}: trim: model needs the whole model's task vectors, so it works on "
                "full-checkpoint merges only; use trim: tensor here."
            )
        kwargs["threshold"] = threshold
    if spec.space == "delta":  # the method owns the task vectors it is given (and may overwrite them)
        if base is None:  # LoRA ΔW: the inputs already are task vectors
            return spec.fn(x if inplace else x.clone(), weight, **kwargs)
        return base + spec.fn(x.sub_(base) if inplace else x - base, weight, **kwargs)
    if "base" in spec.uses:
        kwargs["base"] = base
    return spec.fn(x, weight, **kwargs)


def linear_coefficients(spec: MethodSpec, global_params: dict[str, Any], per_model: list[dict[str, Any]]):
    """``c`` with merge(x) = Σ cᵢ xᵢ for a linear method (LoRA exact mode)."""
    if spec.coefficients is None:
        raise MalformedConfigError(f"merge method {spec.name!r} is not linear in the inputs")
    weight = torch.tensor([pm["weight"] for pm in per_model], dtype=torch.float64)
    args = {k: v for k, v in global_params.items() if k in inspect.signature(spec.coefficients).parameters}
    return spec.coefficients(weight, **args)
