"""Branch-Train-MiX (`moerge.recipes.btx`): the built model computes, per token and layer, the top-2 mixture of
the dense experts' FFNs (the base's included) under the trained routers, with every other weight averaged —
written out here from each expert's W + scaling·B A; router training lowers the loss on the experts' data and
changes nothing but the routers; the trained routers are cached in the library (a second build trains nothing)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import moerge
import moerge.recipes
from moerge.experts.expert import Expert, ExpertMetadata, LoraModule

IDS = torch.tensor([[1, 5, 9, 12, 3, 7, 20, 33], [1, 40, 41, 42, 8, 8, 9, 10]])


def make_expert(model, name: str, seed: int) -> Expert:
    g = torch.Generator().manual_seed(seed)
    lora = {
        n: LoraModule(
            A=torch.randn(2, m.in_features, generator=g) * 0.5,
            B=torch.randn(m.out_features, 2, generator=g) * 0.5,
            alpha=4.0,
        )  # fmt: skip
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.endswith(("q_proj", "up_proj", "down_proj"))
    }
    return Expert(metadata=ExpertMetadata(name=name, base_model="tiny", kind="lora"), lora=lora)


def dense(model, expert):
    """The expert's dense model written out: each adapted weight W + (alpha / r) · B @ A."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for module, lm in expert.lora.items():
            out.get_submodule(module).weight += (lm.alpha / lm.rank) * lm.B @ lm.A
    return out


class DenseTopK(nn.Module):
    def __init__(self, gate, ffns, k):
        super().__init__()
        self.gate, self.ffns, self.k = gate, ffns, k

    def forward(self, h):
        p = torch.softmax(h @ self.gate.T, dim=-1)
        top, idx = p.topk(self.k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        return sum((top * (idx == e)).sum(-1, keepdim=True) * ffn(h) for e, ffn in enumerate(self.ffns))


@pytest.fixture(scope="module")
def btx_library(tiny_llama, reverse_data, tmp_path_factory):
    model, tok = tiny_llama
    lib = moerge.ExpertLibrary.create(tmp_path_factory.mktemp("btx") / "lib")
    experts = [make_expert(model, f"e{i}", i) for i in range(2)]
    for e in experts:
        lib.add(e)
    data = {"e0": reverse_data[:24], "e1": reverse_data[24:48]}
    done = moerge.recipes.prepare_signatures("btx", model, tok, lib, data, steps=6)
    assert len(done) == 1
    assert moerge.recipes.prepare_signatures("btx", model, tok, lib, data, steps=6) == []  # cached
    return lib, experts


def test_btx_is_the_top2_mixture_of_the_dense_ffns(tiny_llama, btx_library):
    model, tok = tiny_llama
    lib, experts = btx_library
    before = {k: v.clone() for k, v in model.state_dict().items()}
    built = moerge.recipes.build_model(model, lib, "btx", tokenizer=tok, steps=6)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    sources = [model] + [dense(model, e) for e in experts]  # the base's FFN kept as expert 0
    ref = copy.deepcopy(model)
    avg = {k: torch.stack([s.state_dict()[k] for s in sources]).mean(0) for k in ref.state_dict()}
    ref.load_state_dict(avg)
    moe = built.model
    for i, layer in enumerate(ref.model.layers):
        gate = moe.model.layers[i].mlp.gate.weight.detach()
        assert gate.shape == (3, model.config.hidden_size)
        layer.mlp = DenseTopK(gate, [s.model.layers[i].mlp for s in sources], k=2)
    with torch.no_grad():
        torch.testing.assert_close(built.logits(IDS), ref(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    assert built.trainable_parameters == 2 * 3 * model.config.hidden_size


def test_btx_router_training_lowers_the_loss_and_trains_only_the_routers(tiny_llama, reverse_data):
    from moerge.model.moe import build_mixtral, expert_state, gate_vectors
    from moerge.train.moe_router import moe_loss, train_moe_routers
    from moerge.train.router import RouterTrainConfig, router_batches

    model, tok = tiny_llama
    states = [model.state_dict()] + [expert_state(model, make_expert(model, f"e{i}", i)) for i in range(2)]
    moe = build_mixtral(model, states, gate_vectors("uniform_random", model, num_experts=3), shared="average")
    frozen = {k: v.clone() for k, v in moe.state_dict().items() if not k.endswith("mlp.gate.weight")}
    batch = router_batches(tok, reverse_data[:32], 32, 1, 0, 64)[0]
    with torch.no_grad():
        before = float(moe_loss(moe, batch, 0.01))
    cfg = RouterTrainConfig(steps=20, lr=1e-2, batch_size=8, aux_weight=0.01)
    result = train_moe_routers(moe, tok, reverse_data[:32], cfg)
    with torch.no_grad():
        after = float(moe_loss(moe, batch, 0.01))
    assert len(result.losses) == 20 and after < before - 0.01
    assert all(torch.equal(v, moe.state_dict()[k]) for k, v in frozen.items())
    assert {n for n, p in moe.named_parameters() if not p.requires_grad} == set()


def test_btx_without_prepared_routers_says_how(tiny_llama, tmp_path):
    model, tok = tiny_llama
    lib = moerge.ExpertLibrary.create(tmp_path / "lib")
    lib.add(make_expert(model, "e0", 0))
    with pytest.raises(moerge.errors.RecipeNotApplicableError, match="library prepare .* --recipe btx"):
        moerge.recipes.build_model(model, lib, "btx", tokenizer=tok)
