"""Each merge method against a dense reference written out here, plus the survey's invariants (§4.1)."""

from __future__ import annotations

import math

import pytest
import torch

from moerge.errors import MalformedConfigError
from moerge.merging.registry import available_methods, get_method, merge_tensor, validate_params


def run(name, x, base=None, weights=None, seed=0, stats=None, layout="linear", **params):
    spec = get_method(name)
    n = x.shape[0]
    per = [{"weight": 1.0 if weights is None else weights[i]} for i in range(n)]
    g, pm = validate_params(spec, params, per)
    return merge_tensor(
        spec, x, base=base, global_params=g, per_model=pm, name="t", seed=seed, stats=stats, layout=layout
    )


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ dense references


def ref_trim(v: torch.Tensor, density: float) -> torch.Tensor:
    flat = v.flatten().tolist()
    k = int(density * len(flat))
    keep = sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[:k]
    out = [0.0] * len(flat)
    for i in keep:
        out[i] = flat[i]
    return torch.tensor(out).reshape(v.shape)


def ref_ties(base, models, weights, density, sign="mass"):
    taus = [ref_trim(m - base, density) for m in models]
    out = torch.zeros_like(base).flatten()
    for p in range(out.numel()):
        vals = [w * t.flatten()[p].item() for t, w in zip(taus, weights)]
        if sign == "mass":
            s = 1.0 if sum(vals) >= 0 else -1.0
        else:
            s = 1.0 if sum(math.copysign(1, v) if v != 0 else 0 for v in vals) >= 0 else -1.0
        num = sum(v for v in vals if v != 0 and math.copysign(1, v) == s)
        den = sum(w for v, w in zip(vals, weights) if v != 0 and math.copysign(1, v) == s)
        out[p] = num / den if den != 0 else num
    return base + out.reshape(base.shape)


def ref_slerp(t, v0, v1):
    a, b = v0.flatten().double(), v1.flatten().double()
    cos = float(a @ b / (a.norm() * b.norm()))
    om = math.acos(cos)
    return ((math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)).reshape(v0.shape).float()


# ------------------------------------------------------------------------------------------------- the tests


def test_registry_lists_the_survey_methods():
    names = set(available_methods())
    assert {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "della",
        "slerp",
        "multislerp",
        "model_stock",
        "fisher",
        "regmean",
    } <= names


def test_unknown_method_and_parameter_give_one_clear_error():
    with pytest.raises(MalformedConfigError, match="valid methods: .*ties"):
        get_method("tis")
    with pytest.raises(MalformedConfigError, match="no parameter 'densty'.*density"):
        validate_params(get_method("ties"), {"densty": 0.5}, [{}, {}])
    with pytest.raises(MalformedConfigError, match="can only be set globally"):
        validate_params(get_method("ties"), {}, [{"normalize": True}, {}])
    with pytest.raises(MalformedConfigError, match="sign"):
        validate_params(get_method("ties"), {"sign": "votes"}, [{}, {}])
    with pytest.raises(MalformedConfigError, match="at most 2"):
        validate_params(get_method("slerp"), {}, [{}, {}, {}])


@pytest.mark.parametrize(
    "name",
    [
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "della",
        "multislerp",
        "model_stock",
        "fisher",
        "regmean",
        "slerp",
    ],
)
def test_one_model_in_gives_that_model_out(name):
    base, m = rand(6, 5, seed=1), rand(6, 5, seed=2)
    stats = {"fisher": rand(1, 6, 5, seed=3).abs(), "gram": None}.get(get_method(name).stats or "")
    if name == "regmean":
        x = rand(20, 5, seed=4)
        stats = (x.T @ x)[None]
    out = run(name, m[None], base=base, stats=stats)
    if name == "slerp":  # with a base, slerp runs from the base (t=0.5); alone it returns the model
        out = run(name, m[None])
    torch.testing.assert_close(out, m, rtol=1e-5, atol=1e-5)


def test_linear_and_task_arithmetic_match_formulas():
    base, x, w = rand(4, 3), rand(3, 4, 3, seed=5), [0.2, 0.5, 1.3]
    expected = sum(wi * xi for wi, xi in zip(w, x)) / sum(w)
    torch.testing.assert_close(run("linear", x, weights=w), expected)
    expected_ta = base + 0.7 * sum(wi * (xi - base) for wi, xi in zip(w, x))
    torch.testing.assert_close(run("task_arithmetic", x, base=base, weights=w, scale=0.7), expected_ta)


