"""Output a person can read (`moerge.tables`): at 80 columns no line is wider than the terminal and no number
is cut; piped, a table is Markdown (or ``--json``) that reads back to the same cells; error lines wrap at word
boundaries; progress goes to stderr and leaves piped stdout alone."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

from moerge.tables import NBSP, Column, Table, layout, parse_markdown, render, wrap_cell

NUMBER = re.compile(r"(?<![\w.+-])[-+]?\d+(?:\.\d+)?[kM]?(?![\w.])")


def terminal(width: int = 80) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, force_terminal=True, color_system=None, legacy_windows=False), buf


def piped() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=80, force_terminal=False, color_system=None), buf


def assert_fits_and_numbers_whole(text: str, table: Table, width: int) -> None:
    """No line wider than ``width``; every number printed is one of the data's, and every number of the shown
    columns is printed (so none was cut into two)."""
    lines = text.splitlines()
    assert max(cell_len(line) for line in lines) <= width, "\n".join(lines)
    data = " ".join(
        [
            table.title,
            *table.notes,
            *(c.header for c in table.columns),
            *(c.short or "" for c in table.columns),
        ]
    )
    lay = layout(table, width)
    shown = lay.shown if lay.fits else range(len(table.columns))  # too narrow for columns: a block per row
    cells = [row[i].replace(NBSP, " ") for row in table.rows for i in shown]
    known = set(NUMBER.findall(data + " " + " ".join(cells)))
    printed = NUMBER.findall(text)
    assert set(printed) <= known, f"numbers cut or made up: {sorted(set(printed) - known)}\n{text}"
    for cell in cells:
        for n in NUMBER.findall(cell):
            assert n in printed, f"{n} (of {cell!r}) not printed whole\n{text}"


def awkward_table() -> Table:
    t = Table(
        "results · suite synthetic-d4d3ce10be891978 · 8 experts",
        [
            Column("method"),
            *[Column(h, short=h[:4], right=True) for h in ("held-in", "switching", "composition")],
            Column("unrelated", short="unrel", right=True),
            Column("interval", right=True, drop=2),
            Column("expert FLOPs/tok", short="FLOPs", right=True, drop=1),
            Column("verdict"),
        ],
        notes=["[1] arrow:granularity=example: not applicable to 2 tasks"],
    )
    names = [
        "base",
        "retrieval_of_experts:embedding_model=base",
        "average_activation:granularity=example",
        "ties",
    ]
    for k, name in enumerate(names):
        t.add_row(
            name, f"+{k / 7:.2f}", f"-{k / 3:.3f}", f"{1234.5 * k:,.1f}", f"EM{NBSP}{k / 9:.2f} nll{NBSP}{k + 0.19:.2f}",
            f"+0.{k}6{NBSP}±{NBSP}0.03", f"{174.0 + k:.1f}k", "does not hold (premise fails for 2 of 8 experts)",
            section=k == 2,
        )  # fmt: skip
    return t


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_a_table_fits_the_terminal_without_cutting_numbers(width):
    table = awkward_table()
    console, buf = terminal(width)
    render(table, console)
    assert_fits_and_numbers_whole(buf.getvalue(), table, width)


def test_narrow_terminals_use_short_headers_then_leave_columns_out_and_say_so():
    table = awkward_table()
    wide = layout(table, None)
    assert wide.headers == [c.header for c in table.columns] and not wide.legend
    narrow = layout(table, 60)
    hidden = [c.header for i, c in enumerate(table.columns) if i not in narrow.shown]
    assert hidden and all(
        table.columns[table.columns.index(c)].drop for c in table.columns if c.header in hidden
    )
    assert any(line.startswith("Not shown at this width: " + ", ".join(hidden)) for line in narrow.legend)
    console, buf = terminal(60)
    render(table, console, wide=True)  # --wide: every column, whatever the width
    header_text = buf.getvalue()
    assert all(h.split()[0] in header_text for h in (c.header for c in table.columns))


def test_wrapping_breaks_identifiers_at_their_joints_and_never_inside_a_number():
    assert wrap_cell("retrieval_of_experts:embedding_model=base", 21) == [
        "retrieval_of_experts",
        ":embedding_model=base",
    ]
    assert wrap_cell("average_activation:granularity=example", 20) == [
        "average_activation",
        ":granularity=example",
    ]
    assert wrap_cell("1,234,567.5", 5) == ["1,234", ",567.", "5"]  # only cut when nothing else fits …
    assert layout(Table("t", [Column("n")], rows=[["1,234,567.5"]]), 40).widths == [
        11
    ]  # … which layout avoids


def test_piped_tables_are_markdown_that_reads_back_to_the_same_cells():
    table = awkward_table()
    console, buf = piped()
    render(table, console)
    text = buf.getvalue()
    assert all("\n" not in line for line in text.splitlines())
    parsed = parse_markdown(text)
    assert parsed[0] == [c.header for c in table.columns]
    assert parsed[1:] == [[c.replace(NBSP, " ") for c in row] for row in table.rows]
    assert table.notes[0] in text


# ---------------------------------------------------------------------------------------------- the commands
@pytest.fixture
def term80(monkeypatch):
    """The CLI's consoles as an 80-column terminal."""
    import moerge.cli.common as common
    import moerge.cli.library as library
    import moerge.cli.route as route

    console, buf = terminal(80)
    for module in (common, library, route):
        monkeypatch.setattr(module, "console", console)
    return buf


