"""What changed between two benchmark runs (``moerge bench compare RUN1 RUN2``): per method and split/condition,
the score before and after (mean normalised quality, or the raw mean per metric where normalisation is
undefined) and the mean routing accuracy; the methods only one run has; the configuration's differences.

    from moerge.bench.compare import compare_runs
    diff = compare_runs(load_results("a/results.json"), load_results("b/results.json"))
    diff["rows"]       # [{"method", "where", "measure", "before", "after", "delta", "route_before", ...}]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moerge.bench.results import BenchResults
from moerge.errors import DataFormatError, InputNotFoundError

CHANGED = 0.005  # a difference that shows at two decimals


def find_results(path: str | Path) -> Path:
    """``results.json`` itself, or the one in a run folder; a seeds folder is refused with the fix."""
    p = Path(path)
    if p.is_dir():
        if (p / "results.json").is_file():
            return p / "results.json"
        if (p / "seeds.json").is_file():
            raise DataFormatError(f"{p} holds several seeds' runs; compare one seed's folder ({p}/seed-0, …)")
        raise DataFormatError(
            f"{p} holds no results.json; give a `moerge bench` output folder or a results.json"
        )
    if not p.is_file():
        raise InputNotFoundError(
            f"{p}: no such file or folder; give a `moerge bench` output folder or a results.json"
        )
    return p


def load_run(path: str | Path) -> BenchResults:
    """The results of a run folder (or a results.json); a file that is not one is refused naming it."""
    from pydantic import ValidationError

    p = find_results(path)
    try:
        return BenchResults.model_validate_json(p.read_text())
    except ValidationError as e:
        err = e.errors()[0]
        raise DataFormatError(
            f"{p}: not a moerge bench results file ({'.'.join(map(str, err['loc']))}: {err['msg']})"
        ) from None


def _route_acc(res: BenchResults, method: str, split: str, cond: str) -> float | None:
    accs = [r.routing_accuracy for r in res.results
            if r.method == method and r.split == split and r.condition == cond and r.routing_accuracy is not None]  # fmt: skip
    return sum(accs) / len(accs) if accs else None


def _measures(cell: dict[str, Any] | None) -> dict[str, float | None] | None:
    """``{measure: value}`` of a split/condition cell: ``norm``, or the raw mean per metric; None: not run."""
    if cell is None:
        return None
    if cell["status"] != "ok":
        return {cell["status"]: None}
    if cell["normalized"]:
        return {"norm": cell["value"]}
    return dict(cell["value"])


def _flatten(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        out: dict[str, Any] = {}
        for k, v in x.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(x, list) and any(isinstance(v, (dict, list)) for v in x):
        out = {}
        for i, v in enumerate(x):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: x}


def config_differences(a: BenchResults, b: BenchResults) -> list[dict[str, Any]]:
    """``[{"key", "before", "after"}]``: the suite, its hash, the experts and every configuration field that
    differs (nested fields as dotted keys; ``progress`` left out)."""
    before = {"suite": a.suite, "suite_hash": a.environment.get("suite_hash"), "experts": a.experts,
              **{f"config.{k}": v for k, v in _flatten(a.config).items()}}  # fmt: skip
    after = {"suite": b.suite, "suite_hash": b.environment.get("suite_hash"), "experts": b.experts,
             **{f"config.{k}": v for k, v in _flatten(b.config).items()}}  # fmt: skip
    out = []
    for key in dict.fromkeys([*before, *after]):
        if key == "config.progress":
            continue
        x, y = before.get(key), after.get(key)
        if x != y:
            out.append({"key": key, "before": x, "after": y})
    return out


def compare_runs(a: BenchResults, b: BenchResults) -> dict[str, Any]:
    """The differences of run ``b`` from run ``a`` (see the module doc). Each row's ``changed`` says whether its
    score, routing accuracy or status differs by at least `CHANGED`."""
    from moerge.bench.report import METRIC_SHORT, group_title

    names_a = [m.name for m in a.methods if m.kind != "single"]
    names_b = [m.name for m in b.methods if m.kind != "single"]
    both = [n for n in names_a if n in names_b]
    groups = list(dict.fromkeys([*a.groups(), *b.groups()]))
    rows = []
    for name in both:
        for split, cond in groups:
            ma = _measures(a.group_score(name, split, cond))
            mb = _measures(b.group_score(name, split, cond))
            if ma is None and mb is None:
                continue
            ra, rb = _route_acc(a, name, split, cond), _route_acc(b, name, split, cond)
            for measure in dict.fromkeys([*(ma or {}), *(mb or {})]):
                x = None if ma is None else ma.get(measure)
                y = None if mb is None else mb.get(measure)
                delta = y - x if x is not None and y is not None else None
                changed = (
                    (x is None) != (y is None)
                    or (delta is not None and abs(delta) >= CHANGED)
                    or (ra is None) != (rb is None)
                    or (ra is not None and rb is not None and abs(rb - ra) >= CHANGED)
                    or (ma or {}).keys() != (mb or {}).keys()
                )
                rows.append({
                    "method": name, "split": split, "condition": cond, "where": group_title(f"{split}/{cond}"),
                    "measure": METRIC_SHORT.get(measure, measure), "before": x, "after": y, "delta": delta,
                    "route_before": ra, "route_after": rb, "changed": changed,
                })  # fmt: skip
    return {
        "before": {
            "suite": a.suite,
            "command": a.environment.get("command"),
            "started": a.environment.get("started"),
        },
        "after": {
            "suite": b.suite,
            "command": b.environment.get("command"),
            "started": b.environment.get("started"),
        },
        "rows": rows,
        "only_before": [n for n in names_a if n not in names_b],
        "only_after": [n for n in names_b if n not in names_a],
        "config": config_differences(a, b),
    }


def _num(v: float | None, signed: bool = False) -> str:
    return "—" if v is None else (f"{v:+.2f}" if signed else f"{v:.2f}")


def compare_table(diff: dict[str, Any], everything: bool = False) -> tuple[list[str], list[list[str]]]:
    """The rows as text: method, where (with the measure when raw), before, after, Δ, routing accuracy
    before → after. Only changed rows unless ``everything``."""
    header = ["method", "where", "before", "after", "Δ", "route acc"]
    out = []
    for r in diff["rows"]:
        if not (everything or r["changed"]):
            continue
        where = r["where"] + ("" if r["measure"] == "norm" else f" {r['measure']}")
        route = (
            "—"
            if r["route_before"] is None and r["route_after"] is None
            else f"{_num(r['route_before'])}→{_num(r['route_after'])}"
        )
        out.append([r["method"], where, _num(r["before"]), _num(r["after"]), _num(r["delta"], True), route])
    return header, out


def compare_lines(diff: dict[str, Any], everything: bool = False) -> list[str]:
    """What the table does not show: hidden unchanged rows, methods of one run only, configuration changes."""
    lines = []
    hidden = sum(1 for r in diff["rows"] if not r["changed"])
    if hidden and not everything:
        lines.append(f"{hidden} unchanged rows not shown (--all shows them).")
    if diff["only_before"]:
        lines.append(f"only in the first run: {', '.join(diff['only_before'])}")
    if diff["only_after"]:
        lines.append(f"only in the second run: {', '.join(diff['only_after'])}")
    if diff["config"]:
        lines.append("configuration differences:")
        lines += [f"  {c['key']}: {_short(c['before'])} → {_short(c['after'])}" for c in diff["config"]]
    else:
        lines.append("same suite and configuration.")
    return lines


def _short(v: Any, width: int = 60) -> str:
    text = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
    return text if len(text) <= width else text[: width - 1] + "…"
