"""PHATGOOSE gate training: the expert's own objective (cross-entropy on its target tokens only, on its own
examples and batches), checked against a gated model and loss written out here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
from moerge.train.gates import GateTrainConfig, resolved_settings, train_phatgoose_gates

SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_expert(model, rank: int = 2, seed: int = 0, training: dict | None = None) -> Expert:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.endswith(SUFFIXES):
            A = torch.randn(rank, mod.in_features, generator=g) * 0.3
            B = torch.randn(mod.out_features, rank, generator=g) * 0.3
            lora[name] = LoraModule(A=A, B=B, alpha=2.0 * rank)
    meta = ExpertMetadata(name="e", base_model="tiny", kind="lora", training=training or {})
    return Expert(metadata=meta, lora=lora)


class GatedLinear(nn.Module):
    """Written out: y = W x + σ(⟨g, x⟩) · scaling · B A x, with g a trainable vector initialised at 0."""

    def __init__(self, base: nn.Linear, lm: LoraModule):
        super().__init__()
        self.base, self.lm = base, lm
        self.gate = nn.Parameter(torch.zeros(base.in_features))

    def forward(self, x):
        s = torch.sigmoid(x @ self.gate)[..., None]
        return self.base(x) + s * ((x @ self.lm.A.T) @ self.lm.B.T) * self.lm.scaling


def reference_gates(model, tokenizer, expert, rows, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """Every step on all rows at once: ``<bos> prompt completion <eos>``, loss on completion and ``<eos>``."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    gated = {}
    for name, lm in expert.lora.items():
        parent, _, child = name.rpartition(".")
        layer = GatedLinear(ref.get_submodule(name), lm)
        setattr(ref.get_submodule(parent), child, layer)
        gated[name] = layer
    ids, labels = [], []
    for row in rows:
        p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append([tokenizer.bos_token_id] + p + c)
        labels.append([-100] * (1 + len(p)) + c)
    width = max(map(len, ids))
    x = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in ids])
    y = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    params = [layer.gate for layer in gated.values()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        logits = ref(input_ids=x).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    return {name: layer.gate.detach() for name, layer in gated.items()}


@pytest.fixture(scope="module")
def rows(reverse_data):
    return reverse_data[:12]


def test_gates_follow_the_experts_objective_on_target_tokens(tiny_llama, rows):
    model, tok = tiny_llama
    expert = random_expert(model, training={"batch_size": len(rows), "seq_len": 32, "seed": 3})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = train_phatgoose_gates(model, tok, expert, rows, GateTrainConfig(steps=2))
    want = reference_gates(model, tok, expert, rows, steps=2, lr=5e-3)
    assert set(got) == set(expert.lora)
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    assert any(float(g.abs().max()) > 1e-3 for g in got.values())  # the gates moved
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)  # base weights untouched
    # Whole texts (every token a target, as before) train different gates: the objective matters.
    texts = [{"text": r["prompt"] + r["completion"]} for r in rows]
    whole = train_phatgoose_gates(model, tok, expert, texts, GateTrainConfig(steps=2))
    assert any(not torch.allclose(whole[n], got[n], atol=1e-4) for n in got)


def test_suite_examples_train_the_same_gates_as_their_rows(tiny_llama, rows):
    from moerge.bench.suites.format import Example

    model, tok = tiny_llama
    expert = random_expert(model, seed=1, training={"batch_size": 4, "seq_len": 32, "seed": 0})
    examples = [Example.from_prompt(r["prompt"], r["completion"], ["e"]) for r in rows]
    a = train_phatgoose_gates(model, tok, expert, examples, GateTrainConfig(steps=3))
    b = train_phatgoose_gates(model, tok, expert, rows, GateTrainConfig(steps=3))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_defaults_are_the_authors_and_batches_are_the_experts(tiny_llama, tmp_path, rows):
    from moerge.experts.library import ExpertLibrary
    from moerge.train.gates import GATES_KIND, gates_config

    cfg = GateTrainConfig()
    assert (cfg.steps, cfg.lr, cfg.weight_decay, cfg.warmup_ratio, cfg.grad_clip) == (
        100,
        5e-3,
        0.0,
        0.06,
        1.0,
    )
    model, tok = tiny_llama
    expert = random_expert(model, seed=2, training={"batch_size": 5, "seq_len": 20, "seed": 7})
    assert resolved_settings(expert, cfg) == {"batch_size": 5, "seq_len": 20, "seed": 7}
    override = cfg.model_copy(update={"batch_size": 2, "seed": 1})
    assert resolved_settings(expert, override) == {"batch_size": 2, "seq_len": 20, "seed": 1}
    lib = ExpertLibrary.create(tmp_path / "lib")
    lib.add(expert)
    train_phatgoose_gates(model, tok, expert, rows, GateTrainConfig(steps=2), library=lib)
    tensors, meta = lib.get_artifact(GATES_KIND, gates_config(2), "e")
    assert set(tensors) == set(expert.lora)
    assert (meta["batch_size"], meta["seq_len"], meta["seed"], meta["examples"]) == (5, 20, 7, len(rows))


def test_gates_of_a_top_layer_expert_trained_on_the_frozen_prefix_match_the_reference(
    tiny_llama, rows, tmp_path
):
    # The expert adapts layer 1 only: its gates train from layer 0's outputs computed once per example
    # (moerge.train.prefix), and must equal the written-out reference run through the whole model.
    from moerge.experts.library import ExpertLibrary
    from moerge.train.gates import GATES_KIND, gates_config

    model, tok = tiny_llama
    expert = random_expert(model, seed=4, training={"batch_size": len(rows), "seq_len": 32, "seed": 3})
    expert.lora = {n: m for n, m in expert.lora.items() if n.startswith("model.layers.1.")}
    lib = ExpertLibrary.create(tmp_path / "lib")
    lib.add(expert)
    got = train_phatgoose_gates(model, tok, expert, rows, GateTrainConfig(steps=3), library=lib)
    want = reference_gates(model, tok, expert, rows, steps=3, lr=5e-3)
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    assert lib.get_artifact(GATES_KIND, gates_config(3), "e")[1]["frozen_prefix_layers"] == 1
    full = train_phatgoose_gates(model, tok, expert, rows, GateTrainConfig(steps=3, cache_prefix=False))
    assert all(torch.allclose(full[n], got[n], atol=1e-6) for n in got)
