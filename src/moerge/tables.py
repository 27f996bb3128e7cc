"""Tables a person can read: fitted to the terminal's width, plain Markdown when piped, JSON on request.

Every table the CLI prints goes through `render`:

- on a terminal the table is laid out for the terminal's width: cells wrap only where they may (at spaces,
  then before ``:``/``,`` and after ``=``/``/``/``_``), never inside a number; when the full headers do not fit
  the short ones are used with a legend line; when still too wide, the optional columns are left out (a line
  says which; ``wide=True`` — the CLI's ``--wide`` — shows every column however wide);
- anywhere else (a pipe, a file, a CI log) the table is printed as one Markdown table, one unbroken line per
  row, so it can be read back (`parse_markdown`);
- `records` gives the rows as dicts (the CLI's ``--json``).

    t = Table("results", [Column("method"), Column("held-in", short="in", right=True)])
    t.add_row("arrow", "+0.46")
    render(t, console)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

NBSP = "\u00a0"  # a space the layout never breaks at ("EM 1.00" stays on one line); printed as a space


@dataclass
class Column:
    """A column: its header, an optional short header (explained in a legend when used), right alignment for
    numbers, and ``drop``: columns with a drop rank may be left out at narrow widths, the lowest rank first."""

    header: str
    short: str | None = None
    right: bool = False
    drop: int | None = None


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[list[str]] = field(default_factory=list)
    sections: set[int] = field(default_factory=set)  # indices of rows that start a new section
    notes: list[str] = field(default_factory=list)  # lines printed under the table (wrapped at words)
    styles: dict[str, str] = field(default_factory=dict)  # on a terminal: each of these words in its style

    def add_row(self, *cells: Any, section: bool = False) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        if section and self.rows:
            self.sections.add(len(self.rows))
        self.rows.append(["" if c is None else str(c) for c in cells])


# ---------------------------------------------------------------------------------------------- wrapping
# Break points inside a word (an identifier, a path, key=value), coarsest first: before ":" and ",", then after
# "=" and "/", then after "_". A word is broken at the finest level only where the coarser pieces do not fit.
# Never between two digits ("1,234", "3/4" stay whole).
_LEVELS = [re.compile(r"(?=:)|(?=,(?!\d))"), re.compile(r"(?<==)|(?<=/)(?!\d)"), re.compile(r"(?<=_)")]


def _pieces(word: str, width: int, level: int = 0) -> list[str]:
    if len(word) <= width or level == len(_LEVELS):
        return [word]
    out: list[str] = []
    for part in (p for p in _LEVELS[level].split(word) if p):
        out += _pieces(part, width, level + 1)
    return out


def _atoms(word: str, level: int = len(_LEVELS)) -> list[str]:
    parts = [word]
    for pattern in _LEVELS[:level]:
        parts = [p for part in parts for p in pattern.split(part) if p]
    return parts


def wrap_cell(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` cells: words whole where they fit, long words broken at their
    break points, and only a piece longer than ``width`` itself cut (the layout makes columns wide enough)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            for k, piece in enumerate(_pieces(word, width)):
                sep = " " if (k == 0 and line) else ""
                if len(line) + len(sep) + len(piece) <= width:
                    line += sep + piece
                    continue
                if line:
                    lines.append(line)
                while len(piece) > width:
                    lines.append(piece[:width])
                    piece = piece[width:]
                line = piece
        lines.append(line)
    return lines


def _min_width(text: str, level: int = len(_LEVELS)) -> int:
    """The narrowest width ``text`` wraps into without cutting a piece (breaking words down to ``level``)."""
    return max((len(a) for w in re.split(r"[ \n]", text) for a in _atoms(w, level)), default=0)


def _natural(text: str) -> int:
    return max((len(line) for line in text.split("\n")), default=0)


# ---------------------------------------------------------------------------------------------- layout
@dataclass
class Layout:
    """What `layout` chose: the columns shown (indices), their headers and widths, and the legend lines."""

    shown: list[int]
    headers: list[str]
    widths: list[int]
    legend: list[str]
    fits: bool = True

    def total(self) -> int:
        return _total(self.widths)


def _total(widths: list[int]) -> int:
    return sum(widths) + 2 * (len(widths) - 1)  # two spaces between columns, no outer edge


def _fit(
    table: Table, shown: list[int], short: bool, width: int | None, level: int
) -> tuple[list[str], list[int]] | None:
    cols = [table.columns[i] for i in shown]
    headers = [(c.short or c.header) if short else c.header for c in cols]
    cells = [[r[i] for r in table.rows] for i in shown]
    natural = [max([_natural(h), *map(_natural, cs)]) for h, cs in zip(headers, cells)]
    if width is None or _total(natural) <= width:
        return headers, natural
    # headers wrap at spaces first: a column is as wide as its longest cell or header word
    body = [max([_min_width(h), *map(_natural, cs)]) for h, cs in zip(headers, cells)]
    least = [max([_min_width(h), *(_min_width(c, level) for c in cs)]) for h, cs in zip(headers, cells)]
    widths = list(body)
    while _total(widths) > width:
        slack = [(w - m, w, i) for i, (w, m) in enumerate(zip(widths, least)) if w > m]
        if not slack:
            return None
        _, _, i = max(slack)  # narrow the column with the most room to wrap
        widths[i] -= 1
    return headers, widths


def layout(table: Table, width: int | None) -> Layout:
    """Fit ``table`` into ``width`` terminal cells (None: no limit): full headers, else the short ones with a
    legend, else without the optional columns (lowest drop rank first) — words broken at "_" only when nothing
    else fits; at worst the narrowest layout, marked ``fits=False`` (`render` then prints one block per row)."""
    order = [i for _, i in sorted((c.drop, i) for i, c in enumerate(table.columns) if c.drop is not None)]
    has_short = any(c.short for c in table.columns)
    for level in (len(_LEVELS) - 1, len(_LEVELS)):
        for k in range(len(order) + 1):
            shown = [i for i in range(len(table.columns)) if i not in order[:k]]
            for short in (False, True) if has_short else (False,):
                fit = _fit(table, shown, short, width, level)
                if fit is not None:
                    return Layout(shown, fit[0], fit[1], _legend(table, shown, short, order[:k]))
    dropped = order
    shown = [i for i in range(len(table.columns)) if i not in dropped]
    headers = [table.columns[i].short or table.columns[i].header for i in shown]
    cells = [[r[i] for r in table.rows] for i in shown]
    widths = [max([_min_width(h), *map(_min_width, cs)]) for h, cs in zip(headers, cells)]
    return Layout(shown, headers, widths, _legend(table, shown, True, dropped), fits=width is None)


def _legend(table: Table, shown: list[int], short: bool, dropped: list[int]) -> list[str]:
    out = []
    if short:
        named = [
            f"{c.short} = {c.header}" for i in shown if (c := table.columns[i]).short and c.short != c.header
        ]
        if named:
            out.append("Columns: " + "; ".join(named) + ".")
    if dropped:
        hidden = ", ".join(table.columns[i].header for i in sorted(dropped))
        out.append(f"Not shown at this width: {hidden} (--wide shows every column).")
    return out


# ---------------------------------------------------------------------------------------------- output
def _plain(text: str) -> str:
    return text.replace(NBSP, " ")


def records(table: Table) -> list[dict[str, str]]:
    """The rows as ``{header: cell}`` dicts (for ``--json``)."""
    return [{c.header: _plain(v) for c, v in zip(table.columns, row)} for row in table.rows]


def to_markdown(table: Table) -> str:
    """The whole table as Markdown (every column, full headers), one line per row."""

    def esc(s: str) -> str:
        return _plain(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c.header) for c in table.columns) + " |"]
    lines.append("|" + "|".join("---:" if c.right else "---" for c in table.columns) + "|")
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines)


def parse_markdown(text: str) -> list[list[str]]:
    """The header and rows of the first Markdown table in ``text`` (the inverse of `to_markdown`)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and line.endswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line[1:-1])]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif rows:
            break
    return rows