@pytest.mark.parametrize("sign", ["mass", "count"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.3, 1.0, 0.6]])
def test_ties_matches_dense_reference(sign, weights):
    base, x = rand(5, 4, seed=7), rand(3, 5, 4, seed=8)
    out = run("ties", x, base=base, weights=weights, density=0.5, sign=sign)
    torch.testing.assert_close(out, ref_ties(base, list(x), weights, 0.5, sign), rtol=1e-5, atol=1e-6)


def test_ties_drops_the_minority_sign():
    base = torch.zeros(3)
    x = torch.tensor([[1.0, -2.0, 0.5], [2.0, 1.0, -3.0], [-0.5, 3.0, -1.0]])
    out = run("ties", x, base=base, density=1.0)
    # entry 0: +1 +2 -0.5 → plus wins, mean of (1, 2); entry 1: -2+1+3 → plus, mean(1,3); entry 2: minus, mean(-3,-1)
    torch.testing.assert_close(out, torch.tensor([1.5, 2.0, -2.0]))


def test_dare_is_unbiased_in_expectation():
    """Mean of M independent DARE draws: each entry's z-score (mean − δ)/σ with σ² = δ²(1−p)/(p·M) is ~N(0,1)."""
    delta = rand(400, seed=9)
    p, m = 0.3, 200
    draws = torch.stack(
        [run("dare_linear", delta[None], base=torch.zeros(400), seed=s, density=p) for s in range(m)]
    )
    sigma = delta.abs() * math.sqrt((1 - p) / (p * m))
    z = (draws.mean(0) - delta) / sigma
    k = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(k)  # mean of k standard normals
    assert abs((z**2).mean().item() - 1) < 4 * math.sqrt(2 / k)  # variance matches the derived σ²
    kept = (draws != 0).float().mean().item()
    assert abs(kept - p) < 4 * math.sqrt(p * (1 - p) / draws.numel())


