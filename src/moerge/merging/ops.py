"""Small pure tensor operations the merge methods are made of. Every function works on inputs stacked on
dim 0 (``[N, *shape]``) at once, without a Python loop over the N models."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from moerge.merging.lazy import torch


def low_precision(dtype: torch.dtype) -> bool:
    """bfloat16 or float16: where the methods follow mergekit's order of rounding."""
    return dtype in (torch.bfloat16, torch.float16)


def expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-model vector ``[N]`` to broadcast against ``[N, *shape]``."""
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def trim_to_density(x: torch.Tensor, density: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Keep the ``max(1, int(density·numel))`` largest-magnitude entries of each ``x[i]`` (mergekit's
    ``magnitude``, ``mergekit/sparsify.py``).

    The threshold is found by `kth_largest` (a selection among the entries a sample brackets), not a sort.
    Exactly k entries are kept. Where entries tie with the threshold (common in bfloat16, rare in float32), that
    row is ordered by mergekit's own call, ``torch.argsort(|x|.float(), descending=True)``, so the same entries
    are kept as there. ``inplace`` zeroes the dropped entries of ``x`` itself, one model at a time, so the only
    temporaries are one model's magnitudes and mask (a TIES merge's peak memory is then the stacked input)."""
    dens = density.tolist()
    if all(d >= 1 for d in dens):
        return x
    flat = x.reshape(x.shape[0], -1)
    numel = flat.shape[1]
    if inplace:
        for i, d in enumerate(dens):
            if d >= 1:
                continue
            row = flat[i : i + 1]
            flat[i] = trim_to_density(row.reshape(1, *x.shape[1:]), density[i : i + 1]).reshape(-1)
        return x
    mag = flat.abs()
    ks = [numel if d >= 1 else (max(1, int(d * numel)) if d > 0 else 0) for d in dens]
    thr = kth_largest(mag, ks)
    mask = mag >= thr[:, None]
    k_t = torch.tensor(ks, device=x.device)
    extra = mask.sum(dim=1) - k_t
    for i in (extra > 0).nonzero().flatten().tolist():  # ties at the threshold: mergekit's order decides
        top = torch.argsort(mag[i].float(), descending=True)[: ks[i]]
        mask[i] = False
        mask[i, top] = True
    if mag.dtype == flat.dtype:  # the magnitudes are no longer needed: their buffer takes the result
        return torch.where(mask, flat, flat.new_zeros(()), out=mag).reshape(x.shape)
    return torch.where(mask, flat, 0.0).reshape(x.shape)


_SAMPLE = 65536