def render(table: Table, console: Any = None, *, wide: bool = False) -> None:
    """Print ``table`` on ``console`` (default: stdout): fitted to a terminal, Markdown anywhere else."""
    from rich.console import Console

    console = console or Console()
    if not console.is_terminal:
        console.out(table.title + "\n\n" + to_markdown(table), highlight=False)
        for note in table.notes:
            console.out(_plain(note), highlight=False)
        console.out("", highlight=False)
        return
    from rich import box
    from rich.table import Table as RichTable
    from rich.text import Text

    width = None if wide else console.width
    lay = layout(table, width)
    if not lay.fits:
        _render_blocks(table, console)
        return
    out = RichTable(
        title=Text(table.title, style="bold"), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
        pad_edge=False, padding=(0, 1, 0, 0), header_style="bold",
    )  # fmt: skip
    for h, w, i in zip(lay.headers, lay.widths, lay.shown):
        right = table.columns[i].right
        out.add_column(
            "\n".join(wrap_cell(h, w)), justify="right" if right else "left", width=w, no_wrap=True,
        )  # fmt: skip
    for k, row in enumerate(table.rows):
        if k in table.sections:
            out.add_section()
        cells = [Text(_plain("\n".join(wrap_cell(row[i], w)))) for w, i in zip(lay.widths, lay.shown)]
        for cell in cells:
            for word, style in table.styles.items():
                cell.highlight_regex(rf"(?<![\w.-]){re.escape(word)}(?![\w.-])", style)
        out.add_row(*cells)
    if wide and lay.total() > console.width:
        console = Console(file=console.file, width=lay.total(), force_terminal=True,
                          color_system=console.color_system)  # fmt: skip
    console.print(out, highlight=False, crop=False)
    for line in [*lay.legend, *table.notes]:
        console.print(Text(_plain(line), style="dim"), highlight=False)


def _render_blocks(table: Table, console: Any) -> None:
    """A table too wide for the terminal even at its narrowest: one block per row, ``header: value`` lines."""
    from rich.text import Text

    width = max(20, console.width)
    console.print(Text(table.title, style="bold"), highlight=False)
    for row in table.rows:
        console.print()
        for line in wrap_cell(_plain(row[0]), width):
            console.print(Text(line, style="bold"), highlight=False)
        for col, value in zip(table.columns[1:], row[1:]):
            first, *rest = wrap_cell(f"{col.header}: {_plain(value)}", width - 2)
            console.print(Text("  " + first), highlight=False)
            for line in wrap_cell(" ".join(rest), width - 4) if rest else []:
                console.print(Text("    " + line), highlight=False)
    for line in table.notes:
        console.print(Text(_plain(line), style="dim"), highlight=False)
