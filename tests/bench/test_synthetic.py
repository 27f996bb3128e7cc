"""The synthetic suite: builds, is right by construction, is deterministic, is cached."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moerge.bench.metrics import span_exact_match, target_token_accuracy
from moerge.bench.suites import synthetic
from moerge.bench.suites.format import load_jsonl_suite
from moerge.bench.suites.synthetic import (
    SEP,
    SyntheticSuiteConfig,
    build_synthetic_suite,
    build_tasks,
    task_defs,
)


def reference_apply(op: str, s: str, alphabet: str, table: dict[str, str]) -> str:
    """Independent implementations of the held-in transformations."""
    if op in ("cipher", "classify"):
        return "".join(table[c] for c in s)
    if op == "constant":
        (only,) = set(table.values())
        return only * len(s)
    if op == "walk":
        out, c = "", s[-1]
        for _ in s:
            c = table[c]
            out += c
        return out
    if op == "shift":
        return "".join(alphabet[(alphabet.index(c) + 1) % len(alphabet)] for c in s)
    if op == "reverse":
        return "".join(reversed(s))
    if op == "rotate":
        return s[1:] + s[0]
    if op == "double":
        return "".join(ch for c in s for ch in (c, c))
    if op == "swap":
        out = list(s)
        for i in range(0, len(s) - 1, 2):
            out[i], out[i + 1] = out[i + 1], out[i]
        return "".join(out)
    raise AssertionError(op)


def test_reduced_suite_shape(reduced_suite):
    suite = reduced_suite
    assert len(suite.held_in) >= 8
    assert {"in_distribution", "switching", "composition", "unrelated"} <= set(suite.conditions())
    assert suite.experts == [t.name for t in suite.held_in]
    for t in suite.held_in:
        assert t.oracle_expert == t.name and t.train and t.eval and t.ceiling == 1.0
    lib = suite.open_library()
    assert lib.names() == sorted(suite.experts)
    md = lib.get_metadata(suite.experts[0])
    assert md.task == suite.experts[0] and md.training["steps"] == 8
    from moerge.experts.library import ExpertLibrary

    assert ExpertLibrary.open(suite.baselines).names() == ["multitask"]
    model, tok = suite.load_base()
    from moerge.experts.fingerprint import fingerprint_model

    assert fingerprint_model(model) == lib.base_fingerprint == md.base_fingerprint
    build = synthetic.read_build_info(suite)
    assert set(build["scores"]) == set(suite.task_names())
    assert build["pretrain"]["final_loss"] < build["pretrain"]["first_loss"]
    premise = build["premise"]
    assert premise["experts"] == suite.experts and set(premise["verdicts"]) == {
        "arrow", "phatgoose", "average_activation"
    }  # fmt: skip
    assert len(premise["selectivity"]) == len(suite.experts)


def test_the_library_ships_the_contributors_gates_and_centroids(reduced_config, reduced_suite):
    """Gates trained as `train_phatgoose_gates` trains them, on each expert's own training examples, and the
    hidden-state centroids of its training texts: the runner then computes neither."""
    from moerge.train.gates import GATES_KIND, GateTrainConfig, gates_config, train_phatgoose_gates
    from moerge.transforms.centroids import HIDDEN_CONFIG, HIDDEN_KIND, compute_hidden_centroids

    model, tok = reduced_suite.load_base()
    lib = reduced_suite.open_library()
    task = reduced_suite.held_in[0]
    expert = lib.get(task.name)
    config = gates_config(reduced_config.gate_steps)
    stored, meta = lib.get_artifact(GATES_KIND, config, task.name)
    again = train_phatgoose_gates(
        model, tok, expert, task.train, GateTrainConfig(steps=reduced_config.gate_steps)
    )
    assert meta["steps"] == reduced_config.gate_steps and set(stored) == set(expert.lora)
    assert all(torch.allclose(stored[m], again[m], atol=1e-6) for m in stored)
    cents = compute_hidden_centroids(
        model, tok, {task.name: [ex.text for ex in task.train[:256]]}, experts=[expert]
    )
    shipped, _ = lib.get_artifact(HIDDEN_KIND, HIDDEN_CONFIG, task.name)
    assert all(torch.allclose(shipped[m], cents[task.name][m], atol=1e-6) for m in shipped)
    assert all(lib.has_artifact(GATES_KIND, config, n) for n in reduced_suite.experts)


def test_held_in_tasks_are_right(reduced_config, reduced_suite):
    defs = {d.name: d for d in task_defs(reduced_config)}
    alphabets = [d.alphabet for d in defs.values()]
    for a, b in zip(alphabets, alphabets[1:]):
        assert len(set(a) & set(b)) == 2  # neighbours share 2 characters
    assert len({d.sep for d in defs.values()}) == len(defs) and SEP not in {d.sep for d in defs.values()}
    for d in defs.values():
        if d.op == "constant":  # one output character, its own: in no other task's alphabet
            (c,) = set(d.table.values())
            assert set(d.table) == set(d.alphabet)
            assert all(c not in o.alphabet for o in defs.values() if o.name != d.name)
        if d.op == "cipher":
            assert sorted(d.table.values()) == sorted(d.alphabet)  # a permutation of its alphabet
    for t in reduced_suite.held_in:
        d = defs[t.name]
        train_inputs = set()
        prefixed = 0
        for ex in t.train:
            (start, end), (span,) = ex.targets[0], ex.routing
            inp, out = ex.text[span.start :].split(d.sep)
            assert span.experts == [d.name] and span.end == end == len(ex.text)
            assert ex.text[start:end] == out == reference_apply(d.op, inp, d.alphabet, d.table)
            assert all(lab == () for lab in ex.char_experts()[: span.start])  # a generic prefix: no expert
            prefixed += span.start > 0
            train_inputs.add(inp)
        assert 0 < prefixed < len(t.train)
        for ex in t.eval:
            inp, out = ex.text.split(d.sep)
            assert set(inp) <= set(d.alphabet)
            assert out == reference_apply(d.op, inp, d.alphabet, d.table)
            assert ex.completions() == [out]
            assert ex.char_experts() == [(t.name,)] * len(ex.text)
            assert inp not in train_inputs  # eval inputs are unseen


def test_held_out_conditions_are_right(reduced_config, reduced_suite):
    defs = {d.name: d for d in task_defs(reduced_config)}
    switch = reduced_suite.task("switch")
    for ex in switch.eval:
        segments = ex.text.split(" ")
        assert 2 <= len(segments) == len(ex.targets) == len(ex.routing)
        for seg, (s, e), r in zip(segments, ex.targets, ex.routing):
            d = defs[r.experts[0]]
            inp, out = seg.split(d.sep)
            assert ex.text[s:e] == out == reference_apply(d.op, inp, d.alphabet, d.table)
            assert ex.text[r.start : r.end] == seg
    blends = reduced_suite.select("held_out", "composition")
    assert blends
    for task in blends:
        a, b = (defs[n] for n in task.experts)
        for ex in task.eval:
            inp, out = ex.text.split(SEP)
            owners = [a if c in a.alphabet else b for c in inp]
            assert {o.name for o in owners} == {a.name, b.name}
            assert out == "".join(o.table[c] for c, o in zip(inp, owners))
            labels = ex.char_experts()
            assert [lab[0] for lab in labels[: len(inp)]] == [o.name for o in owners]
    copy = reduced_suite.task("copy9")
    assert all(ex.text.split(SEP)[0] == ex.completions()[0] for ex in copy.eval)
    assert not copy.experts and all(not ex.routing for ex in copy.eval)


def test_markov_ceiling_is_true_entropy(reduced_config, reduced_suite):
    task = reduced_suite.task("markov9")
    chain = torch.tensor(synthetic.markov_chain(reduced_config), dtype=torch.float64)
    row_entropy = -(chain * chain.log()).sum(-1)
    alphabet = synthetic.MARKOV_ALPHABET
    total, count = 0.0, 0
    for ex in task.eval:
        idx = [alphabet.index(c) for c in ex.text]
        total += math.log(len(alphabet)) + float(row_entropy[idx[:-1]].sum())
        count += len(idx)
    assert task.metric == "nll" and task.ceiling == pytest.approx(total / count, abs=1e-5)
    assert task.ceiling < math.log(len(alphabet))


def test_eval_batches_align_with_tokens(reduced_suite, char_tokenizer):
    task = reduced_suite.task("switch")
    batch = next(task.eval_batches(char_tokenizer, batch_size=4, experts=reduced_suite.experts))
    assert batch.input_ids.shape[0] == 4 and batch.routes.shape[-1] == len(reduced_suite.experts)
    for b, ex in enumerate(batch.examples):
        ids = batch.input_ids[b]
        n = len(ex.text) + 1
        assert char_tokenizer.decode(ids[1:n].tolist()) == ex.text
        scored = "".join(ex.text[t - 1] for t in range(1, n) if batch.labels[b, t] != -100)
        assert scored == "".join(ex.completions())
        for t in range(1, n):
            want = ex.char_experts()[t - 1]
            got = [reduced_suite.experts[e] for e in batch.routes[b, t].nonzero().flatten().tolist()]
            assert tuple(got) == want
    # Perfect logits score every span; breaking one token breaks exactly its span.
    logits = torch.zeros(*batch.input_ids.shape, len(char_tokenizer))
    target = batch.labels[:, 1:].clamp(min=0)
    logits[:, :-1].scatter_(-1, target.unsqueeze(-1), 1.0)
    assert span_exact_match(logits, batch).tolist() == [1.0] * batch.n_spans
    n_targets = sum(len(c) for ex in batch.examples for c in ex.completions())
    assert target_token_accuracy(logits, batch).tolist() == [1.0] * n_targets
    b, t = (batch.span == 1).nonzero()[0].tolist()
    logits[b, t - 1] = 0
    logits[b, t - 1, (batch.labels[b, t] + 1) % len(char_tokenizer)] = 1.0
    em = span_exact_match(logits, batch)
    assert em[1] == 0 and em.sum() == batch.n_spans - 1
    acc = target_token_accuracy(logits, batch)  # graded: one token of the span is wrong, not the span
    assert (
        acc.sum() == n_targets - 1
        and acc[int((batch.labels[:b] != -100).sum() + (batch.labels[b, :t] != -100).sum())] == 0
    )


def test_data_is_deterministic_from_seed(reduced_config):
    a = build_tasks(reduced_config)
    b = build_tasks(reduced_config)
    c = build_tasks(reduced_config.model_copy(update={"seed": 1}))
    assert [t.model_dump() for t in a[0]] == [t.model_dump() for t in b[0]] and a[1] == b[1]
    assert [t.model_dump() for t in a[0]] != [t.model_dump() for t in c[0]]


def test_cache_hit_does_not_rebuild(reduced_config, reduced_suite, suite_root, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("rebuilt a cached suite")

    monkeypatch.setattr(synthetic, "_build_into", boom)
    cached = build_synthetic_suite(reduced_config, root=suite_root)
    assert cached.root == reduced_suite.root
    assert load_jsonl_suite(cached.root).model_dump() == cached.model_dump()
    # A different config is a different folder (and would be built).
    other = SyntheticSuiteConfig.reduced(seed=7, progress=False)
    assert synthetic.suite_folder(other, suite_root) != Path(reduced_suite.root)
    with pytest.raises(AssertionError, match="rebuilt"):
        build_synthetic_suite(other, root=suite_root)
    # progress/threads do not change the key.
    assert reduced_config.model_copy(update={"progress": True, "threads": 2}).key() == reduced_config.key()
