"""User suites on disk (suite.yaml + JSONL): loading, round trips and clear errors for bad input."""

from __future__ import annotations

import json
import textwrap

import pytest

from moerge.bench.metrics import evaluate_task
from moerge.bench.suites.format import Example, load_jsonl_suite, write_jsonl_suite
from moerge.errors import SuiteError

SUITE_YAML = """\
name: my-suite
base_model: base
library: library
tasks:
  - name: reverse
    split: held_in
    expert: reverse-lora
    train: reverse.train.jsonl
    eval: reverse.eval.jsonl
  - name: upper
    split: held_in
    expert: upper-lora
    eval: upper.eval.jsonl
  - name: mixed
    split: held_out
    condition: switching
    experts: [reverse-lora, upper-lora]
    eval: mixed.eval.jsonl
  - name: prose
    split: held_out
    condition: unrelated
    metric: nll
    eval: prose.eval.jsonl
"""


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def user_suite(tmp_path):
    folder = tmp_path / "my-suite"
    folder.mkdir()
    (folder / "suite.yaml").write_text(SUITE_YAML)
    write_rows(folder / "reverse.train.jsonl", [{"prompt": "abc=", "completion": "cba"}] * 3)
    write_rows(folder / "reverse.eval.jsonl", [{"prompt": "xyz=", "completion": "zyx"}])
    write_rows(folder / "upper.eval.jsonl", [{"prompt": "ab:", "completion": "AB"}])
    mixed = {
        "text": "ab=ba cd:CD",
        "targets": [[3, 5], [9, 11]],
        "routing": [
            {"start": 0, "end": 5, "experts": ["reverse-lora"]},
            {"start": 6, "end": 11, "experts": ["upper-lora"]},
        ],
    }
    write_rows(folder / "mixed.eval.jsonl", [mixed])
    write_rows(folder / "prose.eval.jsonl", [{"text": "hello world"}, "plain string rows work too"])
    return folder


def test_load_user_suite(user_suite):
    suite = load_jsonl_suite(user_suite)
    assert suite.name == "my-suite" and suite.experts == ["reverse-lora", "upper-lora"]
    assert suite.base_model == str((user_suite / "base").resolve())
    assert [t.name for t in suite.held_in] == ["reverse", "upper"]
    rev = suite.task("reverse")
    assert rev.condition == "in_distribution" and rev.ceiling == 1.0 and rev.oracle_expert == "reverse-lora"
    assert rev.training_rows() == [{"prompt": "abc=", "completion": "cba"}] * 3
    ex = rev.eval[0]
    assert ex.completions() == ["zyx"] and ex.char_experts() == [("reverse-lora",)] * 7
    mixed = suite.task("mixed")
    assert mixed.condition == "switching" and mixed.eval[0].completions() == ["ba", "CD"]
    assert mixed.eval[0].char_experts()[5] == ()
    prose = suite.task("prose")
    assert prose.metric == "nll" and prose.ceiling is None and not prose.higher_is_better
    assert prose.eval[0].targets == [(0, 11)] and prose.eval[0].routing == []


def test_round_trip(user_suite, tmp_path):
    suite = load_jsonl_suite(user_suite)
    out = write_jsonl_suite(suite, tmp_path / "copy", base_model="base", library="library")
    again = load_jsonl_suite(out)
    assert [t.model_dump() for t in again.tasks] == [t.model_dump() for t in suite.tasks]
    assert again.experts == suite.experts and again.base_model == str((out / "base").resolve())


