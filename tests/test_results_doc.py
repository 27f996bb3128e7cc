"""docs/results.md is generated from docs/results/ by `python -m moerge.bench.results_doc`: never hand-edited;
so are the `<!-- results: NAME … -->` blocks of the other pages."""

from __future__ import annotations

from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_results_page_is_what_the_results_files_give():
    from moerge.bench.results_doc import render

    want = render(DOCS / "results")
    assert (DOCS / "results.md").read_text() == want, (
        "docs/results.md differs from the results files: run python -m moerge.bench.results_doc"
    )
    assert "## Synthetic suite" in want and "± " in want  # the 3-seed run is there, with intervals


def test_results_blocks_in_pages_are_what_the_results_files_give():
    from moerge.bench.results_doc import block_pages, rewrite_blocks

    pages = block_pages(DOCS)
    assert {p.name for p in pages} >= {"routing.md", "build-moe.md"}
    for page in pages:
        assert page.read_text() == rewrite_blocks(page.read_text(), DOCS / "results"), (
            f"the results blocks of {page} differ from the results files: run python -m moerge.bench.results_doc"
        )


# ---------------------------------------------------------------------------------------------- a tiny fixture
def _results(command: str):
    """A hand-made run: one held-in and one switching task; base, oracle and one trained recipe."""
    from moerge.bench.results import BenchResults, MethodResult, TaskResult

    tasks = [
        {"name": "t_in", "split": "held_in", "condition": "in_distribution", "metric": "exact_match"},
        {"name": "t_sw", "split": "held_out", "condition": "switching", "metric": "exact_match"},
    ]
    scores = {"base": (0.0, 0.0), "oracle": (1.0, 1.0), "rec": (0.25, 0.75)}
    results = [
        TaskResult(
            method=m,
            task=t["name"],
            split=t["split"],
            condition=t["condition"],
            metric="exact_match",
            score=s,
            normalized=s,
            routing_accuracy=0.5 if m == "rec" else None,
        )  # fmt: skip
        for m, pair in scores.items()
        for t, s in zip(tasks, pair)
    ]
    methods = [
        MethodResult(name="base", kind="baseline"),
        MethodResult(name="oracle", kind="baseline"),
        MethodResult(
            name="rec", kind="recipe", user_data="zero-shot", router_train_s=3.5, trainable_parameters=1234
        ),
    ]
    env = {"command": command, "started": "2026-01-02T03:04:05+00:00", "torch": "9.9", "threads": 1,
           "device": "cpu", "python": "3.11", "machine": "x86_64"}  # fmt: skip
    return BenchResults(suite="toy", experts=["e0", "e1"], tasks=tasks, methods=methods, results=results,
                        config={}, environment=env, wall_s=12.0)  # fmt: skip


@pytest.fixture
def docs(tmp_path):
    """A docs folder: results/toy/results.json, a page holding one stale block, and an up-to-date results.md."""
    from moerge.bench.results_doc import render

    folder = tmp_path / "docs" / "results" / "toy"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(
        _results("moerge bench --recipe rec --out docs/results/toy").model_dump_json()
    )
    (tmp_path / "docs" / "page.md").write_text(
        PAGE.format(body="| old | table |\n|---|---|\n| stale | 0.1 |")
    )
    (tmp_path / "docs" / "results.md").write_text(render(tmp_path / "docs" / "results"))
    return tmp_path / "docs"


PAGE = """# A page

Text before, kept as it is: | a | b |.

<!-- results: toy held-in, train s -->

{body}

<!-- /results -->

Text after, also kept.
"""

EXPECTED = """| method | held-in | train s |
|---|---|---|
| base | +0.00 | — |
| oracle | +1.00 | — |
| rec | +0.25 | 3.5 |

Generated from the results of `moerge bench --recipe rec --out docs/results/toy` (started 2026-01-02T03:04:05+00:00) \
by `python -m moerge.bench.results_doc`; torch 9.9, 1 thread(s), cpu, Python 3.11 on x86_64; benchmark wall time per \
seed (suite builds not included): 12 s. Data: `{folder}/`."""


def test_block_rewritten_from_its_results_and_text_outside_untouched(docs):
    from moerge.bench.results_doc import rewrite_blocks

    page = (docs / "page.md").read_text()
    got = rewrite_blocks(page, docs / "results")
    assert got == PAGE.format(body=EXPECTED.format(folder=docs / "results" / "toy"))
    assert rewrite_blocks(got, docs / "results") == got  # a fresh block is left as it is


