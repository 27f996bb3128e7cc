"""Real-text domains: passage cutting, deterministic document-level splits, domain-switch labels."""

from __future__ import annotations

import importlib.util

import pytest
from real_optional import needs_gguf

from moerge.bench.suites import real_text as rt
from moerge.bench.suites.real_text import DomainSpec, RealTextConfig, build_real_text, passages_from

needs_chatterbot = pytest.mark.skipif(
    importlib.util.find_spec("chatterbot_corpus") is None,
    reason="chatterbot-corpus missing: pip install chatterbot-corpus",
)


def test_passages_pack_short_documents_and_cut_long_ones():
    short = [f"item {i}" for i in range(20)]  # 6-7 characters each
    packed = passages_from(short, passage_chars=40, limit=100)
    assert "\n\n".join(packed).replace("\n\n", "\n").split("\n") == [s for s in short if s]
    assert all(20 <= len(p) <= 40 for p in packed[:-1])
    long = ["\n".join(f"line {i:03d} of a long file" for i in range(50))]
    cut = passages_from(long, passage_chars=100, limit=100)
    assert all(len(p) <= 100 for p in cut) and len(cut) >= 10
    assert passages_from(long, passage_chars=100, limit=3) == cut[:3]
    one_line = passages_from(["x" * 250], passage_chars=100, limit=10)
    assert one_line == ["x" * 100, "x" * 100, "x" * 50]


def test_document_window_is_whole_lines_of_about_the_budget_from_a_seeded_start():
    import random

    text = "\n".join(f"line {i:03d}" for i in range(100))  # 9 characters a line with its line break
    a = rt.document_window(text, 45, random.Random(3))
    assert a == rt.document_window(text, 45, random.Random(3))  # seeded
    lines = a.split("\n")
    assert 1 <= len(a) <= 45 and len(lines) == 5 and all(line in text.split("\n") for line in lines)
    assert "\n".join(lines) in text  # consecutive lines
    starts = {rt.document_window(text, 45, random.Random(s)).split("\n")[0] for s in range(20)}
    assert len(starts) > 5  # not always the head of the document
    assert rt.document_window("short", 45, random.Random(0)) == "short"
    assert rt.document_window(text, None, random.Random(0)) == text


def _fake_reader(n_docs: int):
    docs = [(f"doc{i:03d}", f"document {i}\n" + "word " * (10 + i % 7)) for i in range(n_docs)]
    return lambda: rt.SourceDocs(rt._text_docs(docs), {"fake": "1.0"})


