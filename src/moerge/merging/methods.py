"""The built-in merge methods (survey §4.1), each one decorated pure function over stacked tensors.

``x`` is ``[N, *shape]`` (task vectors for ``space="delta"`` methods, weights otherwise), ``weight`` is ``[N]``.
Defaults follow mergekit where mergekit has the method, so a mergekit YAML means the same thing here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from moerge.errors import MalformedConfigError
from moerge.merging.ops import (
    bernoulli_drop,
    della_drop,
    disjoint_sum,
    expand,
    low_precision,
    trim_outliers,
    trim_to_density,
)
from moerge.merging.ops import (
    slerp as slerp_pair,
)
from moerge.merging.spec import PerModel, merge_method

if TYPE_CHECKING:
    import torch
else:
    from moerge.merging.lazy import torch

Rescale = Literal["inverse", "l1", "none"]


def _rescale_l1(original: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit ≥0.1.5's ``rescale``: scale each sparsified ``kept[i]`` back to the L1 norm of ``original[i]``."""
    dims = tuple(range(1, original.ndim))
    before = original.abs().sum(dim=dims, keepdim=True)
    after = kept.abs().sum(dim=dims, keepdim=True)
    ok = (before >= eps) & (after >= eps)
    return torch.where(ok, kept * before / after.clamp(min=eps), kept)


def _weighted_sum(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ wᵢxᵢ: one ``tensordot`` in float32; in bfloat16/float16 mergekit's order (each wᵢxᵢ rounded, then
    summed), so a merge computed in a low-precision ``dtype`` gives mergekit's tensors."""
    if low_precision(x.dtype):
        return (x * expand(weight, x)).sum(dim=0)
    return torch.tensordot(weight.to(x.dtype), x, dims=([0], [0]))


# --------------------------------------------------------------------------------------------- linear family


