"""The benchmark's summary and literature tables as a person sees them: at 80 columns every line fits and every
number is printed whole; piped they are Markdown, and ``--json`` gives the same cells."""

from __future__ import annotations

import io
import json
import re

from rich.cells import cell_len
from rich.console import Console

NUMBER = re.compile(r"(?<![\w.+-])[-+]?\d+(?:\.\d+)?[kM]?(?![\w.])")


def test_summary_at_80_columns_fits_and_prints_every_number_whole(bench_results):
    from moerge.bench.report import print_table, summary_table
    from moerge.tables import layout

    buf = io.StringIO()
    print_table(bench_results, Console(file=buf, width=80, force_terminal=True, color_system=None))
    text = buf.getvalue()
    assert max(cell_len(line) for line in text.splitlines()) <= 80, text
    table = summary_table(bench_results)
    body = text.split("Quality columns:")[0]  # the summary table (and its legend lines)
    printed = NUMBER.findall(body)
    lay = layout(table, 80)
    for row in table.rows:
        for i in lay.shown:
            for n in NUMBER.findall(row[i].replace("\u00a0", " ")):
                assert n in printed, f"{n} of {row[0]!r} not printed whole\n{body}"
    cells = " ".join(" ".join(r) for r in table.rows).replace("\u00a0", " ")
    assert set(printed) <= set(NUMBER.findall(cells + " " + table.title)), body


def test_piped_summary_is_markdown_and_json_has_the_same_cells(bench_results, capsys):
    from moerge.bench.report import print_table, summary_table
    from moerge.cli.bench import print_json
    from moerge.tables import parse_markdown

    buf = io.StringIO()
    print_table(bench_results, Console(file=buf, width=80, force_terminal=False))
    table = summary_table(bench_results)
    expected = [[c.replace("\u00a0", " ") for c in row] for row in table.rows]
    parsed = parse_markdown(buf.getvalue())
    assert parsed[0] == [c.header for c in table.columns] and parsed[1:] == expected
    print_json(bench_results)
    data = json.loads(capsys.readouterr().out)
    assert [[r[c.header] for c in table.columns] for r in data["summary"]] == expected
    assert data["suite"] == bench_results.suite and data["literature"]