def test_split_is_deterministic_and_document_level(monkeypatch):
    monkeypatch.setitem(rt.READERS, "fake_a", _fake_reader(50))
    monkeypatch.setitem(rt.READERS, "fake_b", _fake_reader(40))
    monkeypatch.setitem(rt.READERS, "fake_c", _fake_reader(30))
    domains = [
        DomainSpec(name="a", reader="fake_a", split="held_in", condition="in_distribution"),
        DomainSpec(name="b", reader="fake_b", split="held_in", condition="in_distribution"),
        DomainSpec(name="c", reader="fake_c", split="held_out", condition="unrelated"),
    ]
    config = RealTextConfig(
        passage_chars=80,
        train_passages=20,
        eval_passages=5,
        validation_passages=3,
        switch_docs=6,
        domains=domains,
    )
    first, again = build_real_text(config), build_real_text(config)
    other_seed = build_real_text(config.model_copy(update={"seed": 1}))

    def docs(passages):
        return {line for p in passages for line in p.split("\n") if line.startswith("document")}

    for name in "abc":
        d = first.domains[name]
        assert (d.train, d.validation, d.eval) == (
            again.domains[name].train,
            again.domains[name].validation,
            again.domains[name].eval,
        )
        train_docs, val_docs, eval_docs = docs(d.train), docs(d.validation), docs(d.eval)
        assert eval_docs and not train_docs & eval_docs
        assert not val_docs & train_docs and not val_docs & eval_docs  # three disjoint sets of documents
        assert bool(train_docs) == (name != "c")  # held-out domains have no training text
        assert len(d.validation) == (3 if name != "c" else 0)  # nor validation text
    no_val = build_real_text(config.model_copy(update={"validation_passages": 0}))
    assert no_val.domains["a"].validation == [] and no_val.domains["a"].eval == first.domains["a"].eval
    # the validation documents are carved from the training side: without them they are trained on
    assert docs(first.domains["a"].validation) <= docs(no_val.domains["a"].train)
    assert other_seed.domains["a"].eval != first.domains["a"].eval
    assert first.domains["c"].train == [] and first.versions() == {"fake": "1.0"}
    assert len(first.switch) == 6
    for doc in first.switch:
        (s0, e0, d0), (s1, e1, d1) = doc.spans
        assert s0 == 0 and e0 == s1 and e1 == len(doc.text) and d0 != d1 and {d0, d1} <= {"a", "b"}
        assert doc.text[:e0].rstrip("\n") in "\n\n".join(first.domains[d0].eval)
        assert doc.text[s1:] in "\n\n".join(first.domains[d1].eval)
    # Target splits: a held-out domain's come from documents after its eval ones (none in eval), as many
    # passages as an expert's training split; held-in domains use their training passages instead.
    c = first.domains["c"]
    assert len(c.target) == 20 and c.target == again.domains["c"].target
    assert docs(c.target) and not docs(c.target) & docs(c.eval)
    assert not set(c.target) & set(c.eval) and len(set(c.target)) == len(c.target)  # nor the same text twice
    assert first.domains["a"].target == [] and first.domains["b"].target == []
    few = build_real_text(config.model_copy(update={"target_passages": 4}))
    assert few.domains["c"].target == c.target[:4] and few.domains["c"].eval == c.eval
    # domain_switch's target documents: halves of held-in *training* passages, none an eval document
    assert len(first.switch_target) == 20 and len(few.switch_target) == 4
    assert not {d.text for d in first.switch_target} & {d.text for d in first.switch}
    for doc in first.switch_target:
        (s0, e0, d0), (s1, e1, d1) = doc.spans
        assert s0 == 0 and e0 == s1 and e1 == len(doc.text) and d0 != d1
        assert doc.text[:e0].rstrip("\n") in "\n\n".join(first.domains[d0].train)
        assert doc.text[s1:] in "\n\n".join(first.domains[d1].train)
    # the target splits are generated on load: they change neither the cache key nor the other splits
    assert rt.suite_key(config, first) == rt.suite_key(config.model_copy(update={"target_passages": 4}), few)


def test_missing_source_names_the_install_command(monkeypatch):
    def missing():
        raise rt._missing("fortunes", "/usr/share/games/fortunes", "apt-get install fortunes")

    monkeypatch.setitem(rt.READERS, "fortunes", missing)
    config = RealTextConfig(domains=[d for d in rt.DEFAULT_DOMAINS if d.name == "fortunes"])
    with pytest.raises(rt.SourceMissingError, match="apt-get install fortunes"):
        build_real_text(config)
    assert "apt-get install fortunes" in rt.missing_sources(config)["fortunes"]


def test_default_domains_cover_the_required_conditions():
    config = RealTextConfig.reduced()
    held_in = [d for d in config.domains if d.split == "held_in"]
    held_out = [d for d in config.domains if d.split == "held_out"]
    assert len(held_in) >= 8 and len(held_out) >= 3
    assert {d.condition for d in held_out} == {"near", "unrelated"}  # "switching" is the domain_switch task
    assert all(c in {d.name for d in held_in} for d in held_out for c in d.close_to)


@needs_chatterbot
def test_chatterbot_domains_read_installed_dialogs():
    config = RealTextConfig.reduced(
        domains=[d for d in rt.DEFAULT_DOMAINS if d.name in {"chitchat", "trivia", "foreign_dialogs"}]
    )
    data = build_real_text(config)
    assert data.versions()["chatterbot-corpus"]
    ts = data.domains["chitchat"]
    assert len(ts.train) == 60 and len(ts.eval) == 12 and ts.n_documents > 300
    assert all("A: " in p or "B: " in p for p in ts.train)  # dialogs rendered as A:/B: turns
    assert not set(ts.train) & set(ts.eval)


