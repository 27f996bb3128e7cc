"""report.html: one self-contained page, read back by a real headless browser (Debian's chromium, which
`./dev setup` installs when run as root; skipped with the reason where it is absent); `moerge bench report`
and `moerge bench compare`."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
SEED0 = REPO / "docs" / "results" / "synthetic" / "seed-0" / "results.json"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
needs_browser = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: `apt-get install chromium` (./dev setup does it as root) to run the browser test",
)


# ---------------------------------------------------------------------------------------------- reading a DOM
class Dom(HTMLParser):
    """The tables (rows of ``(text, data-v)`` cells, the header keys, the table's attributes), the SVG rect
    titles per heatmap class, and every tag's attributes, from an HTML text."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, dict] = {}
        self.svgs: list[dict] = []
        self.tags: list[tuple[str, dict]] = []
        self._table = self._row = self._cell = self._svg = None
        self._title: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self._table = self.tables.setdefault(
                a.get("id", ""), {"attrs": a, "keys": [], "rows": [], "row_attrs": []}
            )
        elif tag == "th" and self._table is not None:
            self._table["keys"].append(a.get("data-key"))
        elif tag == "tr" and self._table is not None and self._table["keys"]:
            self._row = []
            self._table["row_attrs"].append(a)
        elif tag == "td" and self._row is not None:
            self._cell = ["", a.get("data-v", "")]
        elif tag == "svg":
            self._svg = {"class": a.get("class", ""), "attrs": a, "titles": []}
            self.svgs.append(self._svg)
        elif tag == "title" and self._svg is not None:
            self._title = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append(tuple(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table["rows"].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "title" and self._title is not None:
            self._svg["titles"].append("".join(self._title))
            self._title = None
        elif tag == "svg":
            self._svg = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data
        if self._title is not None:
            self._title.append(data)


def dump_dom(page: Path, fragment: str = "") -> Dom:
    """The page's DOM after its script ran, as headless chromium serialises it."""
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    out = subprocess.run(
        [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
         "--user-data-dir=" + str(page.parent / ".chromium"), "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return Dom(out.stdout)


# ---------------------------------------------------------------------------------------------- references
def expected_group(data: dict, method: str, split: str, condition: str) -> float | None:
    """The mean normalised quality of a method on a split/condition, straight from results.json's rows."""
    rows = [
        r
        for r in data["results"]
        if r["method"] == method and r["split"] == split and r["condition"] == condition
    ]
    if not rows or any(r["status"] != "ok" or r["normalized"] is None for r in rows):
        return None
    return sum(r["normalized"] for r in rows) / len(rows)


def shown_methods(data: dict) -> list[str]:
    return [m["name"] for m in data["methods"] if m["kind"] != "single"]


@pytest.fixture(scope="module")
def seed0_report(tmp_path_factory):
    """report.html of a real run (docs/results: the synthetic suite, seed 0)."""
    from moerge.bench.html_report import write_html
    from moerge.bench.report import load_results

    return write_html(load_results(SEED0), tmp_path_factory.mktemp("seed0") / "report.html")


def test_the_page_is_self_contained_and_holds_every_method(seed0_report):
    text = seed0_report.read_text()
    dom = Dom(text)
    for tag, attrs in dom.tags:  # nothing fetched: no external script, style sheet, image or frame
        assert not attrs.get("src") and not (tag == "link" and attrs.get("href")), (tag, attrs)
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    data = json.loads(SEED0.read_text())
    summary = dom.tables["summary"]
    assert [r[0][0] for r in summary["rows"]] == shown_methods(data)
    assert {"premise", "literature", "meta", "per-task", "methods"} <= set(dom.tables)
    meta = {r[0][0]: r[1][0] for r in dom.tables["meta"]["rows"]}
    assert meta["command"] == data["environment"]["command"] and "torch 2" in meta["versions"]
    # quality against cost: a hover label per plotted point, with its value
    cost = [s for s in dom.svgs if "cost" in s["class"]]
    assert len(cost) == 2
    held_in = next(s for s in cost if s["attrs"]["data-split"] == "held_in")
    arrow = expected_group(data, "arrow", "held_in", "in_distribution")
    assert f"arrow: normalised quality {arrow:+.3f}, expert FLOPs/token" in "\n".join(held_in["titles"])


@needs_browser
def test_a_browser_reads_the_table_back_and_sorts_it(seed0_report):
    """The summary table as chromium renders it: one row per method with the values of results.json; sorted
    by a column through the address (``#sort=-KEY``) and by two header clicks (``#click=KEY,KEY``), the rows
    come in the order the test computes."""
    data = json.loads(SEED0.read_text())
    key = "held_out/switching"
    value = {m: expected_group(data, m, "held_out", "switching") for m in shown_methods(data)}

    dom = dump_dom(seed0_report)
    summary = dom.tables["summary"]
    col = summary["keys"].index(key)
    rows = {r[0][0]: r for r in summary["rows"]}
    assert list(rows) == shown_methods(data)
    for method, v in value.items():
        text, sort_value = rows[method][col]
        statuses = {
            r["status"] for r in data["results"] if r["method"] == method and r["condition"] == "switching"
        }
        undefined = (
            "n/a" if statuses == {"not_applicable"} else "—"
        )  # a method that could not run there says so
        assert text == (undefined if v is None else f"{v:+.2f}")
        assert (sort_value == "") == (v is None) and (
            v is None or float(sort_value) == pytest.approx(v, abs=1e-12)
        )

    descending = sorted((m for m in value if value[m] is not None), key=lambda m: -value[m])  # type: ignore[operator]
    descending += [m for m in value if value[m] is None]  # undefined values last, in their order
    for fragment in (f"sort=-{key}", f"click={key},{key}"):
        dom = dump_dom(seed0_report, fragment)
        summary = dom.tables["summary"]
        assert [r[0][0] for r in summary["rows"]] == descending, fragment
        assert summary["attrs"]["data-sorted-by"] == key and summary["attrs"]["data-sort-dir"] == "desc"

    dom = dump_dom(seed0_report, "click=method")  # one click: ascending, text
    assert [r[0][0] for r in dom.tables["summary"]["rows"]] == sorted(value)
    dom = dump_dom(seed0_report, "table=per-task&sort=switch")
    score = {
        r["method"]: r["score"] for r in data["results"] if r["task"] == "switch" and r["status"] == "ok"
    }
    got = [r[0][0] for r in dom.tables["per-task"]["rows"]]
    scored = [m for m in got if m in score]  # methods that could not run on the task (n/a) sort last
    assert got[: len(scored)] == scored and [score[m] for m in scored] == sorted(
        score[m] for m in shown_methods(data) if m in score
    )
    assert set(got) == set(shown_methods(data))


@needs_browser
def test_a_browser_draws_the_layer_by_expert_heatmaps(bench_results, tmp_path):
    """Per routed recipe, the script draws a layer × expert heatmap of the first task from the embedded data:
    one cell per module and expert, whose hover label carries results.json's value."""
    from moerge.bench.report import write_report

    write_report(bench_results, tmp_path / "run", plots=False)
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    dom = dump_dom(tmp_path / "run" / "report.html")
    assert any(
        tag == "body" and a.get("data-ready") == "1" for tag, a in dom.tags
    )  # the script ran to its end
    drawn = [s for s in dom.svgs if "layers" in s["class"]]
    assert len(drawn) == sum(1 for m in data["methods"] if m["layers"]) > 0
    arrow = next(m for m in data["methods"] if m["name"] == "arrow")
    first = next(r for r in data["results"] if r["method"] == "arrow" and r["layer_weights"])
    (svg,) = [s for s in drawn if s["titles"] and s["titles"][0].startswith("arrow · ")]
    assert svg["attrs"]["data-task"] == first["task"]
    E, L = len(data["experts"]), len(arrow["layers"])
    assert len(svg["titles"]) == L * E
    for i, row in enumerate(first["layer_weights"]):
        for j, w in enumerate(row):
            assert svg["titles"][i * E + j].endswith(f"→ {data['experts'][j]}: mean weight {w:.3f}")


# ---------------------------------------------------------------------------------------------- report, compare
def test_bench_report_regenerates_the_reports_from_results_json(tmp_path):
    from moerge.cli import app

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(SEED0, run / "results.json")
    res = CliRunner().invoke(app, ["bench", "report", str(run), "--no-plots"])
    assert res.exit_code == 0, res.output
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    data = json.loads(SEED0.read_text())
    for name in shown_methods(data):
        assert f"| {name} |" in md or f"| {name} [" in md
    assert [r[0][0] for r in Dom(page).tables["summary"]["rows"]] == shown_methods(data)


def _changed_copy(tmp_path: Path) -> tuple[Path, Path]:
    """Two runs: seed 0, and seed 0 with arrow's switching task +0.25 normalised and its routing accuracy
    +0.1, multitask's markov9 NLL +0.5, ties:untuned gone, and limit 5."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copy(SEED0, a / "results.json")
    data = json.loads(SEED0.read_text())
    for r in data["results"]:
        if r["method"] == "arrow" and r["task"] == "switch":
            r["normalized"] += 0.25
            r["routing_accuracy"] += 0.1
        if r["method"] == "multitask" and r["task"] == "markov9":
            r["score"] += 0.5
    data["methods"] = [m for m in data["methods"] if m["name"] != "ties:untuned"]
    data["results"] = [r for r in data["results"] if r["method"] != "ties:untuned"]
    data["config"]["limit"] = 5
    (b / "results.json").write_text(json.dumps(data))
    return a, b


def test_compare_finds_exactly_what_changed(tmp_path):
    from moerge.bench.compare import compare_runs, load_run

    a, b = _changed_copy(tmp_path)
    diff = compare_runs(load_run(a), load_run(b / "results.json"))
    changed = {(r["method"], r["condition"], r["measure"]): r for r in diff["rows"] if r["changed"]}
    assert set(changed) == {("arrow", "switching", "norm"), ("multitask", "unrelated", "nll")}
    arrow = changed[("arrow", "switching", "norm")]
    assert arrow["delta"] == pytest.approx(0.25) and arrow["route_after"] - arrow[
        "route_before"
    ] == pytest.approx(0.1)
    assert changed[("multitask", "unrelated", "nll")]["delta"] == pytest.approx(
        0.5 / 1
    )  # one NLL task: markov9
    assert diff["only_before"] == ["ties:untuned"] and diff["only_after"] == []
    assert diff["config"] == [{"key": "config.limit", "before": None, "after": 5}]
    same = compare_runs(load_run(a), load_run(a))
    assert not any(r["changed"] for r in same["rows"]) and same["config"] == []


def test_compare_from_the_cli(tmp_path):
    from moerge.cli import app

    a, b = _changed_copy(tmp_path)
    res = CliRunner().invoke(app, ["bench", "compare", str(a), str(b)])
    assert res.exit_code == 0, res.output
    table = [line for line in res.output.splitlines() if line.startswith("| ")]
    assert table[0] == "| method | where | before | after | Δ | route acc |"
    assert [line.split(" | ")[:2] for line in table[1:]] == [
        ["| multitask", "unrelated nll"],
        ["| arrow", "switching"],
    ]
    assert "only in the first run: ties:untuned" in res.output and "config.limit: null → 5" in res.output
    res = CliRunner().invoke(app, ["bench", "compare", str(a), str(b), "--json"])
    assert json.loads(res.output)["only_before"] == ["ties:untuned"]

    import contextlib
    import io

    from moerge.cli.common import run_app

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_app(app, ["bench", "compare", str(a), str(tmp_path / "nowhere")])
    assert code == 1 and err.getvalue().count("error:") == 1 and "nowhere: no such file" in err.getvalue()
