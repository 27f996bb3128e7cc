"""Paged expert factors (memory-mapped stacked factors + an LRU) give the pre-stacked layer's outputs.

References: the stacked file against `stack_factors` of the experts themselves; `PagedExpertLayer.delta`
against `expert_delta` over the pre-stacked factors; a routed model attached with paging on against the same
recipe attached with paging off (which the other routing tests check against dense loops)."""

from __future__ import annotations

import pytest
import torch

from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
from moerge.experts.library import ExpertLibrary, ExpertRef
from moerge.experts.stacked import ensure_stacked_factors
from moerge.model.expert_layer import PagedExpertLayer, expert_delta, stack_factors
from moerge.recipes import attach, detach
from moerge.recipes.facade import PagingConfig
from moerge.routing.call import CallOwner
from moerge.routing.selection import Selection
from moerge.transforms import centroids

E = 24
MODULES = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


def make_experts(model, n=E, seed=0, prefix="e"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lora = {}
        for j, m in enumerate(MODULES):
            if i % 7 == 3 and j == 1:
                continue  # an expert without this module: zeros in the stack
            lin = model.get_submodule(m)
            r = 2 + (i + j) % 3
            lora[m] = LoraModule(
                torch.randn(r, lin.in_features, generator=g),
                torch.randn(lin.out_features, r, generator=g) * 0.5,
                alpha=float(r + i % 4),
            )
        out.append(Expert(ExpertMetadata(name=f"{prefix}{i:03d}", task=f"t{i % 5}"), lora=lora))
    return out


@pytest.fixture(scope="module")
def library(tiny_llama, tmp_path_factory):
    model, _ = tiny_llama
    lib = ExpertLibrary.create(tmp_path_factory.mktemp("paged") / "lib")
    lib.add_many(make_experts(model))
    return lib


def test_stacked_file_holds_the_stacked_factors(library):
    names = library.names()
    factors = ensure_stacked_factors(library, names)
    assert sorted(factors) == MODULES
    experts = [library.get(n) for n in names]
    for m in MODULES:
        d_in, d_out = factors[m].A.shape[2], factors[m].Bt.shape[2]
        A, Bt = stack_factors([e.lora.get(m) for e in experts], d_in, d_out)
        R = A.shape[1]  # the file pads to the largest rank over all modules; the extra rows are zeros
        torch.testing.assert_close(factors[m].A[:, :R], A, rtol=0, atol=0)
        torch.testing.assert_close(factors[m].Bt[:, :R], Bt, rtol=0, atol=0)
        assert not factors[m].A[:, R:].any() and not factors[m].Bt[:, R:].any()
    # written once: a second call maps the same files
    again = ensure_stacked_factors(library, names)
    assert {m: f.path for m, f in again.items()} == {m: f.path for m, f in factors.items()}
    # another order is another expert set (rows follow the routing order)
    rev = ensure_stacked_factors(library, names[::-1], modules=MODULES[:1])
    torch.testing.assert_close(rev[MODULES[0]].A, factors[MODULES[0]].A.flip(0))


def _selections(N, B, T, k, g):
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    w = torch.rand(N, k, generator=g)
    ex_idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(B)])
    dense = torch.rand(N, E, generator=g) * (torch.rand(N, E, generator=g) > 0.6)
    return [
        (Selection(w, idx, "token"), "output"),
        (Selection(w, idx, "token"), "factor"),
        (Selection(torch.rand(B, k, generator=g), ex_idx, "example"), "output"),
        (Selection(torch.rand(B, k, generator=g), ex_idx, "example"), "parameter"),
        (Selection(dense, None, "token"), "output"),
    ]


@pytest.mark.parametrize("capacity", [4, 64])
def test_paged_layer_matches_the_prestacked_factors(library, capacity):
    """Every selection kind, several calls in a row (cache hits, evictions, more experts than the cache holds)."""
    m = MODULES[0]
    f = ensure_stacked_factors(library, library.names(), modules=[m])[m]
    base = torch.nn.Linear(f.A.shape[2], f.Bt.shape[2])
    layer = PagedExpertLayer(base, m, f.A, f.Bt, CallOwner(), capacity)
    A, Bt = f.A.clone(), f.Bt.clone()  # the pre-stacked layer's factors
    g = torch.Generator().manual_seed(5)
    B, T, k = 2, 5, 2
    for _ in range(3):
        x = torch.randn(B, T, f.A.shape[2], generator=g)
        for sel, agg in _selections(B * T, B, T, k, g):
            xs = x if sel.per == "example" else x.reshape(B * T, -1)
            torch.testing.assert_close(layer.delta(xs, sel, agg), expert_delta(xs, A, Bt, sel, agg))