def _linear_coefficients(weight: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    return weight / weight.sum() if normalize else weight


@merge_method(
    "linear",
    paper="Wortsman et al. 2022, arXiv:2203.05482 (model soups)",
    space="weights",
    coefficients=_linear_coefficients,
)
def linear(x: torch.Tensor, weight: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Weighted average Σ wᵢθᵢ / Σ wᵢ (a uniform soup with equal weights); a weighted sum without ``normalize``.
    Inputs in bfloat16/float16 are summed in float32 and the result rounded once, as mergekit's ``linear``."""
    if low_precision(x.dtype):  # mergekit's order: float32 accumulator, addcmul per model, divide, round
        acc = torch.zeros(x.shape[1:], dtype=torch.float32)
        for xi, wi in zip(x, weight.float()):
            acc.addcmul_(xi, wi)
        return (acc.div_(weight.float().sum()) if normalize else acc).to(x.dtype)
    out = _weighted_sum(x, weight)
    if normalize:
        s = weight.sum()
        out = out / (s if s.abs() > 1e-12 else 1.0)
    return out


def _ta_coefficients(weight: torch.Tensor, normalize: bool = False, lambda_: float = 1.0) -> torch.Tensor:
    return (weight / weight.sum() if normalize else weight) * lambda_


@merge_method(
    "task_arithmetic",
    paper="Ilharco et al. 2023, arXiv:2212.04089",
    coefficients=lambda weight, normalize=False, scale=1.0: _ta_coefficients(weight, normalize, scale),
)
def task_arithmetic(
    x: torch.Tensor, weight: torch.Tensor, *, scale: float = 1.0, normalize: bool = False
) -> torch.Tensor:
    """θ₀ + λ Σ wᵢτᵢ (λ is ``scale``, mergekit's ``lambda``); divided by Σ wᵢ with ``normalize``."""
    if low_precision(x.dtype):
        return disjoint_sum(x * expand(weight, x), weight, None, normalize) * scale
    out = _weighted_sum(x, weight)
    if normalize:
        s = float(weight.sum())
        out = out / (s if abs(s) >= 1e-8 else 1.0)
    return out * scale if scale != 1 else out


# ---------------------------------------------------------------------------------------- TIES / DARE family


def _sparsified_task_arithmetic(
    kept: torch.Tensor,
    original: torch.Tensor,
    weight: torch.Tensor,
    *,
    sign: Literal["mass", "count"] | None,
    normalize: bool,
    scale: float,
    rescale: Rescale,
) -> torch.Tensor:
    if rescale == "l1":
        kept = _rescale_l1(original, kept)
    # in place: ``kept`` is either new or the task vectors themselves, which a delta method owns
    weighted = kept.mul_(expand(weight, kept))
    return scale * disjoint_sum(weighted, weight, sign, normalize)


@merge_method("ties", paper="Yadav et al. 2023, arXiv:2306.01708", per_model=("density",))
def ties(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    density: PerModel = 1.0,
    sign: Literal["mass", "count"] = "mass",
    normalize: bool = True,
    scale: float = 1.0,
    rescale: Rescale = "none",
    variant: Literal["mergekit", "peft"] = "mergekit",
    trim: Literal["tensor", "model"] = "tensor",
    threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """Trim each τᵢ to its top-``density`` magnitudes (per tensor, as mergekit), elect a sign per entry from
    Σ wᵢτ̂ᵢ (``mass``) or the sign count, and average the agreeing entries: Σ wᵢτ̂ᵢ·maskᵢ / Σ wᵢ·maskᵢ
    (mergekit's weighted TIES, ``generalized_task_arithmetic.py``).

    ``variant: peft`` is PEFT's ``add_weighted_adapter(combination_type="ties")`` (``peft/utils/merge_utils.py``
    ``ties``/``disjoint_merge``): the sign is elected on the unweighted τ̂ᵢ and Σ wᵢτ̂ᵢ·maskᵢ is divided by the
    count of agreeing entries (``normalize`` is not used).

    ``trim: model`` trims over the whole model, as the paper (Yadav et al. 2023, §3; the official
    ``ties_minimal.ipynb`` ``topk_values_mask`` over the flattened task vector) and FusionBench do: each τᵢ keeps
    the entries whose magnitude is at least the model-wide threshold ``threshold[i]`` that keeps a ``density``
    fraction of all its entries (the engine computes it in a pre-pass; ties at the threshold are all kept, as
    there)."""
    if trim == "model":
        assert threshold is not None
        kept = torch.where(x.abs() >= expand(threshold, x), x, 0.0)
    else:
        kept = trim_to_density(x, density, inplace=rescale != "l1" and variant != "peft")
    if variant == "peft":
        if rescale == "l1":
            kept = _rescale_l1(x, kept)
        score = kept.sum(dim=0) if sign == "mass" else kept.sign().sum(dim=0)
        agree = kept.sign() == torch.where(score >= 0, 1.0, -1.0).to(kept.dtype)
        mixed = (kept * expand(weight, kept) * agree).sum(dim=0)
        return scale * mixed / agree.sum(dim=0).clamp(min=1)
    return _sparsified_task_arithmetic(
        kept, x, weight, sign=sign, normalize=normalize, scale=scale, rescale=rescale
    )


@merge_method("dare_linear", paper="Yu et al. 2024, arXiv:2311.03099", per_model=("density",))
def dare_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    density: PerModel = 1.0,
    rescale: Rescale = "inverse",
    normalize: bool = False,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: drop each entry of τᵢ with probability 1 − ``density``, rescale the kept ones by 1/density
    (``inverse``, unbiased; ``l1`` matches mergekit 0.1.5), then task arithmetic."""
    kept = bernoulli_drop(x, density, generator, rescale=rescale == "inverse")
    return _sparsified_task_arithmetic(
        kept, x, weight, sign=None, normalize=normalize, scale=scale, rescale=rescale
    )


@merge_method("dare_ties", paper="Yu et al. 2024, arXiv:2311.03099", per_model=("density",))
def dare_ties(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    density: PerModel = 1.0,
    sign: Literal["mass", "count"] = "mass",
    rescale: Rescale = "inverse",
    normalize: bool = False,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE drop-and-rescale, then TIES sign election and disjoint merge."""
    kept = bernoulli_drop(x, density, generator, rescale=rescale == "inverse")
    return _sparsified_task_arithmetic(
        kept, x, weight, sign=sign, normalize=normalize, scale=scale, rescale=rescale
    )


@merge_method(
    "breadcrumbs", paper="Davari & Belilovsky 2024, arXiv:2312.06795", per_model=("density", "gamma")
)
def breadcrumbs(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    density: PerModel = 1.0,
    gamma: PerModel = 0.01,
    sign: Literal["mass", "count"] | None = None,
    normalize: bool = False,
    scale: float = 1.0,
    rescale: Rescale = "none",
) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` largest-magnitude outliers and the smallest entries of each τᵢ so
    that ``density`` remains, then task arithmetic (or TIES with ``sign``)."""
    kept = trim_outliers(x, density, gamma)
    return _sparsified_task_arithmetic(
        kept, x, weight, sign=sign, normalize=normalize, scale=scale, rescale=rescale
    )


@merge_method("della", paper="Deep et al. 2024, arXiv:2406.11617", per_model=("density", "epsilon"))
def della(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    density: PerModel = 1.0,
    epsilon: PerModel = 0.15,
    sign: Literal["mass", "count"] | None = "mass",
    rescale: Rescale = "inverse",
    normalize: bool = True,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA: MagPrune drops entries with a probability that falls with their magnitude rank (keep
    probability density ± ``epsilon``), rescales kept entries by 1/p, then elects signs and merges (TIES-style;
    ``sign: null`` gives mergekit's ``della_linear``)."""
    eps = epsilon.tolist()
    if not all(d - e > 0 and d + e <= 1 or d >= 1 for d, e in zip(density.tolist(), eps)):
        raise MalformedConfigError(
            f"della: density ± epsilon must lie in (0, 1]; got density {density.tolist()}, epsilon {eps}."
        )
    kept = della_drop(x, density, epsilon, generator, rescale=rescale == "inverse")
    return _sparsified_task_arithmetic(
        kept, x, weight, sign=sign, normalize=normalize, scale=scale, rescale=rescale
    )


# ------------------------------------------------------------------------------------------- geometric family


@merge_method("slerp", paper="Shoemake 1985; mergekit", space="weights", min_models=1, max_models=2)
def slerp(
    x: torch.Tensor, weight: torch.Tensor, *, t: float = 0.5, base: torch.Tensor | None = None
) -> torch.Tensor:
    """Spherical interpolation from v₀ (the base model, or the first model) at t=0 to v₁ at t=1."""
    if base is not None and x.shape[0] == 1:
        v0, v1 = base, x[0]
    elif x.shape[0] == 2:
        v0, v1 = x[0], x[1]
    elif x.shape[0] == 1:
        return x[0].clone()
    else:
        raise MalformedConfigError("slerp takes a base and one model, or two models")
    if low_precision(v0.dtype):  # mergekit's slerp works in float32 and rounds the result once
        return slerp_pair(t, v0.float(), v1.float()).to(v0.dtype)
    return slerp_pair(t, v0, v1)


@merge_method("multislerp", paper="Shoemake 1985; mergekit's multislerp", space="weights")
def multislerp(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-8,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Barycentric SLERP of N models: the direction is the normalised weighted mean of the unit vectors, the
    length the weighted mean of the norms (around ``base`` when given, i.e. on task vectors)."""
    if x.shape[0] == 1:
        return x[0].clone()
    v = x - base if base is not None else x
    w = weight / weight.sum() if normalize else weight
    flat = v.reshape(v.shape[0], -1)
    norms = flat.norm(dim=1, keepdim=True)
    mean = (flat / (norms + eps) * w[:, None]).sum(0)
    if mean.norm() < eps:
        out = (flat * w[:, None]).sum(0)
    else:
        out = mean / mean.norm() * (norms.squeeze(1) * w).sum()
    out = out.reshape(x.shape[1:])
    return out + base if base is not None else out


@merge_method("model_stock", paper="Jang et al. 2024, arXiv:2403.19522", space="weights", base="required")
def model_stock(
    x: torch.Tensor, weight: torch.Tensor, *, filter_wise: bool = False, base: torch.Tensor | None = None
) -> torch.Tensor:
    """θ = t·mean(θᵢ) + (1 − t)·θ₀ with t = N·cosθ / (1 + (N − 1)·cosθ), cosθ the mean pairwise cosine of the
    task vectors (per row with ``filter_wise``)."""
    assert base is not None
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    shape = x.shape[1:]
    off = x - base
    rowwise = filter_wise and len(shape) >= 1
    off = off.reshape(n, -1, shape[-1]) if rowwise else off.reshape(n, 1, -1)
    unit = off / off.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    iu = torch.triu_indices(n, n, offset=1)
    cos = (unit[iu[0]] * unit[iu[1]]).sum(-1).clamp(-1, 1).mean(dim=0)  # [rows]
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denom))
    t = t.reshape(*shape[:-1], 1) if rowwise else t.reshape([1] * len(shape))
    avg = x.mean(dim=0)
    return t * avg + (1 - t) * base


# ---------------------------------------------------------------------------------------- data-aware family


@merge_method("fisher", paper="Matena & Raffel 2022, arXiv:2111.09832", space="weights", stats="fisher")
def fisher(
    x: torch.Tensor, weight: torch.Tensor, *, fisher_floor: float = 1e-6, stats: torch.Tensor | None = None
) -> torch.Tensor:
    """θ* = Σ wᵢ Fᵢ θᵢ / Σ wᵢ Fᵢ elementwise, with Fᵢ the diagonal Fisher plus ``fisher_floor`` (so entries no
    model is sensitive to get the weighted average). Tensors without statistics are averaged."""
    if stats is None:
        return linear(x, weight, normalize=True)
    f = (stats.to(x.dtype) + fisher_floor) * expand(weight, x)
    return (f * x).sum(0) / f.sum(0)


@merge_method("regmean", paper="Jin et al. 2023, arXiv:2212.09849", space="weights", stats="gram")
def regmean(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    alpha: float = 0.9,
    stats: torch.Tensor | None = None,
    layout: str = "linear",
) -> torch.Tensor:
    """Per linear layer, W* = argmin Σᵢ ‖XᵢW − XᵢWᵢ‖²: W*ᵀ = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢᵀ with G̃ = αG + (1 − α)diag(G)
    and Gᵢ = XᵢᵀXᵢ (weighted by wᵢ). Other tensors (no Gram) are averaged."""
    if stats is None or x.ndim != 3:
        return linear(x, weight, normalize=True)
    g = stats.to(torch.float64)
    diag = torch.diag_embed(torch.diagonal(g, dim1=-2, dim2=-1))
    g = (alpha * g + (1 - alpha) * diag) * expand(weight.to(torch.float64), g)
    w_in_last = x.to(torch.float64) if layout == "fan_in_fan_out" else x.to(torch.float64).transpose(1, 2)
    rhs = torch.einsum("nij,njo->io", g, w_in_last)  # Σ G̃ᵢ Wᵢᵀ  [d_in, d_out]
    sol = torch.linalg.solve(g.sum(0), rhs)
    out = sol if layout == "fan_in_fan_out" else sol.T
    return out.to(x.dtype).contiguous()


@merge_method(
    "passthrough", paper="mergekit passthrough.py", space="weights", max_models=1, per_model=("scale",)
)
def passthrough(x: torch.Tensor, weight: torch.Tensor, *, scale: PerModel = 1.0) -> torch.Tensor:
    """The one input, times its ``scale``: the method of ``slices:`` frankenmerges (layer stacking)."""
    return x[0] * scale[0] if float(scale[0]) != 1.0 else x[0].clone()


# ----------------------------------------------------------------------------------- mergekit's newer methods
# Each follows mergekit 0.1.5's source (mergekit/merge_methods/<file>.py, named per method) operation by
# operation, so the same YAML gives the same tensors; tests/compat compares them with mergekit itself.


@merge_method(
    "nearswap",
    paper="alchemonaut, NearSwap (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001); mergekit nearswap.py",
    space="weights",
    base="required",
    min_models=1,
    max_models=1,
)
def nearswap(
    x: torch.Tensor, weight: torch.Tensor, *, t: float = 1e-4, base: torch.Tensor | None = None
) -> torch.Tensor:
    """Take the model's value where it lies within ``t`` of the base, move toward it by t/|Δ| elsewhere:
    w = clamp(t / |θ₁ − θ₀|, 0, 1), θ = w·θ₁ + (1 − w)·θ₀ (mergekit requires ``t``; 1e-4 here, the reference
    model's value)."""
    assert base is not None
    b = x[0]
    w = (t / (base - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * base


@merge_method("sce", paper="Wan et al. 2024, arXiv:2408.07990 (FuseChat: SCE); mergekit sce.py")
def sce(x: torch.Tensor, weight: torch.Tensor, *, select_topk: float = 1.0) -> torch.Tensor:
    """Select, Calculate, Erase: keep the ``select_topk`` fraction of entries whose task vectors vary most across
    models (variance over models), weight each model by its mean squared task vector (normalised to sum 1),
    erase entries against the elected sign (TIES' ``mass`` election), and take the weighted mean of the rest.
    Per-model ``weight`` is not used (as in mergekit)."""
    n = x.shape[0]
    if select_topk < 1:
        if select_topk <= 0:
            x = x * 0
        else:
            var = torch.var(x, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * select_topk)
            mask = torch.zeros(var.numel(), dtype=x.dtype)
            if k > 0:
                mask[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = 1
            x = x * mask.reshape(var.shape).unsqueeze(0)
    majority = (x.sum(dim=0) >= 0).to(x.dtype) * 2 - 1
    erase = (x.sign() == majority).to(x.dtype)
    w = x.square().reshape(n, -1).mean(dim=1)
    total = float(w.sum())
    w = torch.ones_like(w) / n if abs(total) < 1e-6 else w / total
    erased = expand(w, x) * erase
    return (x * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)


@merge_method(
    "karcher",
    paper="Karcher mean on the unit sphere; mergekit karcher.py (arXiv:2603.04972)",
    space="weights",
)
def karcher(x: torch.Tensor, weight: torch.Tensor, *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the models' directions on the unit sphere, by ``max_iter`` steps of
    gradient descent (stop when the tangent norm is below ``tol``), scaled by the mean of the norms. Uniform over
    the models: per-model ``weight`` is not used (as in mergekit)."""
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    flat = x.reshape(n, -1)
    alphas = [1.0 / n] * n
    norms = [torch.linalg.vector_norm(v) for v in flat]
    units = [torch.zeros_like(v) if float(nm) == 0.0 else v / nm for v, nm in zip(flat, norms)]
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros_like(x[0])
    a_sum = sum(alphas[i] for i in valid)
    a_valid = [alphas[i] / a_sum for i in valid]
    u_valid = [units[i] for i in valid]
    mean = torch.zeros_like(u_valid[0])
    for a, u in zip(a_valid, u_valid):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = u_valid[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(a_valid, u_valid):
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(a * nm for a, nm in zip(alphas, norms))
    return (scale * mean).reshape(x.shape[1:])


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool, eps: float = 1e-8):
    """mergekit's ``nuslerp``: SLERP along ``dim`` (rows or columns) or of the flattened tensors."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@merge_method(
    "nuslerp",
    paper="Shoemake 1985; mergekit nuslerp.py",
    space="weights",
    base="optional",
    min_models=2,
    max_models=2,
)
def nuslerp(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """SLERP of two models at t = w₁/(w₀ + w₁) (0.5 when the weights sum to 0), of the flattened tensors or,
    with ``nuslerp_flatten: false``, row by row (columns with ``nuslerp_row_wise``); around ``base`` (on task
    vectors) when one is given."""
    total = float(weight.sum())
    t = 0.5 if abs(total) < 1e-6 else float(weight[1]) / total
    dim = 0 if nuslerp_row_wise else -1
    if base is not None:
        return base + _nuslerp(t, x[0] - base, x[1] - base, dim, nuslerp_flatten)
    return _nuslerp(t, x[0], x[1], dim, nuslerp_flatten)


@merge_method(
    "arcee_fusion",
    paper="Arcee Fusion (arcee.ai); mergekit arcee_fusion.py",
    space="weights",
    base="required",
    min_models=1,
    max_models=1,
)
def arcee_fusion(x: torch.Tensor, weight: torch.Tensor, *, base: torch.Tensor | None = None) -> torch.Tensor:
    """Take the model's entries whose importance |θ₁ − θ₀|·KL(softmax θ₁ ‖ softmax θ₀) (KL per row, over the
    last axis) is at least median + 1.5·IQR of all importances; keep the base elsewhere. Quantiles are exact
    (mergekit samples 1M entries with replacement from larger tensors, so there the two differ at random)."""
    assert base is not None
    b = x[0]
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = (b - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ranked = torch.sort(importance.reshape(-1)).values
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (ranked.numel() - 1)).long()
    q1, median, q3 = ranked[idx]
    mask = (importance >= median + 1.5 * (q3 - q1)).to(b.dtype)
    return base + (b - base) * mask
