"""Premise diagnostics against dense references written out here, on toy experts and inputs."""

from __future__ import annotations

import pytest
import torch

from moerge.bench.premise import (
    SELECTIVITY_MIN,
    PremiseReport,
    RouterSignature,
    arrow_signature,
    collect_target_inputs,
    format_premise,
    premise_diagnostics,
)
from moerge.experts.expert import Expert, ExpertMetadata, LoraModule

D, R = 12, 2
MODULES = ["layer.a", "layer.b"]


def make_expert(
    name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float = 4.0
) -> Expert:
    lora = {m: LoraModule(A=A, B=B, alpha=alpha) for m, (A, B) in factors.items()}
    return Expert(metadata=ExpertMetadata(name=name, base_model="toy", kind="lora"), lora=lora)


def random_experts(n: int, seed: int = 0) -> list[Expert]:
    g = torch.Generator().manual_seed(seed)
    return [
        make_expert(
            f"e{i}",
            {m: (torch.randn(R, D, generator=g), torch.randn(D + 3, R, generator=g)) for m in MODULES},
        )
        for i in range(n)
    ]


def random_inputs(names: list[str], seed: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {n: {m: torch.randn(5 + i, D, generator=g) + i for m in MODULES} for i, n in enumerate(names)}


def dense_selectivity(experts, inputs, module):
    """Written out: mean ‖ΔW x‖² over own tokens / mean over the other experts of their mean."""
    out = []
    for i, e in enumerate(experts):
        lm = e.lora[module]
        delta = (lm.B @ lm.A) * (lm.alpha / lm.A.shape[0])

        def energy(xs, delta=delta):
            return sum(float((delta @ x).pow(2).sum()) for x in xs) / len(xs)

        own = energy(inputs[e.name][module])
        others = [energy(inputs[f.name][module]) for j, f in enumerate(experts) if j != i]
        out.append(own / (sum(others) / len(others)))
    return out


def dense_top1(experts, inputs, module, protos, score):
    """Written out: for each token of expert i, is the best-scoring prototype row i?"""

    def standardize(v):
        return (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)

    out = []
    for i, e in enumerate(experts):
        hits = 0
        xs = inputs[e.name][module]
        for x in xs:
            if score == "abs_dot":
                s = [abs(float(x @ p)) for p in protos]
            else:
                s = [float(standardize(x) @ standardize(p)) / D**0.5 for p in protos]
            hits += max(range(len(s)), key=s.__getitem__) == i
        out.append(hits / len(xs))
    return out


def test_selectivity_and_top1_match_a_dense_loop():
    experts = random_experts(3)
    names = [e.name for e in experts]
    inputs = random_inputs(names)
    g = torch.Generator().manual_seed(5)
    gates = RouterSignature({m: torch.randn(3, D, generator=g) for m in MODULES}, "std_dot")
    arrow = arrow_signature(experts, MODULES)
    report = premise_diagnostics(experts, inputs, {"arrow": arrow, "phatgoose": gates})
    assert report.experts == names and report.modules == MODULES
    for j, m in enumerate(MODULES):
        torch.testing.assert_close(
            report.selectivity[:, j], torch.tensor(dense_selectivity(experts, inputs, m))
        )
        for router, sig in (("arrow", arrow), ("phatgoose", gates)):
            want = dense_top1(experts, inputs, m, sig.prototypes[m], sig.score)
            torch.testing.assert_close(report.top1[router][:, j], torch.tensor(want))
    assert report.tokens == [5, 6, 7]
    again = PremiseReport.from_dict(report.to_dict())
    torch.testing.assert_close(again.selectivity, report.selectivity, atol=1e-4, rtol=1e-4)


def test_arrow_prototype_is_the_top_right_singular_vector():
    (e,) = random_experts(1, seed=3)
    for m in MODULES:
        v = arrow_signature([e], MODULES).prototypes[m][0]
        _, _, Vh = torch.linalg.svd(e.lora[m].delta().double())
        assert abs(float(v.double() @ Vh[0])) == pytest.approx(1.0, abs=1e-5)


def selective_world(shared: set[int] = frozenset()):
    """Expert i's update is rank 1 along basis direction i and its tokens lie along that direction (selective),
    except for experts in ``shared``, whose updates all read direction 0 (they fire on everyone's tokens)."""
    eye = torch.eye(D)
    g = torch.Generator().manual_seed(0)
    experts, inputs = [], {}
    for i in range(4):
        read = eye[0] if i in shared else eye[i]
        experts.append(
            make_expert(f"e{i}", {m: (read[None].repeat(R, 1), torch.ones(D, R)) for m in MODULES})
        )
        tokens = eye[i] * 3 + 0.1 * torch.randn(20, D, generator=g)
        inputs[f"e{i}"] = {m: tokens for m in MODULES}
    return experts, inputs


def test_verdicts_say_when_the_premise_holds_and_when_it_fails():
    experts, inputs = selective_world()
    report = premise_diagnostics(experts, inputs, {"arrow": arrow_signature(experts, MODULES)})
    assert report.mean_selectivity() > 100 and report.mean_top1("arrow") == 1.0
    assert report.verdict("arrow").startswith("premise holds")

    experts, inputs = selective_world(shared={0, 1, 2, 3})  # every update reads direction 0
    report = premise_diagnostics(experts, inputs, {"arrow": arrow_signature(experts, MODULES)})
    assert report.mean_selectivity() < SELECTIVITY_MIN
    verdict = report.verdict("arrow")
    assert verdict.startswith("Arrow not testable here: premise fails for 3 of 4 experts")
    assert f"selectivity {report.expert_selectivity()['e1']:.2f} < {SELECTIVITY_MIN:g}" in verdict

    experts, inputs = selective_world(shared={0, 3})  # e3 reads e0's direction: not selective, routes wrong
    report = premise_diagnostics(experts, inputs, {"arrow": arrow_signature(experts, MODULES)})
    failing = report.failing_experts("arrow")
    assert set(failing) == {"e3"} and "selectivity" in failing["e3"]
    assert report.verdict("arrow").startswith("premise holds for 3 of 4 experts")
    assert "e3" in format_premise(report)


def test_collect_target_inputs_keeps_the_positions_that_predict_targets():
    from moerge.backbones.tiny import build_tiny_model

    model, _ = build_tiny_model(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24)
    module = "model.layers.0.self_attn.q_proj"
    ids = torch.tensor([[1, 10, 11, 12, 13, 0], [1, 20, 21, 22, 23, 24]])
    labels = torch.tensor([[-100, -100, -100, 12, 13, -100], [-100, -100, 21, -100, 23, 24]])
    full = []
    handle = model.get_submodule(module).register_forward_pre_hook(lambda _m, a: full.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    want = []
    for b in range(2):
        for t in range(ids.shape[1] - 1):
            if labels[b, t + 1] != -100:  # the inputs at t produce the prediction of token t + 1
                want.append(full[0][b, t])
    got = collect_target_inputs(model, [(ids, labels)], [module])
    torch.testing.assert_close(got[module], torch.stack(want))
    assert len(collect_target_inputs(model, [(ids, labels)], [module], max_tokens=3)[module]) == 3


def test_collect_target_inputs_from_a_later_layer_matches_the_full_model():
    # inputs_embeds = what the layers below give (moerge.train.prefix): the same module inputs are collected
    from moerge.backbones.tiny import build_tiny_model
    from moerge.train.prefix import prefix_batches, truncated

    model, _ = build_tiny_model(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24, seed=1)
    module = "model.layers.1.mlp.up_proj"
    ids = torch.tensor([[1, 10, 11, 12, 13, 0], [1, 20, 21, 22, 23, 24]])
    labels = torch.tensor([[-100, 10, 11, 12, 13, -100], [-100, -100, 21, 22, 23, 24]])
    full = collect_target_inputs(model, [(ids, labels)], [module])
    cached = prefix_batches(model, [(ids, labels)], 1)
    with truncated(model, 1):
        part = collect_target_inputs(model, cached, [module])
    torch.testing.assert_close(part[module], full[module], atol=1e-5, rtol=1e-5)
    assert len(full[module]) == 8