def test_recipes_at_80_columns_piped_and_as_json(term80, monkeypatch):
    from moerge.cli import app
    from moerge.cli.common import run_app
    from moerge.cli.route import ABBREV, AXIS_NAMES
    from moerge.recipes import AXES, taxonomy_rows

    rows = taxonomy_rows()
    assert run_app(app, ["recipes"]) == 0
    text = term80.getvalue()
    assert max(cell_len(line) for line in text.splitlines()) <= 80
    for r in rows:
        assert re.search(rf"^{re.escape(r['recipe'])}\s", text, re.M), r["recipe"]  # each name whole
    monkeypatch.undo()  # the real consoles again: not a terminal under CliRunner
    res = CliRunner().invoke(app, ["recipes"])  # not a terminal: Markdown
    parsed = parse_markdown(res.stdout)
    assert parsed[0] == ["recipe", *[AXIS_NAMES[a] for a in AXES], "paper"]
    assert parsed[1:] == [[r["recipe"], *[ABBREV.get(r[a], r[a]) for a in AXES], r["paper"]] for r in rows]
    assert json.loads(CliRunner().invoke(app, ["recipes", "--json"]).stdout) == rows


@pytest.fixture
def library_with_experts(tmp_path):
    import torch

    from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
    from moerge.experts.library import ExpertLibrary

    lib = ExpertLibrary.create(tmp_path / "lib", base_model="a-rather-long-base-model-name/with-an-org")
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(["multilingual_summarisation_expert_v2", "constant7"]):
        lora = {
            f"model.layers.{k}.self_attn.q_proj": LoraModule(torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), 8.0)
            for k in range(3)
        }  # fmt: skip
        meta = ExpertMetadata(name=name, task=f"task_{i}_with_a_long_name", domain="general-domain-text",
                              tags=["tag-one", "tag-two"], base_model="a-rather-long-base-model-name/with-an-org")  # fmt: skip
        lib.add(Expert(meta, lora=lora))
    return lib


def test_library_list_and_show_at_80_columns_and_piped(term80, library_with_experts, monkeypatch):
    from moerge.cli import app
    from moerge.cli.common import run_app

    url = library_with_experts.url
    assert run_app(app, ["library", "list", url]) == 0
    assert run_app(app, ["library", "show", url, "constant7"]) == 0
    text = term80.getvalue()
    assert max(cell_len(line) for line in text.splitlines()) <= 80, text
    assert re.search(r"^multilingual_summarisation_expert_v2\s|^multilingual_\s*$", text, re.M)
    monkeypatch.undo()
    res = CliRunner().invoke(app, ["library", "list", url])
    parsed = parse_markdown(res.stdout)
    assert [r[0] for r in parsed[1:]] == ["constant7", "multilingual_summarisation_expert_v2"] or [
        r[0] for r in parsed[1:]
    ] == ["multilingual_summarisation_expert_v2", "constant7"]
    shown = json.loads(CliRunner().invoke(app, ["library", "show", url, "constant7", "--json"]).stdout)
    expert = library_with_experts.get("constant7")
    assert shown["metadata"]["name"] == "constant7"
    assert [(m["module"], int(m["rank"]), int(m["d_in"]), int(m["d_out"])) for m in shown["modules"]] == [
        (k, lm.rank, lm.d_in, lm.d_out) for k, lm in sorted(expert.lora.items())
    ]


def test_error_lines_wrap_at_word_boundaries_on_a_terminal_and_not_when_piped(monkeypatch, capsys):
    import moerge.cli.common as common

    message = (
        "cannot read /some/rather/deeply/nested/folder/of/experts/adapter_model.safetensors; check the path"
    )
    console, buf = terminal(40)
    monkeypatch.setattr(common, "err_console", console)
    common.print_error(message)
    lines = buf.getvalue().splitlines()
    assert len(lines) > 1 and max(cell_len(line) for line in lines) <= 40
    assert " ".join(line.rstrip() for line in lines).replace("/ ", "/") == f"error: {message}"
    console, buf = piped()
    monkeypatch.setattr(common, "err_console", console)
    common.print_error(message)
    assert buf.getvalue() == f"error: {message}\n"


def test_merge_progress_goes_to_stderr_and_leaves_piped_stdout_alone(tiny_llama_dir, tmp_path):
    """The bar is shown (stderr is a terminal here) while stdout, a pipe, gets only the result line."""
    import pty

    import yaml
    from safetensors.torch import load_file

    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [str(tiny_llama_dir), str(tiny_llama_dir)]})
    )
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "COLUMNS": "80"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moerge", "merge", str(cfg), str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=follower, env=env,
    )  # fmt: skip
    os.close(follower)
    err = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        err += chunk
    out = proc.stdout.read().decode()
    assert proc.wait(timeout=120) == 0, err.decode(errors="replace")
    os.close(leader)
    assert out == f"merged model written to {tmp_path / 'out'}\n"
    assert b"merging merge.yaml" in err  # the bar was on the terminal
    merged = load_file(next((tmp_path / "out").glob("*.safetensors")))
    original = load_file(next(Path(tiny_llama_dir).glob("*.safetensors")))
    assert merged.keys() == original.keys()
    for k, v in original.items():  # the mean of a model with itself is the model
        assert (merged[k].float() - v.float()).abs().max() < 1e-6, k
