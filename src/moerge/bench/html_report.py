"""The benchmark's report as one self-contained HTML file (``report.html``, beside ``report.md``): a sortable
summary table, the per-task table, quality against cost and quality per task as inline SVG with hover labels,
routing heatmaps (task × expert, and layer × expert per task), the premise and literature tables, and the run's
metadata. Nothing is fetched: the CSS, the script and the data are inline.

    from moerge.bench.html_report import write_html
    write_html(results, "bench-out/report.html")

The script sorts a table when its header is clicked (again: the other way), and on load when the address ends
in ``#sort=KEY`` (``#sort=-KEY`` descending) or ``#click=KEY,KEY`` (header clicks, in order); ``&table=ID``
picks another table than ``summary``. A sorted table records ``data-sorted-by`` / ``data-sort-dir`` so a
headless browser can check it.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from moerge.bench.results import BenchResults

# (key, header, what): the summary table's columns after the method, kind and split/condition groups
SUMMARY_COLUMNS = [
    ("routing_acc/held_in", "route acc in", "mean routing weight on the ground-truth experts, held-in tasks"),
    (
        "routing_acc/held_out",
        "route acc out",
        "mean routing weight on the ground-truth experts, held-out tasks",
    ),
    ("routing_entropy", "route H", "mean entropy of the routing weights (nats)"),
    ("expert_flops_per_token", "expert FLOPs/tok", "expert FLOPs per token beyond the base model"),
    (
        "router_train_s",
        "train s",
        "router training (or weight search) seconds per build; 0 for zero-shot routers",
    ),
    ("trainable_parameters", "train params", "parameters the router (or the baseline's LoRA) trains"),
    ("eval_s", "eval s", "evaluation wall time (s)"),
    ("peak_memory_mb", "peak MiB", "peak memory added while the method ran"),
    ("held_out_rank", "held-out rank", "routed recipes ranked by mean normalised held-out quality"),
]
VIRIDIS = ["#440154", "#472c7a", "#3b518b", "#2c718e", "#21908d", "#27ad81", "#5cc863", "#aadc32", "#fde725"]
RDYLGN = ["#a50026", "#d73027", "#f46d43", "#fdae61", "#fee08b", "#d9ef8b", "#a6d96a", "#66bd63", "#1a9850"]


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def ramp(stops: list[str], t: float) -> str:
    """The colour at ``t`` ∈ [0, 1] of a piecewise-linear ramp through ``stops``."""
    t = min(1.0, max(0.0, t)) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    a, b = stops[i], stops[i + 1]
    f = t - i
    rgb = [round(int(a[k : k + 2], 16) * (1 - f) + int(b[k : k + 2], 16) * f) for k in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def num(v: Any) -> str:
    """A ``data-v`` sort value: a finite number, or empty (sorted last)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return ""
    return repr(float(v))


