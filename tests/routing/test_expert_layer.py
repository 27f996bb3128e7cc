"""Every mode of the expert layer against a dense reference written out as an explicit loop over experts."""

from __future__ import annotations

import pytest
import torch

from moerge.experts.expert import LoraModule
from moerge.model import expert_layer
from moerge.model.expert_layer import expert_delta, stack_factors
from moerge.routing.selection import Selection

E, D_IN, D_OUT = 6, 10, 7


@pytest.fixture(scope="module")
def factors():
    g = torch.Generator().manual_seed(0)
    mods = []
    for e in range(E):
        r = [1, 3, 2][e % 3]
        mods.append(
            LoraModule(torch.randn(r, D_IN, generator=g), torch.randn(D_OUT, r, generator=g), alpha=1.0 + e)
        )
    mods[4] = None  # an expert that does not adapt this module
    A, Bt = stack_factors(mods, D_IN, D_OUT)
    return mods, A, Bt


def delta_of(m):
    return torch.zeros(D_OUT, D_IN) if m is None else m.scaling * m.B @ m.A


def sparse_weights(rows, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(rows)])
    w = torch.rand(rows, k, generator=g)
    return idx, w


def reference_token(x2, mods, idx, w, aggregation):
    """x2 [N, d_in]; idx/w [N, k] (idx None: dense). An explicit loop over tokens and experts."""
    out = torch.zeros(x2.shape[0], D_OUT)
    for n in range(x2.shape[0]):
        experts = range(E) if idx is None else idx[n].tolist()
        ws = w[n].tolist()
        if aggregation == "factor":
            A_mix = sum(
                wt * (torch.zeros(4, D_IN) if mods[e] is None else _pad(mods[e].scaling * mods[e].A, 0))
                for wt, e in zip(ws, experts)
            )
            B_mix = sum(
                wt * (torch.zeros(D_OUT, 4) if mods[e] is None else _pad(mods[e].B, 1))
                for wt, e in zip(ws, experts)
            )
            out[n] = B_mix @ (A_mix @ x2[n])
        else:
            for wt, e in zip(ws, experts):
                out[n] += wt * (delta_of(mods[e]) @ x2[n])
    return out


def _pad(t, dim):
    """Zero-pad a factor's rank dimension to 4 (factor mixing across experts of different ranks)."""
    shape = list(t.shape)
    shape[dim] = 4
    out = torch.zeros(shape)
    if dim == 0:
        out[: t.shape[0]] = t
    else:
        out[:, : t.shape[1]] = t
    return out


@pytest.mark.parametrize("aggregation", ["output", "parameter", "factor"])
@pytest.mark.parametrize("k", [1, 2, 4, None])
@pytest.mark.parametrize("path", ["gather", "csr", "blocks", "all_experts"])
def test_per_token_matches_loop(factors, aggregation, k, path, monkeypatch):
    """The per-token kernels: gather factors + bmm; sparse CSR (sampled_addmm + CSR @ dense); tokens grouped
    by expert in blocks + bmm; one matmul over all experts."""
    gather_ratio, group_min = {
        "gather": (0, 10**9),
        "csr": (0, 0),
        "blocks": (0, 0),
        "all_experts": (100, 0),
    }[path]
    monkeypatch.setattr(expert_layer, "SPARSE_KERNELS", path != "blocks")
    mods, A, Bt = factors
    x = torch.randn(2, 5, D_IN)
    N = 10
    if k is None:
        w = torch.softmax(torch.randn(N, E), -1)
        sel, idx = Selection(w, None, "token"), None
    else:
        idx, w = sparse_weights(N, k)
        sel = Selection(w, idx, "token")
    got = expert_delta(x, A, Bt, sel, aggregation, gather_ratio=gather_ratio, group_min_pairs=group_min)
    want = reference_token(x.reshape(N, D_IN), mods, idx, w, aggregation).view(2, 5, D_OUT)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aggregation", ["output", "parameter", "factor"])
@pytest.mark.parametrize("k", [1, 3, None])
def test_per_example_mixed_batch_matches_loop(factors, aggregation, k):
    """Each example has its own expert set and weights (a mixed-task batch)."""
    mods, A, Bt = factors
    B, T = 3, 4
    x = torch.randn(B, T, D_IN)
    if k is None:
        w = torch.rand(B, E)
        sel, idx = Selection(w, None, "example"), None
    else:
        idx, w = sparse_weights(B, k, seed=5)
        sel = Selection(w, idx, "example")
    got = expert_delta(x, A, Bt, sel, aggregation)
    want = torch.zeros(B, T, D_OUT)
    for b in range(B):  # per example: explicit loop over its experts
        rows_idx = None if idx is None else idx[b : b + 1].expand(T, -1)
        want[b] = reference_token(x[b], mods, rows_idx, w[b : b + 1].expand(T, -1), aggregation)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_parameter_mode_merges_weights_per_example(factors):
    """aggregation='parameter' per example equals running x through W_b = Σ w_e ΔW_e built explicitly."""
    mods, A, Bt = factors
    x = torch.randn(2, 3, D_IN)
    w = torch.rand(2, E)
    got = expert_delta(x, A, Bt, Selection(w, None, "example"), "parameter")
    for b in range(2):
        dW = sum(w[b, e] * delta_of(mods[e]) for e in range(E))
        torch.testing.assert_close(got[b], x[b] @ dW.T, atol=1e-5, rtol=1e-5)


def test_plain_2d_input(factors):
    mods, A, Bt = factors
    x = torch.randn(4, D_IN)
    idx, w = sparse_weights(4, 2)
    got = expert_delta(x, A, Bt, Selection(w, idx, "example"), "output")
    want = reference_token(x, mods, idx, w, "output")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_grouped_blocks_with_skewed_routing_and_autograd(factors):
    """Most tokens on one expert (padding to blocks), with gradients flowing to the weights (the block path)."""
    mods, A, Bt = factors
    N = 70
    x = torch.randn(N, D_IN)
    idx = torch.stack([torch.tensor([0, 1]) if n % 7 else torch.tensor([5, 2]) for n in range(N)])
    w = torch.rand(N, 2, requires_grad=True)
    got = expert_delta(x, A, Bt, Selection(w, idx, "token"), "output", gather_ratio=0, group_min_pairs=0)
    want = reference_token(x, mods, idx, w.detach(), "output")
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