def test_evaluate_plain_model(user_suite, char_tokenizer):
    """A model that always predicts the right next character scores 1.0 exact match and the NLL we compute."""
    import torch

    suite = load_jsonl_suite(user_suite)

    class Oracle(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            logits = torch.full((*input_ids.shape, len(char_tokenizer)), -10.0)
            logits[:, :-1].scatter_(-1, input_ids[:, 1:].unsqueeze(-1), 10.0)
            return type("Out", (), {"logits": logits})()

    assert evaluate_task(Oracle(), char_tokenizer, suite.task("mixed")) == 1.0
    assert evaluate_task(Oracle(), char_tokenizer, suite.task("reverse")) == 1.0
    nll = evaluate_task(Oracle(), char_tokenizer, suite.task("prose"))
    V = len(char_tokenizer)
    expected = -torch.log_softmax(torch.tensor([10.0] + [-10.0] * (V - 1)), 0)[0].item()
    assert nll == pytest.approx(expected, rel=1e-5)


def edit_yaml(folder, old, new):
    text = (folder / "suite.yaml").read_text()
    assert old in text
    (folder / "suite.yaml").write_text(text.replace(old, new))


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("    expert: upper-lora\n", "", r"tasks\.1.*held-in task 'upper' needs `expert:`"),
        (
            "split: held_out\n    condition: switching",
            "split: heldout\n    condition: switching",
            r"tasks\.2\.split",
        ),
        ("name: prose", "name: reverse", "two tasks are named 'reverse'"),
        ("eval: upper.eval.jsonl", "eval: nope.jsonl", r"nope\.jsonl: no such task file"),
        ("metric: nll", "metric: bleu", r"tasks\.3\.metric"),
        (
            "    eval: prose.eval.jsonl",
            "    eval: prose.eval.jsonl\n    weight: 2",
            r"tasks\.3\.weight: Extra inputs",
        ),
        ("tasks:", "tasks: [", "not valid YAML"),
    ],
)
def test_bad_suite_yaml(user_suite, old, new, message):
    edit_yaml(user_suite, old, new)
    with pytest.raises(SuiteError, match=message):
        load_jsonl_suite(user_suite)


def test_unknown_expert(user_suite):
    text = (
        (user_suite / "suite.yaml")
        .read_text()
        .replace("name: my-suite\n", "name: my-suite\nexperts: [a, b]\n")
    )
    (user_suite / "suite.yaml").write_text(text)
    with pytest.raises(SuiteError, match="names expert 'reverse-lora', which is not in `experts:`"):
        load_jsonl_suite(user_suite)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "completion": ', r"upper\.eval\.jsonl:2: not valid JSON"),
        (
            '{"prompt": "a"}',
            r'upper\.eval\.jsonl:2: a prompt/completion row needs string "prompt" and "completion"',
        ),
        ('{"question": "a"}', r'upper\.eval\.jsonl:2: a row needs "prompt"/"completion" or "text"'),
        (
            '{"text": "abc", "targets": [[1, 9]]}',
            r"upper\.eval\.jsonl:2: .*target span \(1, 9\) is not inside",
        ),
        ('{"text": "abc", "routing": [{"start": 2, "end": 1, "experts": ["x"]}]}', r"routing span \(2, 1\)"),
        ("[1, 2]", r"upper\.eval\.jsonl:2: expected a JSON object, found list"),
    ],
)
def test_bad_jsonl_rows(user_suite, line, message):
    path = user_suite / "upper.eval.jsonl"
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(SuiteError, match=message):
        load_jsonl_suite(user_suite)


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(SuiteError, match="no such suite folder"):
        load_jsonl_suite(tmp_path / "nope")
    with pytest.raises(SuiteError, match="no suite.yaml"):
        load_jsonl_suite(tmp_path)
    (tmp_path / "suite.yaml").write_text("- just\n- a list\n")
    with pytest.raises(SuiteError, match="expected a mapping"):
        load_jsonl_suite(tmp_path)
    (tmp_path / "suite.yaml").write_text(
        textwrap.dedent("""\
        name: x
        tasks:
          - {name: a, split: held_out, eval: empty.jsonl}
        """)
    )
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SuiteError, match=r"empty\.jsonl: the file holds no examples"):
        load_jsonl_suite(tmp_path)


def test_example_from_prompt_labels():
    ex = Example.from_prompt("ab>", "BA", ["e1"])
    assert (
        ex.text == "ab>BA"
        and ex.targets == [(3, 5)]
        and ex.as_training_row() == {"prompt": "ab>", "completion": "BA"}
    )
    assert Example.from_row(ex.to_row()) == ex


def test_validation_split_round_trips(tmp_path):
    from moerge.bench.suites.format import Suite, Task

    ex = Example.from_prompt("ab>", "ba", ["e"])
    task = Task(name="t", split="held_in", experts=["e"], train=[ex], validation=[ex, ex], eval=[ex])
    write_jsonl_suite(Suite(name="s", tasks=[task], experts=["e"]), tmp_path / "s")
    again = load_jsonl_suite(tmp_path / "s").task("t")
    assert [e.text for e in again.validation] == ["ab>ba", "ab>ba"] and len(again.train) == 1