def fmt(v: Any, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


# ---------------------------------------------------------------------------------------------- tables
def table(table_id: str, columns: list[tuple[str, str, str]], rows: list[tuple[dict[str, str], list[tuple[str, str]]]],
          caption: str = "", sortable: bool = True) -> str:  # fmt: skip
    """An HTML table. ``columns``: ``(key, header, tooltip)``; ``rows``: ``(tr attributes, [(text, sort value)])``."""
    cls = ' class="sortable"' if sortable else ""
    head = "".join(
        f'<th data-key="{esc(k)}"{f" title={chr(34)}{esc(tip)}{chr(34)}" if tip else ""}>{esc(h)}</th>'
        for k, h, tip in columns
    )
    body = []
    for attrs, cells in rows:
        a = "".join(f' {k}="{esc(v)}"' for k, v in attrs.items())
        tds = "".join(f'<td data-v="{esc(v)}">{esc(t)}</td>' for t, v in cells)
        body.append(f"<tr{a}>{tds}</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f'<div class="wide"><table id="{esc(table_id)}"{cls}>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")  # fmt: skip


def group_cell(cell: dict[str, Any] | None) -> tuple[str, str]:
    """A split/condition cell: text and sort value (normalised quality, or the raw mean of a single metric)."""
    from moerge.bench.report import format_group

    text = format_group(cell)
    if cell is None or cell["status"] != "ok":
        return text, ""
    v = cell["value"]
    if cell["normalized"]:
        return text, num(v)
    return text, num(next(iter(v.values()))) if len(v) == 1 else ""


def summary_table(results: BenchResults) -> str:
    from moerge.bench.report import format_count, format_flops, group_title

    groups = [f"{s}/{c}" for s, c in results.groups()]
    columns = [
        ("method", "method", ""),
        ("kind", "kind", ""),
        (
            "user_data",
            "user data",
            "the target-task data it was given: zero-shot, few-shot N (per task) or full",
        ),
    ]
    columns += [
        (g, group_title(g), f"{g}: mean normalised quality (base 0, oracle 1), else raw means")
        for g in groups
    ]
    columns += SUMMARY_COLUMNS
    rows = []
    for row in results.summary():
        cells = [
            (row["method"], row["method"]),
            (row["kind"], row["kind"]),
            (row.get("user_data") or "—", row.get("user_data") or ""),
        ]
        cells += [group_cell(row.get(g)) for g in groups]
        for key, _, _ in SUMMARY_COLUMNS:
            v = row.get(key)
            if key == "expert_flops_per_token":
                text = format_flops(v)
            elif key == "held_out_rank":
                text = "" if v is None else str(v)
            elif key == "trainable_parameters":
                text = format_count(v)
            else:
                text = fmt(
                    v, {"eval_s": ".1f", "router_train_s": ".1f", "peak_memory_mb": ".0f"}.get(key, ".2f")
                )
            cells.append((text, num(v)))
        attrs = {"data-method": row["method"], "data-status": row["status"]}
        if row.get("reason"):
            attrs["title"] = row["reason"]
        rows.append((attrs, cells))
    return table("summary", columns, rows, "click a header to sort; hover a method for why it did not run")


def per_task_table(results: BenchResults) -> str:
    from moerge.bench.report import METRIC_SHORT

    columns = [("method", "method", "")] + [
        (t["name"], f"{t['name']} ({METRIC_SHORT.get(t['metric'], t['metric'])})",
         f"{t['split']}/{t['condition']}; in brackets: normalised quality")
        for t in results.tasks
    ]  # fmt: skip
    rows = []
    for m in results.methods:
        if m.kind == "single":
            continue
        cells = [(m.name, m.name)]
        for t in results.tasks:
            r = results.result(m.name, t["name"])
            if r is None:
                cells.append(("—", ""))
            elif r.status != "ok" or r.score is None:
                cells.append(("n/a" if r.status == "not_applicable" else "error", ""))
            else:
                text = f"{r.score:.3f}" + (f" ({r.normalized:+.2f})" if r.normalized is not None else "")
                cells.append((text, num(r.score)))
        rows.append(({"data-method": m.name}, cells))
    return table("per-task", columns, rows, "score (exact match, or nll in nats per target token)")


def simple_table(table_id: str, header: list[str], rows: list[list[str]]) -> str:
    columns = [(f"c{i}", h, "") for i, h in enumerate(header)]
    return table(table_id, columns, [({}, [(c, "") for c in r]) for r in rows], sortable=False)


def premise_section(results: BenchResults) -> str:
    """Per expert: selectivity and each router's open-loop top-1 (from results.json's premise diagnostics)."""
    from moerge.bench.premise import ROUTER_LABELS

    p = results.premise
    if not p:
        return "<p>Premise diagnostics were not measured in this run.</p>"
    routers = list(p.get("top1", {}))
    header = ["expert", "tokens", "selectivity", *[f"top-1 {ROUTER_LABELS.get(r, r)}" for r in routers]]
    tokens = dict(zip(p["experts"], p.get("tokens") or []))
    rows = []
    for e in p["experts"]:
        pe = p["per_expert"][e]
        rows.append([e, str(tokens.get(e, "")), fmt(pe.get("selectivity")),
                     *[fmt(pe.get(f"top1/{r}")) for r in routers]])  # fmt: skip
    mean = p.get("mean", {})
    rows.append(["mean", "", fmt(mean.get("selectivity")), *[fmt(mean.get(f"top1/{r}")) for r in routers]])
    verdicts = "".join(
        f"<li><b>{esc(ROUTER_LABELS.get(r, r))}</b>: {esc(v)}</li>" for r, v in p.get("verdicts", {}).items()
    )
    return (
        "<p>Per expert, on its own training data: <b>selectivity</b> (‖ΔW x‖² on the expert's own target tokens ÷ "
        "on the other experts' tokens; Arrow assumes it well above 1) and each zero-shot router's <b>open-loop "
        f"top-1</b> (chance {1 / max(1, len(p['experts'])):.2f}). A method whose premise fails is not tested by "
        "this suite.</p>" + simple_table("premise", header, rows) + f"<ul>{verdicts}</ul>"
    )


# ---------------------------------------------------------------------------------------------- SVG plots
def _symlog(x: float, lin: float = 1e4) -> float:
    return x / lin if x < lin else 1.0 + math.log10(x / lin)


def cost_plot(results: BenchResults) -> str:
    """Mean normalised quality against expert FLOPs per token (symlog axis), held-in and held-out side by side;
    each point's <title> is its hover label."""
    panels = []
    for split in ("held_in", "held_out"):
        pts = []
        for m in results.methods:
            if m.kind == "single" or m.expert_flops_per_token is None:
                continue
            rs = [
                r
                for r in results.results
                if r.method == m.name and r.split == split and r.normalized is not None
            ]
            if not rs or any(r.status != "ok" for r in rs):
                continue
            pts.append((m.name, m.kind, m.expert_flops_per_token, sum(r.normalized for r in rs) / len(rs)))
        panels.append((split, pts))
    xmax = max([_symlog(p[2]) for _, pts in panels for p in pts] + [1.0])
    ys = [p[3] for _, pts in panels for p in pts]
    lo, hi = min([0.0, *ys]) - 0.1, max([1.0, *ys]) + 0.1
    W, H, L, R, T, B = 600, 380, 48, 12, 24, 40
    out = []
    for split, pts in panels:

        def X(x: float) -> float:
            return L + (W - L - R) * _symlog(x) / (xmax * 1.05)

        def Y(y: float) -> float:
            return T + (H - T - B) * (hi - y) / (hi - lo)

        parts = [f'<svg class="plot cost" data-split="{split}" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
                 f'role="img"><title>{esc(split)}: quality against cost</title>',
                 f'<text x="{W / 2}" y="14" class="t">{esc(split.replace("_", "-"))}</text>']  # fmt: skip
        for ref in (0.0, 1.0):
            parts.append(f'<line x1="{L}" x2="{W - R}" y1="{Y(ref):.1f}" y2="{Y(ref):.1f}" class="ref"/>')
        parts.append(f'<line x1="{L}" x2="{L}" y1="{T}" y2="{H - B}" class="axis"/>'
                     f'<line x1="{L}" x2="{W - R}" y1="{H - B}" y2="{H - B}" class="axis"/>')  # fmt: skip
        for tick, label in ((0, "0"), (1e4, "10k"), (1e5, "100k"), (1e6, "1M"), (1e7, "10M"), (1e8, "100M")):
            if _symlog(tick) <= xmax * 1.05:
                parts.append(f'<text x="{X(tick):.1f}" y="{H - B + 14}" class="tick">{label}</text>')
        step = 0.5 if hi - lo > 1.5 else 0.25
        y = math.ceil(lo / step) * step
        while y <= hi:
            parts.append(f'<text x="{L - 4}" y="{Y(y) + 3:.1f}" class="tick" text-anchor="end">{y:g}</text>')
            y += step
        parts.append(f'<text x="{(L + W - R) / 2}" y="{H - 6}" class="tick">expert FLOPs per token (0: merged '
                     'into the weights)</text>')  # fmt: skip
        for name, kind, x, yv in pts:
            shape = (f'<circle cx="{X(x):.1f}" cy="{Y(yv):.1f}" r="4" class="pt {kind}">' if kind == "recipe" else
                     f'<rect x="{X(x) - 4:.1f}" y="{Y(yv) - 4:.1f}" width="8" height="8" class="pt {kind}">')  # fmt: skip
            tag = "circle" if kind == "recipe" else "rect"
            parts.append(f'<g class="point" data-method="{esc(name)}">{shape}<title>{esc(name)}: normalised quality '
                         f'{yv:+.3f}, expert FLOPs/token {x:,.0f}</title></{tag}>'
                         f'<text x="{X(x) + 5:.1f}" y="{Y(yv) - 5:.1f}" class="lbl">{esc(name)}</text></g>')  # fmt: skip
        parts.append("</svg>")
        out.append("".join(parts))
    return "".join(out)


def heatmap(rows: list[str], cols: list[str], titles: list[list[str]], colours: list[list[str]],
            texts: list[list[str]] | None = None, outline: set[tuple[int, int]] = frozenset(), cls: str = "heat") -> str:  # fmt: skip
    """A heatmap as SVG: one <rect> per cell with its hover label in <title>."""
    cw, ch, left, top = (
        46,
        18,
        10 + 6.2 * max([len(r) for r in rows] + [4]),
        10 + 5.5 * max([len(c) for c in cols] + [4]),
    )
    W, H = left + cw * len(cols) + 10, top + ch * len(rows) + 10
    parts = [f'<svg class="{cls}" width="{W:.0f}" height="{H:.0f}" viewBox="0 0 {W:.0f} {H:.0f}">']
    for j, c in enumerate(cols):
        x = left + cw * j + cw / 2
        parts.append(
            f'<text transform="translate({x:.1f},{top - 4:.1f}) rotate(-45)" class="tick">{esc(c)}</text>'
        )
    for i, r in enumerate(rows):
        parts.append(
            f'<text x="{left - 4:.1f}" y="{top + ch * i + 13:.1f}" class="tick" text-anchor="end">{esc(r)}</text>'
        )
        for j in range(len(cols)):
            x, y = left + cw * j, top + ch * i
            stroke = ' stroke="red" stroke-width="2"' if (i, j) in outline else ""
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cw - 1}" height="{ch - 1}" fill="{colours[i][j]}"{stroke}>'
                         f"<title>{esc(titles[i][j])}</title></rect>")  # fmt: skip
            if texts is not None and texts[i][j]:
                parts.append(
                    f'<text x="{x + cw / 2:.1f}" y="{y + 13:.1f}" class="cell">{esc(texts[i][j])}</text>'
                )
    parts.append("</svg>")
    return "".join(parts)


