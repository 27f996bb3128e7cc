"""docs/results.md is generated from docs/results/ by `python -m moerge.bench.results_doc`: never hand-edited."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_results_page_is_what_the_results_files_give():
    from moerge.bench.results_doc import render

    want = render(DOCS / "results")
    assert (DOCS / "results.md").read_text() == want, (
        "docs/results.md differs from the results files: run python -m moerge.bench.results_doc"
    )
    assert "## Synthetic suite" in want and "± " in want  # the 3-seed run is there, with intervals
