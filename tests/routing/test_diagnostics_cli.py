"""Routing diagnostics (weights per layer, entropy, accuracy, heatmap), expert FLOPs, and `moerge generate`."""

from __future__ import annotations

import copy
import json
import math

import torch
from _routing_helpers import make_experts

from moerge.recipes.facade import attach, detach
from moerge.routing.diagnostics import plot_heatmap, routing_report
from moerge.routing.inputs import RoutingInputs


def test_report_from_recorded_oracle_and_uniform_routing(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama[0])
    experts = make_experts(model, 4)
    names = [e.name for e in experts]
    ids = torch.randint(4, 95, (3, 5))
    routed = attach(model, experts, recipe="oracle")
    routed(input_ids=ids, routing=RoutingInputs(task_names=["task1", "task3", "task1"], record=True))
    w = routed.last_routing()
    assert set(w) == set(experts[0].lora) and all(t.shape == (3, 5, 4) for t in w.values())
    rep = routing_report(w, names, labels=["expert1", "expert3", "expert1"])
    assert rep.accuracy == 1.0 and all(la.entropy == 0 for la in rep.layers)
    rep = routing_report(w, names, labels=["expert1", "expert3", "expert0"])
    assert math.isclose(rep.accuracy, 2 / 3, rel_tol=1e-6)
    routed(
        input_ids=ids,
        routing=RoutingInputs(
            task_names=["task1", "task3", "task1"],
            record=True,
            expert_labels=["expert1", "expert3", "expert0"],
        ),
    )
    assert routed.routing_report().model_dump() == rep.model_dump()  # labels taken from the call
    detach(routed)

    routed = attach(model, experts, recipe="uniform")
    routed(input_ids=ids, routing=RoutingInputs(record=True))
    rep = routing_report(routed.last_routing(), names, labels=["expert0"] * 3)
    assert math.isclose(rep.accuracy, 0.25, rel_tol=1e-6)
    assert all(math.isclose(la.entropy, math.log(4), rel_tol=1e-5) for la in rep.layers)
    assert rep.matrix().shape == (len(w), 4)
    out = plot_heatmap(rep, tmp_path / "heat.png")
    assert out.stat().st_size > 1000
    detach(routed)


def test_arrow_report_matches_hand_computed_statistics(tiny_llama):
    model = copy.deepcopy(tiny_llama[0])
    experts = make_experts(model, 5)
    routed = attach(model, experts, recipe="arrow", k=2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    routed(input_ids=torch.randint(4, 95, (2, 4)), attention_mask=mask, routing=RoutingInputs(record=True))
    w = routed.last_routing()
    rep = routing_report(w, [e.name for e in experts], labels=["expert2", "expert4"], attention_mask=mask)
    name, t = next(iter(w.items()))
    keep = t[mask.bool()]  # [7, E]
    torch.testing.assert_close(torch.tensor(rep.layers[0].mean_weights), keep.mean(0))
    right = torch.cat([t[0, :3, 2], t[1, :, 4]])
    assert math.isclose(rep.layers[0].accuracy, float(right.mean()), rel_tol=1e-5)
    ent = -(keep.clamp(min=1e-12).log() * keep).sum(-1).mean()
    assert math.isclose(rep.layers[0].entropy, float(ent), rel_tol=1e-4)
    detach(routed)


def test_expert_flops_per_token(tiny_llama):
    model = copy.deepcopy(tiny_llama[0])
    experts = make_experts(model, 6, ranks=(4,))
    routed = attach(model, experts, recipe="arrow", k=2)
    want = sum(2 * 2 * 4 * (la.d_in + la.d_out) + 2 * 6 * la.d_in for la in routed.expert_layers.values())
    assert routed.expert_flops_per_token() == want
    detach(routed)


def test_cli_generate_shows_routing(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from moerge.cli import app
    from moerge.experts.library import ExpertLibrary

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    lib = ExpertLibrary.create(tmp_path / "lib")
    for e in make_experts(model, 3):
        lib.add(e)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello", "task": "task1"}) + "\n" + json.dumps("abc") + "\n")
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "generate",
            str(tmp_path / "base"),
            str(tmp_path / "lib"),
            "-r",
            "arrow",
            "-o",
            "k=2",
            "--prompts",
            str(prompts),
            "-n",
            "4",
            "--show-routing",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "hello" in res.output and "abc" in res.output and "expert" in res.output
    res = runner.invoke(
        app,
        [
            "generate",
            str(tmp_path / "base"),
            str(tmp_path / "lib"),
            "-r",
            "oracle",
            "--prompts",
            str(prompts),
            "-n",
            "2",
        ],
    )
    assert res.exit_code != 0  # the second prompt has no task for the oracle