def quality_heatmap(results: BenchResults) -> str:
    methods = [m.name for m in results.methods if m.kind != "single"]
    tasks = [t["name"] for t in results.tasks]
    colours, titles, texts = [], [], []
    for m in methods:
        crow, trow, xrow = [], [], []
        for t in tasks:
            r = results.result(m, t)
            if r is None or r.status != "ok" or r.score is None:
                crow.append("#eeeeee")
                trow.append(f"{m} on {t}: {'not run' if r is None else r.status}")
                xrow.append("n/a")
                continue
            norm = r.normalized
            crow.append("#dddddd" if norm is None else ramp(RDYLGN, (max(-1.0, min(1.5, norm)) + 1) / 2.5))
            trow.append(f"{m} on {t}: {r.metric} {r.score:.3f}"
                        + (f", normalised {norm:+.2f}" if norm is not None else ", normalised undefined"))  # fmt: skip
            xrow.append(f"{r.score:.2f}")
        colours.append(crow)
        titles.append(trow)
        texts.append(xrow)
    return heatmap(methods, tasks, titles, colours, texts, cls="heat quality")


def routing_heatmap(results: BenchResults, method: str) -> str | None:
    """Tasks × experts: the mean routing weight, each task's ground-truth experts outlined (held-in and
    composition tasks: switching tasks list every expert, unrelated ones none)."""
    rows = [r for r in results.results if r.method == method and r.mean_weights is not None]
    if not rows:
        return None
    top = max(max(r.mean_weights) for r in rows) or 1.0
    truth = {t["name"]: t["experts"] for t in results.tasks}
    outline = set()
    for i, r in enumerate(rows):
        if r.condition in ("in_distribution", "composition"):
            outline |= {(i, results.experts.index(e)) for e in truth.get(r.task, []) if e in results.experts}
    colours = [[ramp(VIRIDIS, w / top) for w in r.mean_weights] for r in rows]
    titles = [[f"{method} · {r.task} → {e}: mean weight {w:.3f}" for e, w in zip(results.experts, r.mean_weights)]
              for r in rows]  # fmt: skip
    return heatmap(
        [r.task for r in rows], results.experts, titles, colours, outline=outline, cls="heat routing"
    )