def kth_largest(mag: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Per row i of ``mag`` ``[N, M]`` (non-negative), its ``ks[i]``-th largest value (``inf`` for k ≤ 0, ``-1``
    for k ≥ M, so that ``mag >= result`` keeps none / all). Exact.

    Rows of at most 2²⁰ entries use one batched ``torch.kthvalue``. In longer rows a fixed random sample
    brackets the k-th largest between two sample quantiles (±4σ of the sample's rank error); one pass counts the
    entries above the bracket and collects those inside, and a selection among those few finishes the job (a
    bracket that misses, a ≪1e-4 event, falls back to ``kthvalue``). Measured: 0.84 s against ``kthvalue``'s
    1.74 s on 8 rows of 4.1M float32 entries (an 8000 × 512 embedding of 8 models)."""
    n, m = mag.shape
    out = torch.empty(n, dtype=mag.dtype, device=mag.device)
    if m <= 16 * _SAMPLE:  # small rows: one batched selection per distinct k
        for k in set(ks):
            rows = torch.tensor([i for i, ki in enumerate(ks) if ki == k], device=mag.device)
            if k >= m:
                out[rows] = -1.0
            elif k <= 0:
                out[rows] = float("inf")
            else:
                out[rows] = torch.kthvalue(mag[rows], m - k + 1, dim=1).values
        return out
    gen = torch.Generator(device="cpu").manual_seed(0)
    for i, k in enumerate(ks):
        row = mag[i]
        if k >= m:
            out[i] = -1.0
            continue
        if k <= 0:
            out[i] = float("inf")
            continue
        sample = row[torch.randint(m, (_SAMPLE,), generator=gen).to(row.device)].sort().values
        q = 1 - k / m  # the k-th largest is the q-quantile
        pos, spread = q * (_SAMPLE - 1), 4 * (_SAMPLE * q * (1 - q)) ** 0.5 + 2
        lo_i, hi_i = int(pos - spread), int(pos + spread) + 1
        lo = sample[lo_i] if lo_i >= 0 else row.new_tensor(-1.0)
        hi = sample[hi_i] if hi_i < _SAMPLE else row.new_tensor(float("inf"))
        above = int((row > hi).sum())
        cand = row[(row >= lo) & (row <= hi)]
        need = k - above
        if 1 <= need <= cand.numel():
            out[i] = torch.kthvalue(cand, cand.numel() - need + 1).values
            continue
        out[i] = torch.kthvalue(row, m - k + 1).values
    return out


def trim_outliers(x: torch.Tensor, density: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` largest magnitudes, then the smallest, keeping ``density`` (both
    per model: ``[N]``, or one ``gamma`` for all)."""
    gammas = gamma.tolist() if isinstance(gamma, torch.Tensor) else [gamma] * x.shape[0]
    flat = _flat(x)
    numel = flat.shape[1]
    order = torch.argsort(flat.abs(), dim=1)  # ascending
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(numel, device=x.device).expand_as(order))
    lo, hi = [], []
    for d, gm in zip(density.tolist(), gammas):
        if d >= 1:
            lo.append(0)
            hi.append(numel)
            continue
        target, n_top = int(d * numel), int(gm * numel)
        n_bot = numel - target - n_top
        if n_bot < 0:
            n_top, n_bot = n_top + n_bot, 0
        lo.append(n_bot)
        hi.append(numel - n_top)
    lo_t = torch.tensor(lo, device=x.device)[:, None]
    hi_t = torch.tensor(hi, device=x.device)[:, None]
    mask = (rank >= lo_t) & (rank < hi_t)
    return (flat * mask).reshape(x.shape)


def bernoulli_drop(
    x: torch.Tensor, density: torch.Tensor, generator: torch.Generator | None, rescale: bool = True
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and (optionally) rescale by ``1/density``."""
    p = expand(density.clamp(max=1.0), x).expand_as(x)
    keep = torch.bernoulli(p, generator=generator)
    out = x * keep
    if rescale:
        out = out / expand(density.clamp(min=1e-12, max=1.0), x)
    return out


def della_drop(
    x: torch.Tensor,
    density: torch.Tensor,
    epsilon: torch.Tensor | float,
    generator: torch.Generator | None,
    rescale: bool = True,
) -> torch.Tensor:
    """DELLA MagPrune: keep probability grows linearly with the magnitude rank within each row, from
    ``density − ε`` (smallest) to ``density + ε`` (largest); kept entries are rescaled by ``1/p``. ``density``
    and ``epsilon`` are per model (``[N]``; one ``epsilon`` for all is accepted)."""
    shape = x.shape
    rows = x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim > 2 else x.reshape(x.shape[0], 1, -1)
    n = rows.shape[-1]
    ranks = rows.abs().argsort(dim=-1).argsort(dim=-1).to(x.dtype)
    rank_norm = ranks / max(n - 1, 1)
    d = expand(density, rows)
    eps = expand(epsilon, rows) if isinstance(epsilon, torch.Tensor) else epsilon
    p = ((d - eps) + rank_norm * 2 * eps).clamp(0.0, 1.0)
    full = (density >= 1).to(x.device)
    if full.any():
        p[full] = 1.0
    keep = torch.bernoulli(p, generator=generator)
    out = rows * keep
    if rescale:
        out = torch.where(keep > 0, out / p.clamp(min=1e-12), out)
    return out.reshape(shape)


def disjoint_sum(
    weighted: torch.Tensor, weight: torch.Tensor, sign: str | None, normalize: bool
) -> torch.Tensor:
    """Σᵢ of the (sign-agreeing) weighted deltas, divided by Σᵢ wᵢ·maskᵢ when ``normalize`` (mergekit's
    generalised task arithmetic: TIES when ``sign`` is set, a weighted sum otherwise).

    With ``sign`` set, ``weighted`` is used as scratch (overwritten): the caller passes a tensor of its own, so
    that the stacked deltas exist once (the peak memory of a TIES merge follows its largest stacked tensor)."""
    w = weight.to(weighted.dtype)
    if sign is None:
        mixed = weighted.sum(dim=0)
        if not normalize:
            return mixed
        if low_precision(weighted.dtype):  # mergekit divides by the weights' sum in the compute dtype
            s_low = w.sum()
            return mixed / torch.where(s_low.abs() < 1e-8, 1.0, s_low).to(weighted.dtype)
        s = float(w.sum())
        return mixed / (s if abs(s) >= 1e-8 else 1.0)
    # elected sign e per entry; agreeing entries are those with wᵢτᵢ·e > 0 (non-zero and of the elected sign)
    score = weighted.sum(dim=0) if sign == "mass" else weighted.sign().sum(dim=0)
    elected = torch.where(score >= 0, 1.0, -1.0).to(weighted.dtype)
    p = weighted.mul_(elected)
    agree = p > 0
    mixed = p.clamp_(min=0).sum(dim=0).mul_(elected)
    if not normalize:
        return mixed
    if low_precision(weighted.dtype):  # mergekit's (w·mask).sum(0) in the compute dtype
        divisor = torch.tensordot(w, agree.to(weighted.dtype), dims=1)
    else:  # one model at a time: no [N, …] float copy of the mask
        divisor = torch.zeros_like(mixed)
        for i, wi in enumerate(w.tolist()):
            divisor.add_(agree[i], alpha=wi)
    return mixed / torch.where(divisor == 0, 1.0, divisor)


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    return (1 - t) * v0 + t * v1


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Spherical interpolation of two tensors treated as flat vectors; the *unnormalised* tensors are mixed.
    Falls back to ``lerp`` when they are (anti)parallel within ``dot_threshold``."""
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = (u0 * u1).sum()
    if dot.abs() > dot_threshold:
        return lerp(t, v0, v1)
    theta = torch.arccos(dot)
    s = torch.sin(theta)
    return torch.sin((1 - t) * theta) / s * v0 + torch.sin(t * theta) / s * v1