def test_suite_has_nll_tasks_with_domain_routing_labels(monkeypatch, tiny_llama_dir):
    from transformers import AutoTokenizer

    from moerge.bench.suites.real_text import real_text_suite

    for name, n in (("fake_a", 30), ("fake_b", 30), ("fake_c", 20), ("fake_d", 20)):
        monkeypatch.setitem(rt.READERS, name, _fake_reader(n))
    domains = [
        DomainSpec(name="a", reader="fake_a", split="held_in", condition="in_distribution"),
        DomainSpec(name="b", reader="fake_b", split="held_in", condition="in_distribution"),
        DomainSpec(name="near_a", reader="fake_c", split="held_out", condition="near", close_to=["a"]),
        DomainSpec(name="far", reader="fake_d", split="held_out", condition="unrelated"),
    ]
    config = RealTextConfig(
        passage_chars=80, train_passages=8, eval_passages=4, switch_docs=3, domains=domains
    )
    suite = real_text_suite(config, base_model="some/base")
    assert suite.experts == ["a", "b"] and suite.base_model == "some/base"
    assert suite.task_names("held_in") == ["a", "b"]
    assert suite.task_names("held_out") == ["near_a", "far", "domain_switch"]
    assert all(t.metric == "nll" for t in suite.tasks)
    assert suite.info["source_versions"] == {"fake": "1.0"} and suite.info["form"] == "custom"
    a, near, far, switch = (suite.task(n) for n in ("a", "near_a", "far", "domain_switch"))
    assert len(a.train) == 8 and [
        r.get("prompt", "") + r.get("completion", r.get("text", "")) for r in a.training_rows()
    ] == [e.text for e in a.train]
    assert all(ex.char_experts() == [("a",)] * len(ex.text) for ex in a.eval)
    assert all(ex.char_experts() == [("a",)] * len(ex.text) for ex in near.eval)
    assert all(ex.routing == [] for ex in far.eval) and far.train == []
    # target splits: held-out tasks carry their own (labelled like their eval), held-in ones use train
    data = build_real_text(config)
    assert [e.text for e in near.target] == data.domains["near_a"].target and len(near.target) == 8
    assert all(ex.char_experts() == [("a",)] * len(ex.text) for ex in near.target)
    assert [e.text for e in far.target] == data.domains["far"].target and far.target_examples() == far.target
    assert [e.text for e in switch.target] == [d.text for d in data.switch_target] and len(switch.target) == 8
    assert a.target == [] and a.target_examples() == a.train
    for t in (near, far, switch):
        assert not {e.text for e in t.target} & {e.text for e in t.eval}
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))  # character-level: one token per character
    docs = build_real_text(config).switch
    batches = list(switch.eval_batches(tok, batch_size=1, experts=suite.experts))
    assert len(docs) == len(batches) == 3
    for batch, doc in zip(batches, docs):
        ex = batch.examples[0]
        (_, e0, d0), (_, _, d1) = doc.spans
        assert ex.text == doc.text and ex.targets == [(0, len(ex.text))]
        routes = batch.routes[0, 1 : len(ex.text) + 1]  # after <bos>
        want = [suite.experts.index(d0)] * e0 + [suite.experts.index(d1)] * (len(ex.text) - e0)
        assert routes.float().argmax(-1).tolist() == want and routes.sum(-1).eq(1).all()


