"""The pool benchmark: query routers (pool recipes) fitted on a pool suite's routing split and scored on its eval
split — quality, cost, the quality–cost curve, APGR and the cost to recover half the gap — beside each member
alone, random routing at the same cost and the oracle per-query choice.

Definitions (RouteLLM, Ong et al. 2024, ``routellm/evals/evaluate.py``, generalised from two models to a pool):

- the reference pair: ``strong`` is the best member alone on the eval split (ties: the cheaper), ``weak`` the
  cheapest member (ties: the better) — RouteLLM's weak model is its cheap one;
- cost is relative: a policy's mean cost per query over the strong member's (for a strong/weak router with a
  much cheaper weak member this is RouteLLM's share of strong calls, reported beside it);
- the curve: the policy's (cost, quality) at each cost penalty λ of `moerge.pool.query.choose` — penalties at
  the quantiles of the points where some query's choice changes, so the curve runs from the router's most
  expensive choice to its cheapest (for a threshold router, RouteLLM's threshold sweep); points dearer than the
  strong member alone are left out (a negative penalty buys cost for nothing: the oracle would pay for the
  dearest of several right answers), so every curve lies within RouteLLM's 0–100% strong-call range;
- APGR: ``(AUC − q_weak·Δx) / ((q_strong − q_weak)·Δx)``, AUC the trapezoid area under the curve over the cost
  range Δx from the weak member's cost to the strong one's (RouteLLM's ``apgr_metric``, whose threshold sweeps
  always span 0–100% strong calls). A curve that stops short of either end (the oracle reaches the strong
  member's quality at 18% strong calls and stays there; a pool router never pays for the strong member
  everywhere) is completed by the policies randomisation reaches: a straight line from the weak member alone
  to its first point and from its last point to the strong member alone (`complete_curve`);
- cost to 50%: the least relative cost at which the curve (linearly interpolated) reaches
  ``q_weak + 0.5·(q_strong − q_weak)`` (RouteLLM's "50% qual", which reads it off ``np.interp``); none if never;
- random at the same cost: the expected quality of sending each query to the strong member with probability
  p and to the weak one otherwise, p chosen so the expected cost equals the router's (computed exactly, not
  sampled); its APGR is 0.5 by construction.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moerge.pool.query import PoolData, choose

CURVE_POINTS = 41


@dataclass
class PoolRow:
    """One line of the pool benchmark: a member alone, a baseline or a recipe."""

    name: str
    kind: str  # member / baseline / recipe
    status: str = "ok"
    reason: str = ""
    quality: float | None = None
    cost: float | None = None  # relative to the strong member
    flops_per_token: float | None = None
    seconds_per_query: float | None = None
    strong_share: float | None = None
    apgr: float | None = None
    cost_to_50: float | None = None
    random_same_cost: float | None = None
    fit_s: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    curve: list[list[float]] = field(default_factory=list)  # [relative cost, quality, strong share]


@dataclass
class PoolResults:
    suite: str
    members: list[dict[str, Any]]
    strong: str
    weak: str
    rows: list[PoolRow]
    wall_s: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = "pool"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoolResults:
        """A results.json written by `write_pool_report`."""
        fields = {k: v for k, v in d.items() if k != "kind"}
        fields["rows"] = [PoolRow(**r) for r in d["rows"]]
        return cls(**fields)


def reference_pair(data: PoolData) -> tuple[int, int]:
    """``(strong, weak)``: the best member alone (ties: cheaper) and the cheapest (ties: better)."""
    mean = data.quality.double().mean(0)
    costs = data.costs.double()
    order = sorted(range(len(costs)), key=lambda m: (-float(mean[m]), float(costs[m])))
    weak = sorted(range(len(costs)), key=lambda m: (float(costs[m]), -float(mean[m])))[0]
    return order[0], weak


def point(choice: torch.Tensor, data: PoolData, strong: int) -> tuple[float, float, float]:
    """``(relative cost, quality, strong share)`` of sending query i to member ``choice[i]``."""
    n = torch.arange(len(choice))
    q = float(data.quality.double()[n, choice].mean())
    c = float(data.costs.double()[choice].mean() / data.costs.double()[strong])
    return c, q, float((choice == strong).double().mean())


def penalties(scores: torch.Tensor, costs: torch.Tensor, n: int = CURVE_POINTS) -> list[float]:
    """Cost penalties at which to evaluate `choose`: ``n`` quantiles of the penalties where some query's choice
    between two members changes, plus one beyond each end (the router's unpenalised and cheapest choices)."""
    rel = costs.double() / costs.double().max()
    s = scores.double()
    dr = rel[:, None] - rel[None, :]  # [M, M]
    ds = s[:, :, None] - s[:, None, :]  # [N, M, M]
    with torch.no_grad():
        cross = ds / dr
    cross = cross[torch.isfinite(cross) & (dr != 0).expand_as(cross)]
    if cross.numel() == 0:
        return [0.0]
    if cross.numel() > 1_000_000:
        cross = cross[torch.randperm(cross.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    qs = torch.quantile(cross, torch.linspace(0, 1, n, dtype=torch.float64))
    lo, hi = float(cross.min()), float(cross.max())
    return sorted({lo - 1.0, *[float(v) for v in qs], hi + 1.0, 0.0})


def curve(scores: torch.Tensor, data: PoolData, strong: int) -> list[list[float]]:
    """The (relative cost, quality, strong share) points of the penalty sweep, sorted by cost."""
    pts = sorted(
        {tuple(point(choose(scores, data.costs, p), data, strong)) for p in penalties(scores, data.costs)}
    )
    kept = [list(p) for p in pts if p[0] <= 1.0 + 1e-9]  # beyond the strong member's cost: see the module doc
    return kept or [list(pts[0])]


def complete_curve(
    points: Sequence[Sequence[float]],
    x_weak: float,
    q_weak: float,
    x_strong: float = 1.0,
    q_strong: float = 1.0,
) -> list[list[float]]:
    """``points`` (sorted by cost) within ``[x_weak, x_strong]``, with the weak member alone ``(x_weak, q_weak)``
    put first and the strong one alone ``(x_strong, q_strong)`` last where the curve does not reach that far."""
    pts = [list(p[:2]) for p in points if x_weak - 1e-9 <= p[0] <= x_strong + 1e-9]
    if not pts or pts[0][0] > x_weak + 1e-9:
        pts.insert(0, [x_weak, q_weak])
    if pts[-1][0] < x_strong - 1e-9:
        pts.append([x_strong, q_strong])
    return pts


def apgr(points: Sequence[Sequence[float]], q_weak: float, q_strong: float) -> float | None:
    """RouteLLM's APGR over a curve's points ``(cost, quality, …)`` sorted by cost; None for a single point or a
    zero gap."""
    if len(points) < 2 or q_strong == q_weak:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    span = xs[-1] - xs[0]
    if span <= 0:
        return None
    auc = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
    return (auc - q_weak * span) / ((q_strong - q_weak) * span)


def cost_to_reach(
    points: Sequence[Sequence[float]], q_weak: float, q_strong: float, fraction: float = 0.5
) -> float | None:
    """The least cost at which the piecewise-linear curve reaches ``q_weak + fraction·(q_strong − q_weak)``."""
    target = q_weak + fraction * (q_strong - q_weak)
    for i, p in enumerate(points):
        if p[1] >= target:
            if i == 0:
                return p[0]
            x0, y0 = points[i - 1][0], points[i - 1][1]
            return x0 + (target - y0) * (p[0] - x0) / (p[1] - y0)
    return None


def random_quality(cost: float, data: PoolData, strong: int, weak: int) -> float:
    """Expected quality of random strong/weak routing whose expected relative cost is ``cost``."""
    c = data.costs.double()
    cw, cs = float(c[weak] / c[strong]), 1.0
    p = 0.0 if cs == cw else min(1.0, max(0.0, (cost - cw) / (cs - cw)))
    q = data.quality.double().mean(0)
    return (1 - p) * float(q[weak]) + p * float(q[strong])


def _finish(row: PoolRow, data: PoolData, strong: int, weak: int, seconds: Sequence[float] | None) -> None:
    q = data.quality.double().mean(0)
    qw, qs = float(q[weak]), float(q[strong])
    if row.curve:
        xw = float(data.costs.double()[weak] / data.costs.double()[strong])
        full = complete_curve(row.curve, xw, qw, 1.0, qs)
        row.apgr = _round(apgr(full, qw, qs))
        row.cost_to_50 = _round(cost_to_reach(full, qw, qs))
    if row.cost is not None:
        row.random_same_cost = _round(random_quality(row.cost, data, strong, weak))


def _round(v: float | None, n: int = 4) -> float | None:
    return None if v is None or not math.isfinite(v) else round(v, n)


def _choice_row(name: str, kind: str, choice: torch.Tensor, data: PoolData, strong: int,
                seconds: Sequence[float] | None) -> PoolRow:  # fmt: skip
    c, q, share = point(choice, data, strong)
    flops = float(data.costs.double()[choice].mean())
    secs = float(torch.tensor(seconds, dtype=torch.float64)[choice].mean()) if seconds else None
    return PoolRow(name, kind, quality=round(q, 4), cost=round(c, 4), flops_per_token=round(flops, 1),
                   seconds_per_query=_round(secs, 8), strong_share=round(share, 4))  # fmt: skip


def run_pool_bench(
    suite: Any, recipes: Sequence[str] | None = None, baselines: Sequence[str] | None = None,
    progress: Any = None,
) -> PoolResults:  # fmt: skip
    """Every pool recipe of ``recipes`` (``name`` or ``name:key=value,…``; default: every registered pool recipe
    and its variants) fitted on ``suite.routing`` and scored on ``suite.eval``; baselines ``members`` (each
    alone), ``random`` and ``oracle`` (default: all three). Recipes of other kinds are reported not_applicable."""
    from moerge.bench.config import parse_method
    from moerge.errors import MoergeError, RecipeNotApplicableError
    from moerge.recipes.registry import get_recipe, list_recipes

    t0 = time.perf_counter()
    data, train = suite.eval, suite.routing
    strong, weak = reference_pair(data)
    seconds = [m.get("seconds_per_query") for m in suite.members]
    secs = seconds if all(s is not None for s in seconds) else None
    names = list(data.members)
    rows: list[PoolRow] = []
    wanted = list(baselines) if baselines is not None else ["members", "random", "oracle"]
    if "members" in wanted:
        for m in range(len(names)):
            row = _choice_row(names[m], "member", torch.full((len(data.texts),), m), data, strong, secs)
            row.info = {"description": (data.descriptions or [""] * len(names))[m]}
            rows.append(row)
    if "oracle" in wanted:
        row = _choice_row("oracle", "baseline", choose(data.quality, data.costs), data, strong, secs)
        row.curve = curve(data.quality.double(), data, strong)
        row.info = {
            "description": "the best member per query (ties: the cheaper), penalised by cost along the curve"
        }
        rows.append(row)
    if "random" in wanted:
        c = data.costs.double()
        cw = float(c[weak] / c[strong])
        qv = data.quality.double().mean(0)
        pts = [
            [cw + p * (1 - cw), (1 - p) * float(qv[weak]) + p * float(qv[strong]), p] for p in (0.0, 0.5, 1.0)
        ]
        rows.append(PoolRow("random", "baseline", quality=round(pts[1][1], 4), cost=round(pts[1][0], 4),
                            strong_share=0.5, curve=pts,
                            info={"description": f"{names[strong]} or {names[weak]} at random (expected values)"}))  # fmt: skip
    for b in wanted:
        if b not in ("members", "random", "oracle"):
            rows.append(PoolRow(b, "baseline", status="not_applicable",
                                reason="the pool suite's baselines are members, random and oracle"))  # fmt: skip
    specs: list[tuple[str, str, dict[str, Any]]] = []
    if recipes is None:
        for r in list_recipes():
            if r.kind == "pool":
                specs.append((r.name, r.key, {}))
                for v in r.variants():
                    specs.append((r.name + ":" + ",".join(f"{k}={x}" for k, x in v.items()), r.key, dict(v)))
    else:
        for text in recipes:
            spec = parse_method(text)
            specs.append((spec.label, spec.recipe, dict(spec.options)))
    for label, key, options in specs:
        rec = get_recipe(key)
        if rec.kind != "pool":
            rows.append(PoolRow(label, "recipe", status="not_applicable",
                                reason=f"recipe {rec.name!r} routes experts inside one model ({rec.kind}); the pool suite "
                                       "routes each query to one whole model (pool recipes)"))  # fmt: skip
            continue
        if progress is not None:
            progress(f"fitting {label} on {len(train.texts)} routing queries")
        opts = rec.parse_options(options)
        try:
            t = time.perf_counter()
            router = rec.query_router(opts).fit(train)  # type: ignore[misc]
            fit_s = time.perf_counter() - t
            scores = router.scores(data.features, data.texts)
        except (RecipeNotApplicableError, MoergeError) as e:
            status = "not_applicable" if isinstance(e, RecipeNotApplicableError) else "error"
            rows.append(PoolRow(label, "recipe", status=status, reason=f"{type(e).__name__}: {e}"))
            continue
        row = _choice_row(label, "recipe", choose(scores, data.costs), data, strong, secs)
        row.fit_s = round(fit_s, 3)
        row.curve = curve(scores, data, strong)
        row.info = {**router.info, "taxonomy": rec.taxonomy_for(opts), "options": opts.model_dump()}
        rows.append(row)
    for row in rows:
        if row.status == "ok":
            _finish(row, data, strong, weak, secs)
    return PoolResults(suite.name, list(suite.members), names[strong], names[weak], rows,
                       wall_s=round(time.perf_counter() - t0, 2))  # fmt: skip


# ---------------------------------------------------------------------------------------------- report
def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def pool_table(results: PoolResults) -> Any:
    """The results as a `moerge.tables.Table`."""
    from moerge.tables import Column, Table

    t = Table(
        f"pool suite {results.suite} (eval split; strong = {results.strong}, weak = {results.weak})",
        [Column("method"), Column("kind", drop=3), Column("quality", short="q", right=True),
         Column("rel. cost", short="cost", right=True), Column("strong calls", short="strong", right=True, drop=2),
         Column("APGR", right=True), Column("cost to 50% gap", short="c50", right=True),
         Column("random at same cost", short="rand", right=True), Column("notes", drop=1)],
    )  # fmt: skip
    for r in results.rows:
        if r.status != "ok":
            t.add_row(r.name, r.kind, "n/a", "", "", "", "", "", f"{r.status}: {r.reason}")
            continue
        note = ", ".join(f"{k}={v}" for k, v in r.info.items() if k in ("strong", "weak", "threshold"))
        t.add_row(r.name, r.kind, _fmt(r.quality), _fmt(r.cost), _fmt(r.strong_share, pct=True), _fmt(r.apgr),
                  _fmt(r.cost_to_50), _fmt(r.random_same_cost), note)  # fmt: skip
    return t


def plot_curves(results: PoolResults, path: Path) -> Path:
    """The quality–cost curves (recipes, oracle, random) and each member alone as a point, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [r for r in results.rows if r.status == "ok" and r.cost is not None and r.quality is not None]
    by_name = {r.name: r for r in ok}
    weak, strong = by_name.get(results.weak), by_name.get(results.strong)
    # the weak-to-strong range, where the routers' curves lie; members outside it are listed under the plot
    xs_all = [p[0] for r in ok for p in r.curve] + ([weak.cost] if weak and weak.cost is not None else [])
    ys_all = [p[1] for r in ok for p in r.curve] + [
        r.quality for r in (weak, strong) if r and r.quality is not None
    ]
    x0, y0, y1 = min(xs_all or [0.0]), min(ys_all or [0.0]), max(ys_all or [1.0])
    pad_x, pad_y = 0.05 * max(1.0 - x0, 0.1), 0.05 * max(y1 - y0, 0.02)
    outside = []
    for r in ok:
        cost, quality = float(r.cost or 0.0), float(r.quality or 0.0)
        if r.kind == "member":
            if x0 - pad_x <= cost <= 1.0 + pad_x and y0 - pad_y <= quality <= y1 + pad_y:
                ax.scatter([cost], [quality], marker="o", s=18, color="grey")
                ax.annotate(r.name, (cost, quality), fontsize=6, xytext=(3, 2), textcoords="offset points")
            else:
                outside.append(f"{r.name} ({cost:.2f}, {quality:.3f})")
        elif r.curve:
            xs, ys = [p[0] for p in r.curve], [p[1] for p in r.curve]
            style = "--" if r.kind == "baseline" else "-"
            ax.plot(xs, ys, style, marker="." if r.kind == "recipe" else None, label=r.name, linewidth=1.2)
    ax.set_xlim(x0 - pad_x, 1.0 + pad_x)
    ax.set_ylim(y0 - pad_y, y1 + pad_y)
    if outside:
        shown = ", ".join(outside[:6]) + (f" and {len(outside) - 6} more" if len(outside) > 6 else "")
        fig.text(
            0.01, -0.03, f"members outside the axes (relative cost, quality): {shown}", fontsize=6, wrap=True
        )
    ax.set_xlabel(f"relative cost (mean cost per query / {results.strong}'s)")
    ax.set_ylabel("quality (exact match, eval split)")
    ax.set_title(f"quality–cost curves on {results.suite}")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_pool_report(results: PoolResults, out: str | Path, plots: bool = True) -> Path:
    """``results.json``, ``pool_curve.png`` and ``report.md`` (the table and the plot) in ``out``."""
    from moerge.tables import to_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "results.json", json.dumps(results.to_dict(), indent=2))
    lines = [f"# moerge bench: pool suite {results.suite}", "", to_markdown(pool_table(results)), ""]
    if plots:
        plot_curves(results, out / "pool_curve.png")
        lines += ["![quality–cost curves](pool_curve.png)", ""]
    lines += [
        f"Members: {', '.join(m['name'] for m in results.members)}. "
        + __doc__.split("Definitions")[0].strip()
    ]
    _write(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