def test_dare_is_seeded_and_keeps_density():
    d = rand(50, 40, seed=10)
    a = run("dare_linear", d[None], base=torch.zeros(50, 40), density=0.2, seed=3)
    b = run("dare_linear", d[None], base=torch.zeros(50, 40), density=0.2, seed=3)
    c = run("dare_linear", d[None], base=torch.zeros(50, 40), density=0.2, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = a != 0
    torch.testing.assert_close(a[kept], d[kept] / 0.2)


def test_dare_ties_matches_ties_on_the_same_mask():
    base, x = torch.zeros(30), rand(3, 30, seed=11)
    out = run("dare_ties", x, base=base, density=0.5, seed=1, normalize=True)
    # recover the kept entries from dare_linear on each model alone (same per-tensor seed → same mask)
    spec = get_method("dare_linear")
    g = torch.Generator().manual_seed(
        __import__("moerge.merging.registry", fromlist=["x"]).tensor_seed(1, "t")
    )
    kept = torch.bernoulli(torch.full_like(x, 0.5), generator=g) * x / 0.5
    assert spec is not None
    torch.testing.assert_close(out, ref_ties(base, list(kept), [1.0] * 3, 1.0), rtol=1e-5, atol=1e-6)


def test_breadcrumbs_drops_outliers_and_small_entries():
    x = torch.arange(1.0, 101.0)[None] * torch.tensor([1.0, -1.0]).repeat(50)[None]
    out = run("breadcrumbs", x, base=torch.zeros(100), density=0.5, gamma=0.1)
    mags = x.abs().flatten()
    keep = (mags > 40) & (mags <= 90)  # drop the 10 largest and the 40 smallest
    torch.testing.assert_close(out, torch.where(keep, x[0], torch.zeros(100)))


def test_della_keeps_large_entries_more_often_and_is_unbiased():
    d = torch.linspace(0.1, 10, 100)
    draws = torch.stack(
        [run("della", d[None], base=torch.zeros(100), density=0.5, epsilon=0.4, seed=s) for s in range(300)]
    )
    keep_rate = (draws != 0).float().mean(0)
    assert keep_rate[:20].mean() < 0.25 and keep_rate[-20:].mean() > 0.75  # p from 0.1 to 0.9 with rank
    p = 0.1 + 0.8 * torch.arange(100) / 99
    sigma = d * torch.sqrt((1 - p) / (p * 300))
    z = (draws.mean(0) - d) / sigma
    assert abs(z.mean().item()) < 4 / math.sqrt(100)


@pytest.mark.parametrize("t", [0.0, 1.0, 0.3])
def test_slerp_ends_and_middle(t):
    v0, v1 = rand(6, 4, seed=12), rand(6, 4, seed=13)
    out = run("slerp", torch.stack([v0, v1]), t=t)
    expected = {0.0: v0, 1.0: v1}.get(t, ref_slerp(t, v0, v1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # mergekit form: base is v0, the single model v1
    torch.testing.assert_close(run("slerp", v1[None], base=v0, t=t), expected, rtol=1e-5, atol=1e-6)


def test_slerp_parallel_falls_back_to_lerp():
    v = rand(10, seed=14)
    torch.testing.assert_close(run("slerp", torch.stack([v, 2 * v]), t=0.25), 1.25 * v)


def test_multislerp_two_models_equal_weights_is_slerp_midpoint_direction():
    v0, v1 = rand(20, seed=15), rand(20, seed=16)
    v1 = v1 / v1.norm() * v0.norm()  # equal norms: the barycentre is the slerp midpoint
    torch.testing.assert_close(
        run("multislerp", torch.stack([v0, v1])), ref_slerp(0.5, v0, v1), rtol=1e-4, atol=1e-5
    )


def test_model_stock_matches_formula():
    base, x = rand(8, 6, seed=17), rand(3, 8, 6, seed=18)
    offs = [(xi - base).flatten() for xi in x]
    cos = (
        sum(
            float(offs[i] @ offs[j] / (offs[i].norm() * offs[j].norm()))
            for i in range(3)
            for j in range(i + 1, 3)
        )
        / 3
    )
    t = 3 * cos / (1 + 2 * cos)
    torch.testing.assert_close(
        run("model_stock", x, base=base), t * x.mean(0) + (1 - t) * base, rtol=1e-5, atol=1e-5
    )
    # filter-wise: one t per row
    out = run("model_stock", x, base=base, filter_wise=True)
    for r in range(8):
        o = [(xi[r] - base[r]) for xi in x]
        c = (
            sum(float(o[i] @ o[j] / (o[i].norm() * o[j].norm())) for i in range(3) for j in range(i + 1, 3))
            / 3
        )
        tr = 3 * c / (1 + 2 * c)
        torch.testing.assert_close(out[r], tr * x[:, r].mean(0) + (1 - tr) * base[r], rtol=1e-5, atol=1e-5)


def test_fisher_equal_fishers_give_the_average_and_weights_follow_fisher():
    x = rand(3, 5, 4, seed=19)
    f = rand(1, 5, 4, seed=20).abs().expand(3, 5, 4)
    torch.testing.assert_close(run("fisher", x, stats=f), x.mean(0), rtol=1e-5, atol=1e-6)
    f2 = rand(3, 5, 4, seed=21).abs() + 0.1
    expected = (f2 * x).sum(0) / f2.sum(0)
    torch.testing.assert_close(run("fisher", x, stats=f2, fisher_floor=0.0), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["linear", "fan_in_fan_out"])
def test_regmean_identical_grams_give_the_average_and_match_least_squares(layout):
    d_out, d_in = 6, 5
    w = rand(3, d_out, d_in, seed=22)
    xin = rand(40, d_in, seed=23)
    same = (xin.T @ xin)[None].expand(3, d_in, d_in)
    wl = w if layout == "linear" else w.transpose(1, 2)
    torch.testing.assert_close(
        run("regmean", wl, stats=same, alpha=1.0, layout=layout), wl.mean(0), rtol=1e-4, atol=1e-5
    )
    # different inputs: the closed form minimises Σ‖XᵢW − XᵢWᵢ‖² — compare with lstsq on the stacked system
    xs = [rand(30, d_in, seed=30 + i) for i in range(3)]
    grams = torch.stack([xi.T @ xi for xi in xs])
    out = run("regmean", wl, stats=grams, alpha=1.0, layout=layout)
    X = torch.cat(xs).double()
    Y = torch.cat([xi.double() @ w[i].double().T for i, xi in enumerate(xs)])
    sol = torch.linalg.lstsq(X, Y).solution.T.float()  # [d_out, d_in]
    torch.testing.assert_close(out, sol if layout == "linear" else sol.T, rtol=1e-4, atol=1e-4)


def test_ties_trim_keeps_exactly_k_with_ties_at_the_threshold():
    x = torch.tensor([[0.5, -1.0, 1.0, 0.2, 1.0, -1.0, 3.0, 0.1]])  # top 3: 3.0 then two of the four ±1.0
    out = run("ties", x, base=torch.zeros(8), density=0.375)
    torch.testing.assert_close(out, ref_trim(x[0], 0.375))
    assert int((out != 0).sum()) == 3 and out[1] == -1.0 and out[2] == 1.0 and out[4] == 0


@pytest.mark.parametrize("density", [0.3, 0.001, 0.9999])
def test_kth_largest_equals_kthvalue_on_long_rows_with_ties(density):
    """The sampled bracket path (rows longer than 2²⁰) against torch's own selection, ties included."""
    from moerge.merging.ops import kth_largest

    m = rand(3, 1_100_000, seed=4).abs()
    m[:, :5000] = float(m[0].median())  # a block of ties near the middle
    ks = [int(density * m.shape[1]), 1, m.shape[1] // 2]
    want = torch.stack([torch.kthvalue(m[i], m.shape[1] - k + 1).values for i, k in enumerate(ks)])
    assert torch.equal(kth_largest(m, ks), want)


# ------------------------------------------------------------------------ mergekit's newer methods (dense refs)


def test_nearswap_moves_toward_the_model_by_t_over_the_distance():
    base, m = rand(6, 5, seed=1), rand(6, 5, seed=2)
    got = run("nearswap", m[None], base=base, t=0.3)
    want = torch.empty_like(base)
    for i in range(base.numel()):
        a, b = base.flatten()[i].item(), m.flatten()[i].item()
        w = min(1.0, max(0.0, 0.3 / max(abs(a - b), 1e-6)))
        want.view(-1)[i] = w * b + (1 - w) * a
    torch.testing.assert_close(got, want)


def test_nuslerp_flattened_is_slerp_at_the_weight_ratio():
    v0, v1 = rand(8, 4, seed=3), rand(8, 4, seed=4)
    got = run("nuslerp", torch.stack([v0, v1]), weights=[1.0, 3.0])
    torch.testing.assert_close(got, ref_slerp(0.75, v0, v1), rtol=1e-5, atol=1e-6)


def test_nuslerp_rows_slerps_each_row():
    v0, v1 = rand(5, 6, seed=5), rand(5, 6, seed=6)
    got = run("nuslerp", torch.stack([v0, v1]), weights=[1.0, 1.0], nuslerp_flatten=False)
    want = torch.stack([ref_slerp(0.5, v0[r], v1[r]) for r in range(5)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_karcher_of_two_models_is_the_geodesic_midpoint_times_the_mean_norm():
    a, b = rand(7, 3, seed=7), 2 * rand(7, 3, seed=8)
    got = run("karcher", torch.stack([a, b]))
    ua, ub = a / a.norm(), b / b.norm()
    mid = (ua + ub) / (ua + ub).norm()
    torch.testing.assert_close(got, (a.norm() + b.norm()) / 2 * mid, rtol=1e-4, atol=1e-5)


def test_sce_weights_models_by_mean_squared_task_vector_and_erases_minority_signs():
    base, x = rand(4, 5, seed=9), rand(3, 4, 5, seed=10)
    got = run("sce", base + x, base=base) - base
    w = [float((t**2).mean()) for t in x]
    w = [wi / sum(w) for wi in w]
    want = torch.zeros(4, 5)
    for p in range(20):
        vals = [float(t.flatten()[p]) for t in x]
        s = 1.0 if sum(vals) >= 0 else -1.0
        keep = [i for i, v in enumerate(vals) if v != 0 and math.copysign(1, v) == s]
        den = max(sum(w[i] for i in keep), 1e-6)
        want.view(-1)[p] = sum(w[i] * vals[i] for i in keep) / den
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_arcee_fusion_keeps_entries_above_median_plus_one_and_a_half_iqr():
    base, m = rand(6, 10, seed=11), rand(6, 10, seed=12)
    got = run("arcee_fusion", m[None], base=base)
    p, q = torch.softmax(m, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    kl = [float(sum(p[r, c] * math.log(p[r, c] / q[r, c]) for c in range(10))) for r in range(6)]
    imp = [[abs(float(m[r, c] - base[r, c])) * kl[r] for c in range(10)] for r in range(6)]
    flat = sorted(v for row in imp for v in row)
    q1, med, q3 = (flat[int(f * (len(flat) - 1))] for f in (0.25, 0.5, 0.75))
    keep = torch.tensor([[v >= med + 1.5 * (q3 - q1) for v in row] for row in imp])
    assert 0 < int(keep.sum()) < 60
    torch.testing.assert_close(got, torch.where(keep, m, base))