@needs_gguf
def test_built_suite_trains_one_expert_per_domain_on_a_gguf_base(monkeypatch, tmp_path, tiny_gguf_file):
    import json
    from pathlib import Path

    from moerge.bench.suites.real_text import build_real_text_suite
    from moerge.experts.fingerprint import fingerprint_model
    from moerge.train.gates import GATES_KIND, gates_config
    from moerge.train.lora import TrainConfig
    from moerge.transforms.centroids import HIDDEN_CONFIG, HIDDEN_KIND

    monkeypatch.setenv("MOERGE_CACHE", str(tmp_path / "cache"))  # the dequantised base goes here
    for name, n in (("fake_a", 24), ("fake_b", 24), ("fake_c", 12)):
        monkeypatch.setitem(rt.READERS, name, _fake_reader(n))
    domains = [
        DomainSpec(name="a", reader="fake_a", split="held_in", condition="in_distribution"),
        DomainSpec(name="b", reader="fake_b", split="held_in", condition="in_distribution"),
        DomainSpec(name="c", reader="fake_c", split="held_out", condition="unrelated"),
    ]
    train = TrainConfig(steps=2, batch_size=2, seq_len=32, rank=2, alpha=4.0, layers=[-1], progress=False)
    config = RealTextConfig(
        passage_chars=60, train_passages=4, eval_passages=2, validation_passages=2, switch_docs=2,
        domains=domains, base_model=str(tiny_gguf_file[0]), expert=train, multitask=train, gate_steps=3,
        progress=False,
    )  # fmt: skip
    suite = build_real_text_suite(config, root=tmp_path / "suites")
    assert suite.experts == ["a", "b"] and suite.task_names("held_out") == ["c", "domain_switch"]
    assert [len(suite.task(n).validation) for n in ("a", "b", "c")] == [2, 2, 0]  # written and read back
    lib, baselines = suite.open_library(), suite.library.replace("library", "baselines")
    assert lib.names() == ["a", "b"] and "multitask" in type(lib).open(baselines)
    model, _ = suite.load_base()  # the dequantised cache folder, as a plain transformers folder
    assert lib.base_fingerprint == fingerprint_model(model) == suite.info["base_fingerprint"]
    meta = lib.get_metadata("a")
    assert meta.training["steps"] == 2 and meta.task == "a" and meta.training["frozen_prefix_layers"] == 1
    assert {m.split(".")[2] for m in lib.get("a").lora} == {"1"}  # the top layer of two only
    # the contributors' signatures are in the library: gates at the configured steps, hidden centroids
    for name in ("a", "b"):
        gates, info = lib.get_artifact(GATES_KIND, gates_config(3), name)
        assert set(gates) == set(lib.get(name).lora) and info["steps"] == 3 and info["batch_size"] == 2
        assert lib.get_artifact(HIDDEN_KIND, HIDDEN_CONFIG, name) is not None
    build = json.loads((Path(suite.root) / "build.json").read_text())
    premise = build["premise"]
    assert premise["experts"] == ["a", "b"] and len(premise["modules"]) == 7
    assert set(premise["top1"]) == {"arrow", "phatgoose", "average_activation"}
    assert set(premise["verdicts"]) == set(premise["top1"])
    scores = build["scores"]
    assert set(scores["validation"]) == {"base", "a", "b", "multitask"} and set(scores["per_expert"]) == {
        "a",
        "b",
    }
    assert set(scores["validation"]["a"]) == {"a", "b"}  # the held-in domains' validation passages
    delta = scores["validation"]["a"]["a"] - scores["validation"]["base"]["a"]
    assert scores["per_expert"]["a"]["own_delta"] == pytest.approx(delta, abs=1e-3)
    assert build["gates"]["a"]["steps"] == 3 and set(build["timings_s"]) >= {
        "experts",
        "signatures",
        "premise",
    }
    # The benchmark runs the frozen layer once per passage for every method: the same scores as without.
    from moerge.bench.runner import BenchConfig, run_bench

    bench = dict(recipes=["arrow", "phatgoose:gate_steps=3", "average_activation"], limit=2, progress=False,
                 baselines=["base", "oracle", "uniform_merge", "ties", "multitask"])  # fmt: skip
    bench["merges"] = {"validation_limit": 1, "methods": [
        {"method": "linear", "name": "uniform_merge", "params": {"normalize": True}},
        {"method": "ties", "params": {"density": 0.2, "scale": 1.0}, "grid": {"scale": [0.5, 1.0], "density": [0.5]}},
    ]}  # fmt: skip
    fast = run_bench(suite, BenchConfig(**bench))
    slow = run_bench(suite, BenchConfig(**bench, cache_prefix=False))
    assert any("ran once per distinct input row" in n for n in fast.notes)
    assert not any("ran once per distinct input row" in n for n in slow.notes)
    scores = [(r.method, r.task, r.status) for r in fast.results]
    assert scores == [(r.method, r.task, r.status) for r in slow.results] and len(scores) > 20
    for a, b in zip(fast.results, slow.results):
        assert a.score == pytest.approx(b.score, abs=1e-4), (a.method, a.task)
    assert fast.premise["mean"] == pytest.approx(slow.premise["mean"], abs=1e-4)
    again = build_real_text_suite(config, root=tmp_path / "suites")  # cached: nothing is retrained
    assert again.root == suite.root and len(list((tmp_path / "suites").iterdir())) == 1
    # the target splits are written with the suite and the same when it is loaded from the cache
    assert (Path(suite.root) / "tasks" / "c.target.jsonl").is_file()
    want = build_real_text(config).domains["c"].target
    assert [e.text for e in suite.task("c").target] == [e.text for e in again.task("c").target] == want

    # Interrupted at the multitask LoRA (after both experts), the build resumes elsewhere to the same suite: the
    # multitask LoRA and the gates use prefix states the experts kept in the uninterrupted build.
    import torch

    from moerge.train import lora

    class Stop(BaseException):
        pass

    trained, real = [], lora.train_expert

    def counted(*a, **k):
        if len(trained) == 2 and not resumed:
            raise Stop
        trained.append(k["name"])
        return real(*a, **k)

    resumed = False
    monkeypatch.setattr(lora, "train_expert", counted)
    with pytest.raises(Stop):
        build_real_text_suite(config, root=tmp_path / "other")
    resumed = True
    other = build_real_text_suite(config, root=tmp_path / "other")
    assert trained == ["a", "b", "multitask"]  # the experts were not trained again
    for kind, names in (("library", ["a", "b"]), ("baselines", ["multitask"])):
        la, lb = (type(lib).open(Path(s.root) / kind) for s in (suite, other))
        for name in names:
            ea, eb = la.get(name), lb.get(name)
            assert all(torch.equal(ea.lora[m].B, eb.lora[m].B) for m in ea.lora), name
    ja, jb = (json.loads((Path(s.root) / "build.json").read_text()) for s in (suite, other))
    assert jb["resumed"] == ["expert-a", "expert-b"]
    for j in (ja, jb):
        for key in ("timings_s", "resumed"):
            j.pop(key)
        for training in [*j["experts"].values(), j["multitask"]]:
            training.pop("seconds")
    assert ja == jb