def test_lru_reads_only_what_is_not_cached(library):
    m = MODULES[1]
    f = ensure_stacked_factors(library, library.names(), modules=[m])[m]
    layer = PagedExpertLayer(torch.nn.Linear(f.A.shape[2], f.Bt.shape[2]), m, f.A, f.Bt, CallOwner(), 4)
    x = torch.randn(3, f.A.shape[2])

    def run(experts):
        idx = torch.tensor([experts] * 3)
        layer.delta(x, Selection(torch.ones(3, len(experts)), idx, "token"), "output")
        return layer.pages.reads

    assert run([1, 2]) == 2
    assert run([2, 1]) == 2  # both cached
    assert run([3, 4]) == 4  # two free slots left
    assert run([5, 1]) == 5  # the cache is full: 5 evicts the least recently used, 2 (1 is in this call)
    assert run([1, 5]) == 5
    assert run([2, 3]) == 6  # 2 read again, evicting 4 (the least recently used); 3 still cached
    cached = {int(e) for e in layer.pages._owner}
    assert cached == {1, 2, 3, 5}
    assert all(int(layer.pages._owner[layer.pages._slot[e]]) == e for e in cached)


class BagEmbedder:
    """A cheap embedder of token ids: a fixed random projection of the token counts (deterministic)."""

    name = "test-bag-embedder"

    def __init__(self, vocab, dim=16):
        self.proj = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(9))

    def embed_ids(self, ids, mask=None):
        counts = torch.zeros(ids.shape[0], self.proj.shape[0])
        counts.scatter_add_(
            1, ids, torch.ones_like(ids, dtype=torch.float32) if mask is None else mask.float()
        )
        return counts @ self.proj

    def embed_texts(self, texts):  # pragma: no cover - the tests route token ids
        raise NotImplementedError


@pytest.mark.parametrize(
    "recipe, options",
    [
        ("arrow", {"k": 2}),
        ("arrow", {"k": 3, "aggregation": "factor", "granularity": "example"}),
        ("embedding_centroids", {"k": 2, "aggregation": "output"}),
        ("embedding_centroids", {"k": 3, "aggregation": "parameter"}),
    ],
)
def test_paged_attach_matches_the_prestacked_one(tiny_llama, library, recipe, options):
    model, tok = tiny_llama
    emb = BagEmbedder(model.config.vocab_size)
    g = torch.Generator().manual_seed(11)
    for n in library.names():
        library.put_artifact(
            centroids.EMBED_KIND,
            centroids.embed_config(emb.name),
            n,
            {"centroid": torch.randn(16, generator=g), "samples": torch.randn(2, 16, generator=g)},
        )
    ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=g)
    outs = {}
    for mode in ("off", "on"):
        routed = attach(
            model, library, recipe, embedder=emb, paging=PagingConfig(mode=mode, cache_experts=5), **options
        )
        try:
            paged = [la for la in routed.expert_layers.values() if isinstance(la, PagedExpertLayer)]
            assert len(paged) == (len(MODULES) if mode == "on" else 0)
            with torch.no_grad():
                outs[mode] = routed(input_ids=ids).logits
                outs[mode + "2"] = routed(input_ids=ids.flip(0)).logits  # a second call: from the cache
        finally:
            detach(routed)
    torch.testing.assert_close(outs["on"], outs["off"])
    torch.testing.assert_close(outs["on2"], outs["off2"])


def test_auto_paging_hands_recipes_lazy_experts(library):
    from moerge.recipes.facade import resolve_experts

    small, _ = resolve_experts(library, paging=PagingConfig(threshold=E + 1))
    big, _ = resolve_experts(library, paging=PagingConfig(threshold=E))
    assert isinstance(small[0], Expert) and all(isinstance(e, ExpertRef) for e in big)
    torch.testing.assert_close(big[0].lora[MODULES[0]].A, small[0].lora[MODULES[0]].A)


def test_paged_factors_follow_a_replaced_expert(tiny_llama, tmp_path):
    model, _ = tiny_llama
    lib = ExpertLibrary.create(tmp_path / "lib")
    lib.add_many(make_experts(model, n=3))
    m = MODULES[0]
    before = ensure_stacked_factors(lib, lib.names(), modules=[m])[m].A.clone()
    new = make_experts(model, n=3, seed=7)[1]
    lib.add(new, overwrite=True)
    after = ensure_stacked_factors(lib, lib.names(), modules=[m])[m]
    lm = new.lora[m]
    torch.testing.assert_close(after.A[1, : lm.rank], lm.A * lm.scaling)
    torch.testing.assert_close(after.A[0], before[0])
