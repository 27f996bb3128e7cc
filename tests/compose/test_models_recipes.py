"""Co-LLM and CALM as recipes that compose whole models: listed with their survey taxonomy records, options
validated, and refused (with the API to use) wherever a recipe would route a library's experts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moerge.bench.config import RecipeSpec
from moerge.bench.runner import check_methods, default_methods
from moerge.cli import app
from moerge.errors import MalformedConfigError, RecipeNotApplicableError
from moerge.recipes import attach, get_recipe

# The survey's table (reference/moerging-methods.md): CALM Std|Mult|Mult|Task|N/A|None|Out|Mult|Full,
# Co-LLM Cus|Priv|Tgt|Step|Mdl|Sp|None|ID|Full.
RECORDS = {
    "calm": ["standard", "multiple", "multiple", "task", "n/a", "none", "output", "multiple", "full"],
    "co_llm": ["custom", "private", "target", "step", "model", "sparse", "none", "in-distribution", "full"],
}


def test_listed_by_moerge_recipes_with_the_survey_records():
    rows = {r["recipe"]: r for r in json.loads(CliRunner().invoke(app, ["recipes", "--json"]).stdout)}
    from moerge.recipes import AXES

    for name, record in RECORDS.items():
        assert [rows[name][a] for a in AXES] == record
        assert "arXiv" in rows[name]["paper"]


def test_options_are_the_compose_configs():
    assert get_recipe("co-llm").parse_options({"threshold": 0.2, "steps": 10}).threshold == 0.2
    with pytest.raises(MalformedConfigError, match="threshold"):
        get_recipe("co_llm").parse_options({"threshold": 2})
    opts = get_recipe("calm").parse_options({"anchor_layers": [0], "augmenting_layers": [1], "steps": 5})
    assert opts.anchor_layers == [0] and opts.steps == 5
    with pytest.raises(MalformedConfigError, match="pair up"):
        get_recipe("calm").parse_options({"anchor_layers": [0, 1], "augmenting_layers": [1]})


def test_refused_where_experts_are_routed(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    assert not {"co_llm", "calm"} & {s.recipe for s in default_methods()}  # not run on expert suites
    for name in ("co_llm", "calm"):
        with pytest.raises(RecipeNotApplicableError, match="moerge.compose"):
            check_methods([RecipeSpec(name, name)])
        with pytest.raises(RecipeNotApplicableError, match="two whole models"):
            attach(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), [], name)