def layer_data(results: BenchResults) -> dict[str, Any]:
    """Per routed method with per-layer weights: its modules (common prefix dropped) and ``{task: [L][E]}``."""
    out: dict[str, Any] = {}
    for m in results.methods:
        if not m.layers:
            continue
        per_task = {
            r.task: r.layer_weights for r in results.results if r.method == m.name and r.layer_weights
        }
        if per_task:
            out[m.name] = {"layers": short_names(m.layers), "tasks": per_task}
    return out


def short_names(names: list[str]) -> list[str]:
    """Module names without their common dotted prefix (``model.layers.0.mlp.up_proj`` → ``0.mlp.up_proj``)."""
    if len(names) < 2:
        return [n or "all" for n in names] or ["all"]
    split = [n.split(".") for n in names]
    k = 0
    while all(len(s) > k + 1 and s[k] == split[0][k] for s in split):
        k += 1
    return [".".join(s[k:]) for s in split]


# ---------------------------------------------------------------------------------------------- the page
def metadata_rows(results: BenchResults) -> list[list[str]]:
    env = results.environment
    seeds = [n for n in results.notes if n.startswith("expert-training seed")]
    rows = [
        ["suite", results.suite],
        ["suite hash", str(env.get("suite_hash", "—"))],
        ["experts", f"{len(results.experts)}: {', '.join(results.experts)}"],
        ["tasks", str(len(results.tasks))],
        ["command", str(env.get("command", "—"))],
        ["started (UTC)", str(env.get("started", "—"))],
        ["wall time", f"{results.wall_s:.1f} s"],
        ["seed", "; ".join(seeds) or "— (one run)"],
        [
            "versions",
            ", ".join(f"{k} {env[k]}" for k in ("moerge", "torch", "transformers", "python") if env.get(k)),
        ],
        ["device", f"{env.get('device', '—')}, {env.get('threads', '—')} threads, {env.get('machine', '—')}"],
    ]
    return rows


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
.wide{overflow-x:auto}table{border-collapse:collapse;margin:.6em 0;font-size:13px}caption{text-align:left;color:#666;font-size:12px}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
table.sortable th{cursor:pointer;background:#f4f4f4;user-select:none}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
tr[data-status=not_applicable] td,tr[data-status=error] td{color:#999}
#meta td,#meta th,#methods td,#literature td{white-space:normal;text-align:left}
svg{margin:.4em .6em .4em 0;overflow:visible}svg .t{font-size:12px;text-anchor:middle;font-weight:bold}
svg .tick{font-size:10px;fill:#444}svg .lbl{font-size:9px;fill:#333}svg .cell{font-size:9px;text-anchor:middle}
svg .ref{stroke:#bbb;stroke-dasharray:3 3}svg .axis{stroke:#444}
svg .pt.recipe{fill:#1f77b4}svg .pt.baseline{fill:#ff7f0e}svg .point:hover text{font-weight:bold}
svg rect:hover{stroke:#000;stroke-width:1.5}.routing-method{display:inline-block;vertical-align:top;margin-right:1.5em}
.layer-heatmap svg{display:block}.layer-heatmap label{font-size:12px}
pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:12px}.note{color:#666;font-size:12px}
"""

SCRIPT = r"""
(function(){
  function val(td, numeric){ var v = td.getAttribute('data-v'); if (v === null || v === '') return null;
    return numeric ? parseFloat(v) : v; }
  function sortTable(t, key, dir){
    var ths = t.tHead.rows[0].cells, col = -1;
    for (var i = 0; i < ths.length; i++){ if (ths[i].getAttribute('data-key') === key) col = i;
      ths[i].removeAttribute('aria-sort'); }
    if (col < 0) return false;
    var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var numeric = rows.every(function(r){ var v = val(r.cells[col], false); return v === null || !isNaN(parseFloat(v)); });
    rows.sort(function(a, b){
      var x = val(a.cells[col], numeric), y = val(b.cells[col], numeric);
      if (x === null && y === null) return 0; if (x === null) return 1; if (y === null) return -1;
      var c = numeric ? x - y : (x < y ? -1 : x > y ? 1 : 0); return dir === 'desc' ? -c : c; });
    rows.forEach(function(r){ body.appendChild(r); });
    ths[col].setAttribute('aria-sort', dir === 'desc' ? 'descending' : 'ascending');
    t.setAttribute('data-sorted-by', key); t.setAttribute('data-sort-dir', dir); return true;
  }
  document.querySelectorAll('table.sortable').forEach(function(t){
    Array.prototype.forEach.call(t.tHead.rows[0].cells, function(th){
      th.addEventListener('click', function(){
        var dir = th.getAttribute('aria-sort') === 'ascending' ? 'desc' : 'asc';
        sortTable(t, th.getAttribute('data-key'), dir); }); }); });
  function fromHash(){
    var h = decodeURIComponent(location.hash.replace(/^#/, '')), p = {};
    h.split('&').forEach(function(kv){ var i = kv.indexOf('='); if (i > 0) p[kv.slice(0, i)] = kv.slice(i + 1); });
    var t = document.getElementById(p.table || 'summary'); if (!t) return;
    if (p.sort){ var desc = p.sort.charAt(0) === '-'; sortTable(t, desc ? p.sort.slice(1) : p.sort, desc ? 'desc' : 'asc'); }
    if (p.click) p.click.split(',').forEach(function(key){  // header clicks, as a user would make them
      Array.prototype.forEach.call(t.tHead.rows[0].cells, function(th){
        if (th.getAttribute('data-key') === key) th.click(); }); });
  }
  window.addEventListener('hashchange', fromHash); fromHash();
  // layer × expert heatmaps, drawn from the embedded data for the chosen task
  var data = JSON.parse(document.getElementById('layer-data').textContent), experts = data.experts;
  var V = ['#440154','#472c7a','#3b518b','#2c718e','#21908d','#27ad81','#5cc863','#aadc32','#fde725'];
  function ramp(t){ t = Math.min(1, Math.max(0, t)) * (V.length - 1); var i = Math.min(Math.floor(t), V.length - 2),
    f = t - i, a = V[i], b = V[i + 1], s = '#';
    for (var k = 1; k < 7; k += 2){ var c = Math.round(parseInt(a.substr(k, 2), 16) * (1 - f) + parseInt(b.substr(k, 2), 16) * f);
      s += (c < 16 ? '0' : '') + c.toString(16); } return s; }
  var NS = 'http://www.w3.org/2000/svg';
  function el(tag, attrs, text){ var e = document.createElementNS(NS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]); if (text !== undefined) e.textContent = text; return e; }
  function draw(box){
    var m = box.getAttribute('data-method'), task = box.querySelector('select').value, d = data.methods[m];
    var w = d.tasks[task], layers = d.layers, cw = 46, ch = 16;
    var left = 10 + 6.2 * Math.max.apply(null, layers.map(function(s){ return s.length; })),
        top = 10 + 5.5 * Math.max.apply(null, experts.map(function(s){ return s.length; }));
    var top1 = 0; w.forEach(function(r){ r.forEach(function(v){ top1 = Math.max(top1, v); }); });
    var W = left + cw * experts.length + 10, H = top + ch * layers.length + 10;
    var svg = el('svg', {'class': 'heat layers', width: W, height: H, viewBox: '0 0 ' + W + ' ' + H, 'data-task': task});
    experts.forEach(function(e, j){ svg.appendChild(el('text', {'class': 'tick',
      transform: 'translate(' + (left + cw * j + cw / 2) + ',' + (top - 4) + ') rotate(-45)'}, e)); });
    layers.forEach(function(l, i){
      svg.appendChild(el('text', {'class': 'tick', x: left - 4, y: top + ch * i + 12, 'text-anchor': 'end'}, l));
      experts.forEach(function(e, j){
        var r = el('rect', {x: left + cw * j, y: top + ch * i, width: cw - 1, height: ch - 1, fill: ramp(w[i][j] / (top1 || 1))});
        r.appendChild(el('title', {}, m + ' · ' + task + ' · ' + l + ' → ' + e + ': mean weight ' + w[i][j].toFixed(3)));
        svg.appendChild(r); }); });
    var old = box.querySelector('svg'); if (old) box.replaceChild(svg, old); else box.appendChild(svg);
  }
  document.querySelectorAll('.layer-heatmap').forEach(function(box){
    box.querySelector('select').addEventListener('change', function(){ draw(box); }); draw(box); });
  document.body.setAttribute('data-ready', '1');
})();
"""


def render_html(results: BenchResults) -> str:
    """The report as one HTML page (see the module doc)."""
    from moerge.bench.report import condition_ranking, legend, literature_rows

    env = results.environment
    n_methods = len([m for m in results.methods if m.kind != "single"])
    layers = layer_data(results)
    sections = [
        f"<h1>moerge bench: suite <code>{esc(results.suite)}</code></h1>",
        f"<p>{len(results.experts)} experts, {len(results.tasks)} tasks, {n_methods} methods; "
        f"{results.wall_s:.1f} s wall; torch {esc(env.get('torch'))} on {esc(env.get('device'))}.</p>",
        "<h2>Summary</h2>", summary_table(results), f'<p class="note">{esc(legend(results))}</p>',
    ]  # fmt: skip
    ranking = condition_ranking(results)
    if ranking:
        items = "".join(
            f"<li><b>{esc(c)}</b> ({esc(v[0][2] if v else '')}): "
            + (esc(", ".join(f"{i}. {n} ({x:+.3f})" for i, (n, x, _) in enumerate(v, 1))) or "none ran")
            + "</li>"
            for c, v in ranking.items()
        )
        sections += ["<h3>Routed recipes ranked on each held-out condition</h3>", f"<ul>{items}</ul>"]
    sections += ["<h2>Quality against cost</h2>",
                 '<p class="note">Mean normalised quality (base 0, oracle 1) against expert FLOPs per token; circles: '
                 "routed recipes, squares: baselines. Hover a point for its values.</p>", cost_plot(results),
                 "<h2>Per task</h2>", per_task_table(results),
                 '<p class="note">Colour: normalised quality (red −1 … green 1.5; grey: undefined); text: raw score.</p>',
                 quality_heatmap(results)]  # fmt: skip
    routed = [
        (m.name, routing_heatmap(results, m.name)) for m in results.methods if m.routed and m.status == "ok"
    ]
    routed = [(n, svg) for n, svg in routed if svg]
    if routed:
        sections += ["<h2>Routing</h2>",
                     '<p class="note">Per routed method: the mean routing weight per task and expert over target tokens '
                     "and layers (red: the task's ground-truth experts), and per layer (module) and expert for the task "
                     "chosen. Hover a cell for its value.</p>"]  # fmt: skip
        for name, svg in routed:
            part = f'<div class="routing-method" data-method="{esc(name)}"><h3>{esc(name)}</h3>{svg}'
            if name in layers:
                opts = "".join(f'<option value="{esc(t)}">{esc(t)}</option>' for t in layers[name]["tasks"])
                part += (f'<div class="layer-heatmap" data-method="{esc(name)}"><label>layer × expert on '
                         f"<select>{opts}</select></label></div>")  # fmt: skip
            sections.append(part + "</div>")
    sections += ["<h2>Do the routers' premises hold on this suite?</h2>", premise_section(results)]
    lh, lr = literature_rows([results])
    sections += ["<h2>The literature's expected orderings</h2>",
                 '<p class="note">The difference of mean normalised quality (first method − second) where the paper '
                 "leads us to expect it ≥ 0 (> 0 for per-token vs per-example routing); one run gives no interval "
                 "(<code>moerge bench --seeds N</code>).</p>", simple_table("literature", lh, lr)]  # fmt: skip
    mrows = []
    for m in results.methods:
        if m.kind == "single":
            continue
        tax = ", ".join(f"{k}={v}" for k, v in (m.taxonomy or {}).items())
        mrows.append(
            [m.name, m.kind, m.description or "", tax, m.status + (f": {m.reason}" if m.reason else "")]
        )
    sections += [
        "<h2>Methods</h2>",
        simple_table("methods", ["method", "kind", "what", "taxonomy", "status"], mrows),
    ]
    if results.notes:
        sections += [
            "<h2>Notes</h2>",
            "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in results.notes) + "</ul>",
        ]
    sections += ["<h2>Run</h2>", simple_table("meta", ["", ""], metadata_rows(results)),
                 "<details><summary>configuration</summary><pre>" + esc(json.dumps(results.config, indent=1))
                 + "</pre></details>"]  # fmt: skip
    data = json.dumps({"experts": results.experts, "methods": layers}, separators=(",", ":"))
    data = data.replace("</", "<\\/")  # never ends the script element
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>moerge bench: {esc(results.suite)}</title><style>{CSS}</style></head><body>"
        + "\n".join(sections)
        + f'<script type="application/json" id="layer-data">{data}</script><script>{SCRIPT}</script></body></html>\n'
    )


def write_html(results: BenchResults, path: str | Path) -> Path:
    """Write ``render_html(results)`` to ``path`` (a temporary sibling renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(results), encoding="utf-8")
    tmp.replace(path)
    return path
