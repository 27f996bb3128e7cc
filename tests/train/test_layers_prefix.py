"""LoRA restricted to decoder layers (`TrainConfig.layers`): exactly those layers' modules are adapted, and
training them on the frozen prefix computed once (`moerge.train.prefix`) gives what training through the full
model gives — the full model being the reference, since below the adapted layers nothing can change."""

from __future__ import annotations

import pytest
import torch

from moerge.errors import MoergeError
from moerge.train.lora import TrainConfig, train_expert
from moerge.train.prefix import (
    cached_prefix,
    decoder_layers,
    first_layer,
    layer_modules,
    prefix_batches,
    truncated,
)

FAST = dict(steps=6, lr=1e-2, batch_size=4, seq_len=32, rank=2, alpha=4.0, progress=False)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def test_layers_adapt_exactly_the_linear_modules_of_those_layers(tiny_llama, reverse_data):
    model, tok = tiny_llama
    top = train_expert(model, tok, reverse_data, TrainConfig(**FAST, layers=[-1]))
    assert set(top.lora) == {f"model.layers.1.{p}" for p in PROJ}  # all seven, no LM head, no layer 0
    assert top.metadata.training["layers"] == [-1]
    assert top.metadata.training["frozen_prefix_layers"] == 1  # layer 0 ran once per example
    some = train_expert(
        model, tok, reverse_data, TrainConfig(**FAST, layers=[0], target_modules=["q_proj", "v_proj"])
    )
    assert set(some.lora) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    assert some.metadata.training["frozen_prefix_layers"] == 0  # nothing below layer 0
    assert layer_modules(model, [1, -1]) == [f"model.layers.1.{p}" for p in PROJ]
    with pytest.raises(MoergeError, match="out of range"):
        train_expert(model, tok, reverse_data, TrainConfig(**FAST, layers=[2]))


def test_training_on_the_frozen_prefix_matches_the_full_model(tiny_llama, reverse_data):
    model, tok = tiny_llama
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(**FAST, layers=[-1], seed=5)
    cached = train_expert(model, tok, reverse_data, cfg)
    full = train_expert(model, tok, reverse_data, cfg.model_copy(update={"cache_prefix": False}))
    assert full.metadata.training["frozen_prefix_layers"] == 0
    assert set(cached.lora) == set(full.lora)
    for name in full.lora:
        torch.testing.assert_close(cached.lora[name].A, full.lora[name].A, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cached.lora[name].B, full.lora[name].B, atol=1e-5, rtol=1e-4)
    assert float(full.lora["model.layers.1.mlp.up_proj"].B.abs().max()) > 1e-3  # it trained
    assert cached.metadata.training["final_loss"] == pytest.approx(
        full.metadata.training["final_loss"], abs=1e-5
    )
    after = model.state_dict()
    assert all(
        torch.equal(after[k], state[k]) for k in state
    )  # the layer list is put back, weights untouched
    assert len(decoder_layers(model)[1]) == 2


def test_prefix_states_are_the_inputs_the_full_model_gives_the_layer(tiny_llama):
    model, _ = tiny_llama
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 0, 0]])
    labels = torch.tensor([[-100, 5, 6, 7, 8], [-100, 9, 10, -100, -100]])
    seen = {}
    handle = model.model.layers[1].register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0].clone()))
    try:
        with torch.no_grad():
            full = model(input_ids=ids).logits
    finally:
        handle.remove()
    [(hidden, _)] = prefix_batches(model, [(ids, labels)], 1)
    torch.testing.assert_close(hidden[0], seen["h"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[1, :3], seen["h"][1, :3], atol=1e-5, rtol=1e-5)  # real tokens
    assert torch.equal(hidden[1, 3:], torch.zeros_like(hidden[1, 3:]))  # padding: nothing
    with torch.no_grad(), truncated(model, 1):
        part = model(inputs_embeds=hidden).logits
    torch.testing.assert_close(part[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part[1, :3], full[1, :3], atol=1e-5, rtol=1e-5)


def test_a_model_that_changes_its_inputs_embeds_trains_on_the_full_model(tiny_gpt2, reverse_data):
    # GPT-2 adds position embeddings to inputs_embeds, so the truncated model would not reproduce it: the check
    # on the first batch refuses the prefix and training runs through every layer.
    model, tok = tiny_gpt2
    expert = train_expert(model, tok, reverse_data, TrainConfig(**FAST, layers=[-1]))
    assert expert.metadata.training["frozen_prefix_layers"] == 0
    assert {n.rsplit(".", 1)[0] for n in expert.lora} == {"transformer.h.1.attn", "transformer.h.1.mlp"}
    assert first_layer(model, expert.lora) == 1


def test_cached_prefix_reuses_the_frozen_layers_and_changes_nothing_above(tiny_llama):
    # Any forward pass (here with an attention mask and a hook on the top layer) inside the block gets what the
    # full model gives; the second pass over the same rows reuses the layers below, while the top layer's
    # weights may change (an expert folded in) and still count.
    model, _ = tiny_llama
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    top = model.get_submodule("model.layers.1.mlp.down_proj")
    seen = []
    handle = top.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
            with cached_prefix(model, 1) as cache:
                first = model(input_ids=ids, attention_mask=mask).logits
                second = model(input_ids=ids, attention_mask=mask).logits
                top.weight.add_(0.5)  # a change above the cached layers
                changed = model(input_ids=ids, attention_mask=mask).logits
                top.weight.sub_(0.5)
                other = model(input_ids=ids[:1, :3]).logits  # another row: computed, not reused
            again = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    assert (cache.misses, cache.hits) == (3, 4)
    for got in (first, second, again):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(changed, want, atol=1e-3)
    torch.testing.assert_close(other, model(input_ids=ids[:1, :3]).logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(seen[1], seen[0])  # the top layer saw the same inputs
    assert type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"  # put back
    with cached_prefix(model, 0) as none:
        assert none is None


def test_prefix_states_do_not_depend_on_the_examples_beside_them():
    """A resumed suite build keeps other examples' states than an uninterrupted one: an example's states must be
    the same bits whichever examples are computed with it (padded chunks change the last bits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moerge.train.data import pad_batch

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        rows = [torch.randint(3, 300, (n,)).tolist() for n in (48, 30, 48, 12, 40, 7)]
    together = prefix_batches(model, [pad_batch(rows, rows, 0)], 2)[0][0]
    for i, row in enumerate(rows):
        alone = prefix_batches(model, [pad_batch([row], [row], 0)], 2)[0][0]
        assert torch.equal(together[i, : len(row)], alone[0]), i
