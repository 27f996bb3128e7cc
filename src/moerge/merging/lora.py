"""Merging LoRA experts, with the mode always explicit (survey §4.1 item 8).

- ``exact``: ΔW = Σ cᵢ·sᵢ·BᵢAᵢ stored without loss as one rank-Σrᵢ LoRA by concatenating the factors
  (A = [c₁s₁A₁; …; c_N s_N A_N], B = [B₁ … B_N], scaling 1). Only for methods linear in their inputs (linear,
  task_arithmetic); ``cᵢ`` are the method's coefficients. Equals PEFT's ``add_weighted_adapter(..., "cat")``.
- ``factor``: A and B are combined *separately* (as LoraHub, LoRAX and PEFT's ``linear``/``ties`` do). This is
  an **approximation**: (Σ√cᵢBᵢ)(Σ√cᵢAᵢ) ≠ Σ cᵢBᵢAᵢ as soon as two experts are merged (cross terms).
  ``factor_weights="sqrt"`` follows PEFT (each factor gets √|cᵢsᵢ|, the sign on A, scaling 1);
  ``"linear"`` follows LoraHub (each factor gets cᵢ, the experts' common scaling is kept).
- ``svd``: each expert's dense ΔWᵢ per module, merged with any method (TIES, DARE … act on ΔW), then
  truncated to ``rank`` by SVD (B = U·S, A = Vᴴ, scaling 1).
- ``dense``: like ``svd`` without the truncation; the result is a dense-delta expert.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from moerge.errors import (
    BaseModelMismatchError,
    MalformedConfigError,
    NonFiniteWeightsError,
    ParameterRangeError,
    ShapeMismatchError,
)
from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
from moerge.merging.config import check_param_ranges
from moerge.merging.registry import (
    MethodSpec,
    Setting,
    count_layers,
    linear_coefficients,
    merge_tensor,
    resolve_params,
)

LoraMode = Literal["exact", "factor", "svd", "dense"]
LORA_MODES = ("exact", "factor", "svd", "dense")


def _check_experts(experts: list[Expert], allow_dense: bool = False) -> list[str]:
    if not experts:
        raise MalformedConfigError("no experts to merge")
    for e in experts:
        if e.kind != "lora" and not allow_dense:
            raise MalformedConfigError(
                f"expert {e.name!r} is a dense delta; only lora_mode 'dense' merges dense experts (task vectors)."
            )
        e.check(f"expert {e.name!r}")
    fps = {e.metadata.base_fingerprint for e in experts if e.metadata.base_fingerprint}
    if len(fps) > 1:
        raise BaseModelMismatchError(
            f"the experts were trained on different base models (fingerprints {sorted(fps)}); merge experts of one base."
        )
    modules = sorted(set().union(*(e.lora for e in experts)))
    for m in modules:
        present = [(e.name, e.lora[m]) for e in experts if m in e.lora]
        shapes = {(lm.d_out, lm.d_in, lm.fan_in_fan_out, lm.embedding) for _, lm in present}
        if len(shapes) > 1:
            raise ShapeMismatchError(
                f"module {m}: the experts disagree on its shape/layout ({', '.join(f'{n}: {lm.d_out}x{lm.d_in}' for n, lm in present)})."
            )
    return modules


def _exact(experts: list[Expert], module: str, coef: torch.Tensor) -> LoraModule:
    present = [(i, e.lora[module]) for i, e in enumerate(experts) if module in e.lora]
    idx = torch.tensor([i for i, _ in present])
    scale = coef[idx] * torch.tensor([lm.scaling for _, lm in present], dtype=torch.float64)
    ranks = {lm.rank for _, lm in present}
    if len(ranks) == 1:  # one batched op over experts
        a = torch.stack([lm.A.float() for _, lm in present])  # [N, r, d_in]
        b = torch.stack([lm.B.float() for _, lm in present])  # [N, d_out, r]
        A = (a * scale.to(a.dtype)[:, None, None]).reshape(-1, a.shape[-1])
        B = b.permute(1, 0, 2).reshape(b.shape[1], -1)
    else:
        reps = torch.tensor([lm.rank for _, lm in present])
        A = (
            torch.cat([lm.A.float() for _, lm in present])
            * scale.to(torch.float32).repeat_interleave(reps)[:, None]
        )
        B = torch.cat([lm.B.float() for _, lm in present], dim=1)
    ref = present[0][1]
    return LoraModule(
        A=A.contiguous(),
        B=B.contiguous(),
        alpha=float(A.shape[0]),
        fan_in_fan_out=ref.fan_in_fan_out,
        embedding=ref.embedding,
    )


def _factor(
    spec: MethodSpec,
    experts: list[Expert],
    module: str,
    global_params: dict[str, Any],
    per_model: list[dict[str, Any]],
    factor_weights: str,
    seed: int,
) -> LoraModule:
    present = [(i, e.lora[module]) for i, e in enumerate(experts) if module in e.lora]
    ranks = {lm.rank for _, lm in present}
    if len(ranks) > 1:
        raise ShapeMismatchError(
            f"module {module}: lora_mode 'factor' needs equal ranks, got {sorted(ranks)}; use 'exact' or 'svd'."
        )
    a = torch.stack([lm.A.float() for _, lm in present])
    b = torch.stack([lm.B.float() for _, lm in present])
    idx = [i for i, _ in present]
    scal = torch.tensor([lm.scaling for _, lm in present], dtype=torch.float64)
    ref = present[0][1]
    sub = [per_model[i] for i in idx]
    # linear methods: the coefficients cᵢ (normalisation, λ included) are the factor weights
    w = (
        linear_coefficients(spec, global_params, sub)
        if spec.linear
        else torch.tensor([pm["weight"] for pm in sub], dtype=torch.float64)
    )
    if factor_weights == "linear":
        if len({float(s) for s in scal}) > 1:
            raise MalformedConfigError(
                f"module {module}: factor_weights 'linear' needs one LoRA scaling across experts; use 'sqrt'."
            )
        w_a = w_b = w
        alpha, rslora = present[0][1].alpha, present[0][1].use_rslora
    else:
        w = w * scal
        w_a, w_b = w.sign() * w.abs().sqrt(), w.abs().sqrt()
        alpha, rslora = float(a.shape[1]), False
    if spec.linear:
        A = torch.tensordot(w_a.to(a.dtype), a, dims=1)
        B = torch.tensordot(w_b.to(b.dtype), b, dims=1)
    else:
        A = merge_tensor(
            spec,
            a,
            base=_zero_base(spec, a),
            global_params=global_params,
            per_model=[{**pm, "weight": float(v)} for pm, v in zip(sub, w_a)],
            name=module + ".lora_A",
            seed=seed,
        )
        B = merge_tensor(
            spec,
            b,
            base=_zero_base(spec, b),
            global_params=global_params,
            per_model=[{**pm, "weight": float(v)} for pm, v in zip(sub, w_b)],
            name=module + ".lora_B",
            seed=seed,
        )
    return LoraModule(
        A=A.contiguous(),
        B=B.contiguous(),
        alpha=alpha,
        use_rslora=rslora,
        fan_in_fan_out=ref.fan_in_fan_out,
        embedding=ref.embedding,
    )


def _zero_base(spec: MethodSpec, x: torch.Tensor) -> torch.Tensor | None:
    """LoRA deltas are merged around 0: weight-space methods that need a base get a zero tensor."""
    if spec.space == "weights" and spec.base == "required":
        return torch.zeros_like(x[0])
    return None


def _dense_delta(
    spec: MethodSpec,
    experts: list[Expert],
    module: str,
    global_params: dict[str, Any],
    per_model: list[dict[str, Any]],
    seed: int,
    stats: list[dict[str, torch.Tensor]] | None,
) -> torch.Tensor:
    ref = next(e.lora[module] for e in experts if module in e.lora)
    deltas = torch.stack(
        [e.lora[module].delta() if module in e.lora else torch.zeros(ref.d_out, ref.d_in) for e in experts]
    )  # [N, d_out, d_in], nn.Linear layout
    key = module + ".weight"
    s = None
    if stats is not None and all(key in st for st in stats):
        s = torch.stack([st[key].float() for st in stats])
        if spec.stats == "fisher" and ref.transposed and s.shape[1:] != deltas.shape[1:]:
            s = s.transpose(1, 2)
    return merge_tensor(
        spec,
        deltas,
        base=_zero_base(spec, deltas),
        global_params=global_params,
        per_model=per_model,
        name=key,
        seed=seed,
        stats=s,
        layout="linear",
    )


def _plain(v: Any) -> Any:
    return repr(v) if isinstance(v, Setting) else v


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with B @ A the best rank-``rank`` approximation of ``delta`` (B = U·S, A = Vᴴ, as PEFT)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, S.shape[0])
    return Vh[:k].float().contiguous(), (U[:, :k] * S[:k]).float().contiguous()


def merge_lora_experts(
    spec: MethodSpec,
    experts: list[Expert],
    global_params: dict[str, Any],
    per_model: list[dict[str, Any]],
    *,
    mode: LoraMode,
    name: str = "merged",
    rank: int | None = None,
    factor_weights: Literal["sqrt", "linear"] = "sqrt",
    seed: int = 0,
    stats: list[dict[str, torch.Tensor]] | None = None,
    recipe: dict[str, Any] | None = None,
) -> Expert:
    """Merge LoRA ``experts`` with method ``spec`` in ``mode``; returns a new `Expert` whose metadata records the
    recipe (``training["merge"]``) and whether the result is exact (``extra["merge_exact"]``)."""
    if mode not in LORA_MODES:
        raise MalformedConfigError(f"lora_mode {mode!r} is not one of {', '.join(LORA_MODES)}.")
    modules = _check_experts(experts, allow_dense=mode == "dense")
    if any(e.kind == "dense" for e in experts):
        return _merge_task_vectors(spec, experts, global_params, per_model, name=name, seed=seed, stats=stats,
                                   recipe=recipe)  # fmt: skip
    if mode == "exact" and not spec.linear:
        raise MalformedConfigError(
            f"merge method {spec.name!r} is not linear in the experts, so lora_mode 'exact' cannot store it as a "
            "LoRA; use lora_mode 'svd' (rank-truncated) or 'dense'. Linear methods: linear, task_arithmetic."
        )
    if spec.stats and mode in ("exact", "factor"):
        raise MalformedConfigError(f"merge method {spec.name!r} works on ΔW; use lora_mode 'svd' or 'dense'.")
    num_layers = count_layers(modules)

    def at(module: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Parameters for this module (gradients over layers and name filters evaluated), range-checked."""
        g, pm = resolve_params(spec, global_params, per_model, module + ".weight", num_layers)
        check_param_ranges(spec.name, g, pm, where=f"module {module}")
        return g, pm

    def coefficients(module: str) -> torch.Tensor:
        c = linear_coefficients(spec, *at(module))
        if not torch.isfinite(c).all():
            raise ParameterRangeError(
                f"module {module}: merge method {spec.name!r} gives the coefficients {c.tolist()} (weights summing to 0 "
                "with normalize?); change the weights or set normalize: false."
            )
        return c

    lora: dict[str, LoraModule] = {}
    dense: dict[str, torch.Tensor] = {}
    if mode == "exact":
        lora = {m: _exact(experts, m, coefficients(m)) for m in modules}
    elif mode == "factor":
        lora = {m: _factor(spec, experts, m, *at(m), factor_weights, seed) for m in modules}
    else:
        for m in modules:
            d = _dense_delta(spec, experts, m, *at(m), seed, stats)
            if not torch.isfinite(d).all():
                raise NonFiniteWeightsError(
                    f"module {m}: the {spec.name} merge of ΔW holds NaN/Inf; nothing was written. Check the "
                    "parameters (weights summing to 0 with normalize, extreme scale) and statistics."
                )
            ref = next(e.lora[m] for e in experts if m in e.lora)
            if mode == "dense":
                dense[m + ".weight"] = d.T.contiguous() if ref.transposed else d
            else:
                k = rank or max(e.lora[m].rank for e in experts if m in e.lora)
                A, B = svd_factors(d, k)
                lora[m] = LoraModule(
                    A=A,
                    B=B,
                    alpha=float(A.shape[0]),
                    fan_in_fan_out=ref.fan_in_fan_out,
                    embedding=ref.embedding,
                )
    first = experts[0].metadata
    exact = mode == "exact" or (mode == "dense")
    metadata = ExpertMetadata(
        name=name,
        kind="dense" if mode == "dense" else "lora",
        base_model=first.base_model,
        base_fingerprint=first.base_fingerprint,
        tags=["merged", f"merge:{spec.name}", f"lora_mode:{mode}"],
        description=f"{spec.name} merge of {', '.join(e.name for e in experts)} (lora_mode {mode})",
        training={
            "merge": recipe
            or {
                "merge_method": spec.name,
                "global_parameters": {k: _plain(v) for k, v in global_params.items()},
                "per_model": [{k: _plain(v) for k, v in pm.items()} for pm in per_model],
                "experts": [e.name for e in experts],
            }
        },
        extra={
            "merge_lora_mode": mode,
            "merge_exact": exact,
            "merge_note": {
                "exact": "lossless: factors concatenated, rank = sum of ranks",
                "factor": "approximation: A and B combined separately (cross terms)",
                "svd": f"rank-truncated SVD of the merged ΔW (rank {rank or 'max input rank'})",
                "dense": "dense ΔW per module",
            }[mode],
            "merged_from": [e.name for e in experts],
        },
    )
    peft_config = dict(experts[0].peft_config)
    merged = Expert(metadata=metadata, lora=lora, dense=dense, peft_config=peft_config)
    try:
        merged.check(f"the {spec.name} merge")
    except NonFiniteWeightsError as e:
        raise NonFiniteWeightsError(
            f"{e} Nothing was written: check the experts for NaN weights and the parameters (weights summing to 0 "
            "with normalize, extreme scale)."
        ) from None
    return merged