def test_every_column_when_none_named_and_two_blocks(docs):
    from moerge.bench.results_doc import rewrite_blocks

    page = "<!-- results: toy -->\n<!-- /results -->\nmiddle\n<!-- results: toy switching, route acc in -->\n<!-- /results -->\n"
    got = rewrite_blocks(page, docs / "results")
    first, second = got.split("middle")
    assert "| method | user data | held-in | switching | route acc in |" in first
    assert "| rec | zero | +0.25 | +0.75 | 0.50 |" in first
    assert "| method | switching | route acc in |\n|---|---|---|\n| base | +0.00 | — |" in second
    assert "| rec | +0.75 | 0.50 |" in second


def test_check_finds_a_stale_block_and_the_rewrite_fixes_it(docs, capsys):
    from moerge.bench.results_doc import main

    assert main(["--check", "--docs", str(docs)]) == 1
    assert f"{docs / 'page.md'} is out of date" in capsys.readouterr().err
    before = (docs / "page.md").read_text()
    assert main(["--docs", str(docs)]) == 0
    after = (docs / "page.md").read_text()
    assert after != before and "| rec | +0.25 | 3.5 |" in after
    assert main(["--check", "--docs", str(docs)]) == 0


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("<!-- results: nosuch -->\n<!-- /results -->", "results block 'nosuch': no "),
        (
            "<!-- results: toy held-in, speed -->\n<!-- /results -->",
            "no column 'speed'; the columns are: user data",
        ),
        ("<!-- results: toy -->\nno end\n", "has no closing <!-- /results --> line"),
        ("<!-- results: ../results/toy -->\n<!-- /results -->", "results block '../results/toy'"),
        ("<!-- results: toy -->\n<!-- results: toy -->\n<!-- /results -->", "block at line 3 has no closing"),
        ("text\n<!-- /results -->", "line 4: <!-- /results --> closes no results block"),
    ],
)
def test_unknown_name_or_column_or_unclosed_block_is_one_clear_error(docs, capsys, block, message):
    from moerge.bench.results_doc import main

    page = docs / "page.md"
    page.write_text(f"intro\n\n{block}\n")
    assert main(["--docs", str(docs)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert page.read_text() == f"intro\n\n{block}\n"  # nothing written
    if "nosuch" in block:
        assert "--out" in err and "name one of: toy" in err


def test_a_scripts_tables_file_in_a_block(docs, monkeypatch):
    """A benchmark script's ``--json`` (`write_tables`): table KEY of docs/results/NAME/tables.json."""
    from moerge.bench.results_doc import rewrite_blocks, write_tables
    from moerge.errors import UnknownNameError

    monkeypatch.setattr("sys.argv", ["benchmarks/script.py", "--seed", "0"])
    header = ["model", "exact match", "deferral rate"]
    rows = [["base alone", "0.000", "0"], ["Co-LLM, threshold 0.5", "0.815", "0.41"]]
    write_tables(docs / "results" / "script" / "tables.json", {"co-llm": (header, rows)}, wall_s=61.0)
    got = rewrite_blocks("<!-- results: script/co-llm exact match -->\n<!-- /results -->\n", docs / "results")
    assert (
        "| model | exact match |\n|---|---|\n| base alone | 0.000 |\n| Co-LLM, threshold 0.5 | 0.815 |\n"
        in got
    )
    assert "`python benchmarks/script.py --seed 0`" in got and "wall time 61 s" in got
    with pytest.raises(UnknownNameError, match=r"name one of: script/co-llm, toy"):
        rewrite_blocks("<!-- results: script/calm -->\n<!-- /results -->\n", docs / "results")


def test_block_syntax_shown_in_fenced_code_is_left_alone(docs):
    from moerge.bench.results_doc import rewrite_blocks

    page = "```markdown\n<!-- results: nosuch -->\n<!-- /results -->\n```\n\n<!-- results: toy switching -->\n<!-- /results -->\n"
    got = rewrite_blocks(page, docs / "results")
    assert got.startswith(
        "```markdown\n<!-- results: nosuch -->\n<!-- /results -->\n```\n\n<!-- results: toy switching -->\n\n"
    )
    assert "| rec | +0.75 |" in got and got.endswith("\n\n<!-- /results -->\n")
