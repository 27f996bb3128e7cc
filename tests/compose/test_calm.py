"""CALM (moerge.compose.calm): zero-initialised composition equals the anchor, the cross-attention and the
composed forward against dense computations written out here, and training of the bridges."""

from __future__ import annotations

import math

import pytest
import torch

from moerge.backbones.tiny import build_tiny_model
from moerge.compose import CALM, CALMConfig, CALMTrainConfig, CrossAttentionBridge, train_calm
from moerge.errors import MalformedConfigError


@pytest.fixture(scope="module")
def models():
    anchor, tok = build_tiny_model(seed=21, num_layers=3)
    augmenting, _ = build_tiny_model(seed=22, hidden_size=32, num_heads=2, intermediate_size=64)
    return anchor, augmenting, tok


X = torch.tensor([[1, 40, 41, 42, 30, 31, 77], [1, 50, 51, 52, 53, 54, 55]])


def _randomise(bridge: CrossAttentionBridge, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bridge.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def dense_cross_attention(bridge: CrossAttentionBridge, hb: torch.Tensor, ha: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ/√d) V W_O per head, anchor position t over augmenting positions ≤ t, written out."""
    w = {n: p.detach() for n, p in bridge.named_parameters()}
    b_, t_, d = hb.shape
    h = bridge.num_heads
    dh = d // h
    out = torch.zeros(b_, t_, d)
    for b in range(b_):
        a = ha[b] @ w["proj.weight"].T + w["proj.bias"]
        q, k, v = hb[b] @ w["q.weight"].T, a @ w["k.weight"].T, a @ w["v.weight"].T
        for t in range(t_):
            heads = []
            for i in range(h):
                sl = slice(i * dh, (i + 1) * dh)
                scores = torch.stack([q[t, sl] @ k[j, sl] / math.sqrt(dh) for j in range(t + 1)])
                p = torch.softmax(scores, 0)
                heads.append(sum(p[j] * v[j, sl] for j in range(t + 1)))
            out[b, t] = torch.cat(heads) @ w["o.weight"].T
    return out


def test_zero_initialised_composition_is_the_anchor(models):
    anchor, augmenting, _ = models
    calm = CALM(anchor, augmenting)
    assert calm.pairs == [(1, 0), (2, 1)]  # every layer of the shallower model, aligned from the top
    with torch.no_grad():
        assert torch.equal(calm(X), anchor(X).logits)


def test_cross_attention_matches_dense_computation():
    bridge = CrossAttentionBridge(64, 32, 4)
    _randomise(bridge, 0)
    g = torch.Generator().manual_seed(1)
    hb, ha = torch.randn(2, 6, 64, generator=g), torch.randn(2, 6, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            bridge(hb, ha), dense_cross_attention(bridge, hb, ha), rtol=1e-4, atol=1e-5
        )


def test_composed_forward_adds_each_bridge_after_its_anchor_layer(models):
    anchor, augmenting, _ = models
    calm = CALM(anchor, augmenting, CALMConfig(anchor_layers=[0, -1], augmenting_layers=[1, 0], num_heads=2))
    assert calm.pairs == [(0, 1), (2, 0)]
    for i, bridge in enumerate(calm.bridges.values()):
        _randomise(bridge, 10 + i)
    with torch.no_grad():
        aug = augmenting(X, output_hidden_states=True).hidden_states
        # reference: the anchor's own layers run one by one, the dense update added after layers 0 and 2
        inner = anchor.model
        h = inner.embed_tokens(X)
        pos = torch.arange(X.shape[1])[None]
        rope = inner.rotary_emb(h, pos)
        mask = torch.full((X.shape[1], X.shape[1]), float("-inf")).triu(1)[None, None]
        for i, layer in enumerate(inner.layers):
            out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
            h = out[0] if isinstance(out, tuple) else out
            if i == 0:
                h = h + dense_cross_attention(calm.bridges["0"], h, aug[2])
            if i == 2:
                h = h + dense_cross_attention(calm.bridges["2"], h, aug[1])
        want = anchor.lm_head(inner.norm(h))
        got = calm(X)
    assert not torch.allclose(got, anchor(X).logits, atol=1e-3)  # the bridges change the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_training_the_bridges_lowers_the_loss_and_leaves_the_models(models):
    anchor, augmenting, tok = models
    rows = [{"prompt": f"{w}>", "completion": w.upper()} for w in ["abc", "dog", "moe", "lora", "xyz", "cat"]]
    calm = CALM(anchor, augmenting, CALMConfig(num_heads=2))
    frozen = [p.clone() for p in [*anchor.parameters(), *augmenting.parameters()]]
    losses = train_calm(calm, tok, rows, CALMTrainConfig(steps=30, batch_size=6, lr=1e-2))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3, losses
    for old, new in zip(frozen, [*anchor.parameters(), *augmenting.parameters()]):
        assert torch.equal(old, new)


def test_config_errors(models):
    anchor, augmenting, _ = models
    with pytest.raises(ValueError, match="pair up"):
        CALMConfig(anchor_layers=[0, 1], augmenting_layers=[0])
    with pytest.raises(MalformedConfigError, match="repeat"):
        CALM(anchor, augmenting, CALMConfig(anchor_layers=[0, 0], augmenting_layers=[0, 1]))
    with pytest.raises(MalformedConfigError, match="heads"):
        CALM(anchor, augmenting, CALMConfig(num_heads=3))