def test_a_suite_built_before_target_splits_gets_them_on_load(monkeypatch, tmp_path):
    """A real-text suite folder written without target splits (an older build): `with_targets` and
    ``moerge bench --suite FOLDER`` add them from the installed text — only to a task whose eval passages are the
    ones that text gives (else the target documents could be eval documents of the folder)."""
    from moerge.bench.suites.format import load_jsonl_suite, write_jsonl_suite
    from moerge.bench.suites.real_text import real_text_suite, with_targets
    from moerge.cli.bench import _load_suite

    for name, n in (("fake_a", 20), ("fake_b", 20), ("fake_c", 20)):
        monkeypatch.setitem(rt.READERS, name, _fake_reader(n))
    domains = [
        DomainSpec(name="a", reader="fake_a", split="held_in", condition="in_distribution"),
        DomainSpec(name="b", reader="fake_b", split="held_in", condition="in_distribution"),
        DomainSpec(name="c", reader="fake_c", split="held_out", condition="unrelated"),
    ]
    monkeypatch.setattr(rt, "DEFAULT_DOMAINS", domains)  # the domains a folder's recorded config stands for
    config = RealTextConfig(
        passage_chars=80,
        train_passages=6,
        eval_passages=3,
        validation_passages=2,
        switch_docs=2,
        progress=False,
    )
    data = build_real_text(config)
    full = real_text_suite(config, base_model="some/base", data=data)
    old = full.model_copy(update={"tasks": [t.model_copy(update={"target": []}) for t in full.tasks]})
    write_jsonl_suite(old, tmp_path / "old")
    loaded = load_jsonl_suite(tmp_path / "old")
    assert all(t.target == [] for t in loaded.tasks)
    for got in (with_targets(loaded, data), with_targets(loaded), _load_suite(str(tmp_path / "old"), False, None,
                                                                               False, False)[0]):  # fmt: skip
        for t in got.tasks:
            assert [e.text for e in t.target] == [e.text for e in full.task(t.name).target], t.name
        assert [e.text for e in got.task("c").target] == data.domains["c"].target and data.domains["c"].target
    # another eval passage than the installed text gives (the text changed since the build): no target split
    c = loaded.task("c")
    changed = c.model_copy(update={"eval": [c.eval[0].model_copy(update={"text": c.eval[0].text + " x"}),
                                            *c.eval[1:]]})  # fmt: skip
    edited = loaded.model_copy(update={"tasks": [changed if t.name == "c" else t for t in loaded.tasks]})
    got = with_targets(edited, data)
    assert (
        got.task("c").target == [] and got.task("domain_switch").target == full.task("domain_switch").target
    )
