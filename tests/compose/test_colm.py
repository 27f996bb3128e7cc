"""Co-LLM (moerge.compose.colm): the marginal-likelihood loss against a dense loop, training of the deferral
head, and co-decoding against each model's own greedy decoding."""

from __future__ import annotations

import math

import pytest
import torch

from moerge.backbones.tiny import build_tiny_model
from moerge.compose import CoLLM, CoLLMTrainConfig, co_decode, deferral_nll, train_deferral
from moerge.errors import MalformedConfigError

ROWS = [
    {"prompt": f"{w}=", "completion": w[::-1]} for w in ["abc", "hello", "xyz", "moerge", "token", "qrst"]
]


@pytest.fixture(scope="module")
def pair():
    base, tok = build_tiny_model(seed=11)
    assistant, _ = build_tiny_model(seed=12, hidden_size=32, num_heads=2, intermediate_size=64)
    return base, assistant, tok


def test_deferral_nll_matches_dense_loop():
    g = torch.Generator().manual_seed(0)
    b, t, v = 2, 5, 7
    lb, la = torch.randn(b, t, v, generator=g), torch.randn(b, t, v, generator=g)
    s = torch.randn(b, t, generator=g) * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 2] = -100
    labels[1, 4] = -100
    total, n = 0.0, 0
    for i in range(b):
        for j in range(t - 1):
            y = int(labels[i, j + 1])
            if y == -100:
                continue
            pi = 1 / (1 + math.exp(-float(s[i, j])))
            p_b = math.exp(float(lb[i, j, y])) / sum(math.exp(float(z)) for z in lb[i, j])
            p_a = math.exp(float(la[i, j, y])) / sum(math.exp(float(z)) for z in la[i, j])
            total += -math.log((1 - pi) * p_b + pi * p_a)
            n += 1
    assert float(deferral_nll(lb, la, s, labels)) == pytest.approx(total / n, rel=1e-5)


def _data_nll(colm, tok):
    from moerge.train.data import encode_examples, pad_batch

    enc = encode_examples(tok, ROWS, 32)
    x, y = pad_batch(enc.ids, enc.labels, tok.pad_token_id)
    with torch.no_grad():
        return float(deferral_nll(*colm(x), y))


def test_training_the_head_lowers_the_marginal_nll_and_leaves_the_models(pair):
    base, assistant, tok = pair
    colm = CoLLM(base, assistant)
    before_models = [p.clone() for p in [*base.parameters(), *assistant.parameters()]]
    before = _data_nll(colm, tok)
    result = train_deferral(colm, tok, ROWS, CoLLMTrainConfig(steps=25, init_steps=5, batch_size=4, lr=0.05))
    after = _data_nll(colm, tok)
    assert after < before - 0.05, (before, after)
    assert len(result.losses) == 25 and len(result.init_losses) == 5
    for old, new in zip(before_models, [*base.parameters(), *assistant.parameters()]):
        assert torch.equal(old, new)


def _greedy(model, tok, prompt, n):
    """Reference: each model's own greedy decoding, full prefix re-run at every step (no cache)."""
    ids = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return out


def _random_head(colm, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        colm.head.weight.copy_(torch.randn(colm.head.weight.shape, generator=g))
        colm.head.bias.fill_(0.1)


def test_threshold_zero_is_the_assistant_and_one_is_the_base(pair):
    base, assistant, tok = pair
    colm = CoLLM(base, assistant)
    _random_head(colm, 0)
    prompts = ["abc=", "hello="]
    always = co_decode(colm, tok, prompts, threshold=0.0, max_new_tokens=8)
    never = co_decode(colm, tok, prompts, threshold=1.0, max_new_tokens=8)
    for p, a, b in zip(prompts, always, never):
        assert a.tokens == _greedy(assistant, tok, p, 8) and a.deferral_rate == 1.0
        assert b.tokens == _greedy(base, tok, p, 8) and b.deferral_rate == 0.0
    assert always[0].tokens != never[0].tokens  # the two models disagree, so the test can tell them apart


def test_intermediate_threshold_follows_the_head_token_by_token(pair):
    base, assistant, tok = pair
    colm = CoLLM(base, assistant)
    _random_head(colm, 3)
    got = co_decode(colm, tok, "xyz=", threshold=0.5, max_new_tokens=10)[0]
    ids = [tok.bos_token_id, *tok("xyz=", add_special_tokens=False)["input_ids"]]
    want, chose = [], []
    with torch.no_grad():
        for _ in range(10):
            x = torch.tensor([ids + want])
            out = base(x, output_hidden_states=True)
            h = out.hidden_states[-1][0, -1]
            pi = torch.sigmoid(h @ colm.head.weight[0] + colm.head.bias[0])
            defer = bool(pi > 0.5)
            nxt = int((assistant(x).logits if defer else out.logits)[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            want.append(nxt)
            chose.append(defer)
    assert got.tokens == want and got.deferred == chose
    assert 0 < got.deferral_rate < 1  # this head mixes both models here


def test_refuses_a_bad_threshold_and_different_vocabularies(pair):
    base, assistant, tok = pair
    with pytest.raises(MalformedConfigError, match="threshold"):
        co_decode(CoLLM(base, assistant), tok, "a", threshold=1.5)
    other, _ = build_tiny_model(seed=1)
    other.resize_token_embeddings(other.config.vocab_size + 8)
    with pytest.raises(MalformedConfigError, match="one tokenizer"):
        CoLLM(base, other)