def _merge_task_vectors(
    spec: MethodSpec,
    experts: list[Expert],
    global_params: dict[str, Any],
    per_model: list[dict[str, Any]],
    *,
    name: str,
    seed: int,
    stats: list[dict[str, torch.Tensor]] | None,
    recipe: dict[str, Any] | None,
) -> Expert:
    """``lora_mode="dense"`` over a library with dense experts (full fine-tunes' task vectors, by parameter
    name; a LoRA expert counts as its densified ΔW in the weight's own layout): every parameter some expert
    updates is merged with ``spec`` around 0, an expert without it contributing zeros. 2-D weights are taken as
    ``nn.Linear`` layout for RegMean (a Conv1D model's task vectors: merge them as checkpoints instead)."""
    updates = [
        {**{f"{m}.weight": lm.delta_for_weight() for m, lm in e.lora.items()}, **e.dense} for e in experts
    ]
    keys = sorted(set().union(*updates))
    num_layers = count_layers([k.rsplit(".", 1)[0] for k in keys])
    dense: dict[str, torch.Tensor] = {}
    for key in keys:
        ref = next(u[key] for u in updates if key in u)
        deltas = torch.stack([u[key].float() if key in u else torch.zeros(ref.shape) for u in updates])
        g, pm = resolve_params(spec, global_params, per_model, key, num_layers)
        check_param_ranges(spec.name, g, pm, where=f"parameter {key}")
        s = None
        if stats is not None and all(key in st for st in stats):
            s = torch.stack([st[key].float() for st in stats])
        d = merge_tensor(spec, deltas, base=_zero_base(spec, deltas), global_params=g, per_model=pm, name=key,
                         seed=seed, stats=s, layout="linear")  # fmt: skip
        if not torch.isfinite(d).all():
            raise NonFiniteWeightsError(
                f"parameter {key}: the {spec.name} merge of the task vectors holds NaN/Inf; nothing was written. "
                "Check the parameters (weights summing to 0 with normalize, extreme scale) and statistics."
            )
        dense[key] = d
    first = experts[0].metadata
    metadata = ExpertMetadata(
        name=name,
        kind="dense",
        base_model=first.base_model,
        base_fingerprint=first.base_fingerprint,
        tags=["merged", f"merge:{spec.name}", "lora_mode:dense"],
        description=f"{spec.name} merge of the task vectors of {', '.join(e.name for e in experts)}",
        training={"merge": recipe or {"merge_method": spec.name, "experts": [e.name for e in experts]}},
        extra={"merge_exact": True},
    )
    return Expert(metadata=metadata, dense=dense)
