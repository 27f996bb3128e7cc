"""The expert layer: a base linear module plus every expert's LoRA factors, pre-stacked once.

Layout (built once by `stack_factors`): ``A`` is ``[E, R, d_in]`` with each expert's scaling folded in, and
``Bt`` is ``[E, R, d_out]`` (B transposed, so a gather gives contiguous ``[k·R, d_out]`` blocks). Experts of
smaller rank are zero-padded to R, which changes nothing: the padded rows of A meet padded rows of Bt.
An expert without this module gets zeros (no update).

`expert_delta` computes the experts' contribution for a `Selection` without a Python loop over experts:

- per token, dense or E ≤ 8k: one matmul against all experts' A, weight, one matmul against all Bt;
- per token, sparse, many (token, expert) pairs (prefill): sparse CSR kernels — ``sampled_addmm`` computes
  only the selected entries of x·A_allᵀ, then CSR × Bt_all (O(N·k·R·d), independent of E); with autograd
  or other dtypes, pairs sorted by expert into blocks of 16–64 rows and two ``bmm`` (a grouped matmul);
- per token, sparse, few pairs (decode): gather the selected factors and batched-matmul them;
- per example (mixed batches): gather each example's experts (``[B, k·R, d]``) and batched-matmul over its
  tokens, or, for ``aggregation="parameter"``, build ``ΔW_b = Σ w·BA`` per example and run one forward.

Aggregation: ``"output"`` = Σ_k w_k B_k A_k x; ``"parameter"`` = (Σ_k w_k B_k A_k) x (the same numbers for a
linear module; per example it is computed by materialising ΔW, as SMEAR/DAM do); ``"factor"`` =
(Σ_k w_k B_k)(Σ_k w_k A_k) x, the factor mix of mttl's Arrow (``lora_merge_after=False``), computed as
z = Σ_k w_k A_k x, y = Σ_k w_k B_k z without forming per-token A.

Dense experts (full fine-tunes' task vectors) hold a whole ``ΔW_e [d_out, d_in]`` (and optionally a bias
update ``Δb_e``) for a module instead of factors: ``D [E_d, d_out, d_in]`` stacked once for the E_d dense
experts only, with ``dense_ids`` their positions among the layer's E experts (`dense_delta`). Output
aggregation computes ``Σ_e w_e ΔW_e x`` (all E_d products, weighted; unselected experts weigh 0); parameter
aggregation per example builds ``ΔW_b = Σ_e w_be ΔW_e`` and runs one forward per example. A library may mix
LoRA and dense experts: each expert contributes through its own part. Factor aggregation mixes LoRA factors,
which a dense expert has none of: it is refused.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
from torch import nn

from moerge.errors import RecipeNotApplicableError, RoutingError, ShapeMismatchError
from moerge.experts.expert import LoraModule
from moerge.routing.call import Aggregation, BatchCall, CallOwner, active_call
from moerge.routing.selection import Selection

# Per-token sparse selections use sparse kernels when E > GATHER_RATIO · k; below that one matmul over all
# experts is cheaper on CPUs (a GEMM runs ~20–30× more multiply-adds per second than a gather moves floats).
GATHER_RATIO = 8
# From this many (token, expert) pairs on (prefill), the CSR / grouped kernels; below it (decode), gathers.
GROUP_MIN_PAIRS = 64
# Use torch's sparse CSR kernels (sampled_addmm + CSR @ dense) for per-token top-k; else the block-grouped bmm.
SPARSE_KERNELS = True
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def module_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear-like module: ``nn.Linear``, transformers' ``Conv1D`` (fan-in-fan-out) or
    ``nn.Embedding`` (the linear map from a one-hot token: ``(num_embeddings, embedding_dim)``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        w = cast(torch.Tensor, module.weight)
        return w.shape[0], w.shape[1]
    raise ShapeMismatchError(
        f"module of type {type(module).__name__} is not a linear layer (nn.Linear, Conv1D) or an nn.Embedding; "
        "moerge injects experts into those only — remove it from the experts' target modules."
    )


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def stack_factors(
    modules: list[LoraModule | None], d_in: int, d_out: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack experts' factors: ``A [E, R, d_in]`` (scaling folded in) and ``Bt [E, R, d_out]``, zero-padded."""
    R = max((m.rank for m in modules if m is not None), default=1)
    E = len(modules)
    A = torch.zeros(E, R, d_in, dtype=dtype)
    Bt = torch.zeros(E, R, d_out, dtype=dtype)
    for e, m in enumerate(modules):  # build time only, not the hot path
        if m is None:
            continue
        r = m.rank
        A[e, :r] = (m.A.float() * m.scaling).to(dtype)
        Bt[e, :r] = m.B.float().T.to(dtype)
    return A, Bt


def expert_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    Bt: torch.Tensor,
    sel: Selection,
    aggregation: Aggregation = "output",
    gather_ratio: int = GATHER_RATIO,
    group_min_pairs: int = GROUP_MIN_PAIRS,
) -> torch.Tensor:
    """The experts' contribution to a module's output for input ``x [..., d_in]``: ``[..., d_out]``."""
    E, R, d_in = A.shape
    d_out = Bt.shape[-1]
    lead = x.shape[:-1]
    if sel.per == "example":
        x3 = x.reshape(sel.rows, -1, d_in)
        return _example_delta(x3, A, Bt, sel, aggregation).reshape(*lead, d_out)
    xs = x.reshape(-1, d_in)
    N = xs.shape[0]
    if sel.rows != N:
        raise ShapeMismatchError(f"a per-token selection has {sel.rows} rows for {N} tokens")
    if sel.indices is None or gather_ratio * sel.k >= E:
        w = sel.dense(E).to(xs.dtype)[..., None]  # [N, E, 1]
        z = (xs @ A.reshape(E * R, d_in).T).view(N, E, R)
        z = w * (w * z).sum(1, keepdim=True) if aggregation == "factor" else w * z
        y = z.reshape(N, E * R) @ Bt.reshape(E * R, d_out)
    elif N * sel.k >= group_min_pairs:
        if _csr_ok(xs, sel):
            y = _csr_token_delta(xs, A, Bt, sel, aggregation)
        else:
            y = _grouped_token_delta(xs, A, Bt, sel, aggregation)
    else:
        k = sel.k
        flat = sel.indices.reshape(-1)
        z = torch.bmm(A.index_select(0, flat).view(N, k * R, d_in), xs[:, :, None]).view(N, k, R)
        w = _as(sel.weights, xs.dtype)[..., None]  # [N, k, 1]
        z = w * (w * z).sum(1, keepdim=True) if aggregation == "factor" else w * z
        y = torch.bmm(z.view(N, 1, k * R), Bt.index_select(0, flat).view(N, k * R, d_out)).view(N, d_out)
    return y.reshape(*lead, d_out)


def _csr_ok(xs: torch.Tensor, sel: Selection) -> bool:
    """CSR kernels: CPU float32/64 inference only (the grouped bmm path serves autograd and other dtypes)."""
    needs_grad = torch.is_grad_enabled() and (xs.requires_grad or sel.weights.requires_grad)
    return (
        SPARSE_KERNELS
        and xs.device.type == "cpu"
        and xs.dtype in (torch.float32, torch.float64)
        and not needs_grad
    )


def _csr_token_delta(
    xs: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, sel: Selection, aggregation: Aggregation
) -> torch.Tensor:
    """Per-token top-k with sparse kernels: the selection is a CSR pattern over ``[N, E·R]`` (k·R entries per
    token). ``z = sampled(x @ A_allᵀ)`` computes only the selected entries (``sampled_addmm``); the weighted
    ``z`` as a CSR matrix times ``Bt_all [E·R, d_out]`` gives the output in token order. Cost O(N·k·R·d),
    independent of E, with no sort, gather or padding."""
    N, d_in = xs.shape
    E, R, _ = A.shape
    k = sel.k
    assert sel.indices is not None  # a sparse selection (the caller checked)
    idx, order = sel.indices.sort(dim=1)  # CSR wants ascending columns within a row
    w = sel.weights.to(xs.dtype).gather(1, order)[..., None]  # [N, k, 1]
    cols = (idx[..., None] * R + torch.arange(R, device=xs.device)).reshape(-1)
    crow = torch.arange(0, N * k * R + 1, k * R, device=xs.device)
    pattern = torch.sparse_csr_tensor(
        crow, cols, xs.new_zeros(N * k * R), size=(N, E * R), check_invariants=False
    )
    z = torch.sparse.sampled_addmm(pattern, xs, A.reshape(E * R, d_in).T, beta=0.0).values().view(N, k, R)
    z = w * (w * z).sum(1, keepdim=True) if aggregation == "factor" else w * z
    zz = torch.sparse_csr_tensor(crow, cols, z.reshape(-1), size=(N, E * R), check_invariants=False)
    return zz @ Bt.reshape(E * R, -1)


def _grouped_token_delta(
    xs: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, sel: Selection, aggregation: Aggregation
) -> torch.Tensor:
    """Per-token top-k as a block-grouped matmul (no loop over experts, balanced whatever the routing):
    (token, expert) pairs are sorted by expert and cut into blocks of ``b`` rows that each belong to one
    expert (each expert's group padded to a multiple of b, so at most E·(b−1) padding rows); every block
    meets its expert's factors in two ``bmm``. Padding rows read token 0 and are never read back."""
    N, d_in = xs.shape
    E, R, _ = A.shape
    d_out = Bt.shape[-1]
    k = sel.k
    P = N * k
    b = _block_size(P, E)
    dev = xs.device
    assert sel.indices is not None  # a sparse selection (the caller checked)
    flat_e = sel.indices.reshape(-1)
    order = torch.argsort(flat_e, stable=True)  # pairs sorted by expert
    sorted_e = flat_e.index_select(0, order)
    counts = torch.bincount(flat_e, minlength=E)
    blocks = (counts + (b - 1)) // b
    starts = torch.cumsum(counts, 0) - counts
    padded_starts = (torch.cumsum(blocks, 0) - blocks) * b
    rank_in_group = torch.arange(P, device=dev) - starts.index_select(0, sorted_e)
    slot_sorted = padded_starts.index_select(0, sorted_e) + rank_in_group
    slot = torch.empty_like(slot_sorted).index_copy_(0, order, slot_sorted)  # row of pair n·k + j
    block_ends = torch.cumsum(blocks, 0)
    nb = int(block_ends[-1])
    block_expert = torch.searchsorted(block_ends, torch.arange(nb, device=dev), right=True)
    tok = torch.div(torch.arange(P, device=dev), k, rounding_mode="floor")
    src = torch.zeros(nb * b, dtype=torch.long, device=dev).index_copy_(0, slot, tok)
    X = xs.index_select(0, src).view(nb, b, d_in)
    Z = torch.bmm(X, A.index_select(0, block_expert).transpose(1, 2)).view(nb * b, R)
    w = sel.weights.to(xs.dtype).reshape(P)
    if aggregation == "factor":
        z_mix = (Z.index_select(0, slot).view(N, k, R) * w.view(N, k, 1)).sum(1)  # Σ_k w_k A_k x
        Z = xs.new_zeros(nb * b, R).index_copy_(0, slot, (z_mix[:, None, :] * w.view(N, k, 1)).reshape(P, R))
    else:
        Z = Z * xs.new_zeros(nb * b).index_copy_(0, slot, w)[:, None]
    Y = torch.bmm(Z.view(nb, b, R), Bt.index_select(0, block_expert)).view(nb * b, d_out)
    return Y.index_select(0, slot).view(N, k, d_out).sum(1)


def _block_size(pairs: int, num_experts: int) -> int:
    """Rows per block: about the mean group size, between 16 and 64."""
    return int(min(64, max(16, pairs // max(num_experts, 1))))


def _example_delta(
    x3: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, sel: Selection, aggregation: Aggregation
) -> torch.Tensor:
    B, T, d_in = x3.shape
    E, R, _ = A.shape
    d_out = Bt.shape[-1]
    if sel.indices is None:
        k = E
        A_sel = A.reshape(1, E * R, d_in).expand(B, -1, -1)
        Bt_sel = Bt.reshape(1, E * R, d_out).expand(B, -1, -1)
    else:
        k = sel.k
        flat = sel.indices.reshape(-1)
        A_sel = A.index_select(0, flat).view(B, k * R, d_in)
        Bt_sel = Bt.index_select(0, flat).view(B, k * R, d_out)
    w = sel.weights.to(x3.dtype)  # [B, k]
    if aggregation == "parameter":
        # ΔWᵀ_b = Σ_k w_bk (s A_k)ᵀ B_kᵀ : [B, d_in, d_out], then one forward per example.
        dWt = torch.bmm(A_sel.transpose(1, 2) * w.repeat_interleave(R, 1)[:, None, :], Bt_sel)
        return torch.bmm(x3, dWt)
    z = torch.bmm(x3, A_sel.transpose(1, 2)).view(B, T, k, R)
    wk = w[:, None, :, None]
    z = wk * (wk * z).sum(2, keepdim=True) if aggregation == "factor" else wk * z
    return torch.bmm(z.reshape(B, T, k * R), Bt_sel)


def dense_delta(
    x: torch.Tensor,
    D: torch.Tensor,
    Db: torch.Tensor | None,
    dense_ids: torch.Tensor,
    num_experts: int,
    sel: Selection,
    aggregation: Aggregation = "output",
) -> torch.Tensor:
    """The dense experts' contribution to a linear module's output for input ``x [..., d_in]``: ``[..., d_out]``.

    ``D [E_d, d_out, d_in]`` are the dense experts' weight updates (``nn.Linear`` layout), ``Db [E_d, d_out]``
    their bias updates (or None), ``dense_ids [E_d]`` their indices among the ``num_experts`` routed experts."""
    Ed, d_out, d_in = D.shape
    lead = x.shape[:-1]
    w = sel.dense(num_experts).index_select(1, dense_ids).to(x.dtype)  # [rows, E_d]
    if sel.per == "example":
        x3 = x.reshape(sel.rows, -1, d_in)
        if aggregation == "parameter":
            dW = torch.einsum("be,eoi->bio", w, D)  # ΔWᵀ_b = Σ_e w_be ΔW_eᵀ: [B, d_in, d_out]
            y = torch.bmm(x3, dW)
        else:
            z = (x3 @ D.reshape(Ed * d_out, d_in).T).view(sel.rows, -1, Ed, d_out)
            y = (z * w[:, None, :, None]).sum(2)
        if Db is not None:
            y = y + (w @ Db)[:, None, :]
        return y.reshape(*lead, d_out)
    xs = x.reshape(-1, d_in)
    if sel.rows != xs.shape[0]:
        raise ShapeMismatchError(f"a per-token selection has {sel.rows} rows for {xs.shape[0]} tokens")
    z = (xs @ D.reshape(Ed * d_out, d_in).T).view(-1, Ed, d_out)  # per token, output = parameter (linear)
    y = (z * w[..., None]).sum(1)
    if Db is not None:
        y = y + w @ Db
    return y.reshape(*lead, d_out)


class ExpertLayer(nn.Module):
    """A base linear module plus the stacked factors of E experts. The routing comes from the call its routed
    model has in flight in the current thread (`moerge.routing.call.active_call`); with none, the base alone."""

    A: torch.Tensor
    Bt: torch.Tensor
    D: torch.Tensor | None
    Db: torch.Tensor | None
    dense_ids: torch.Tensor | None

    def __init__(
        self,
        base: nn.Module,
        name: str,
        A: torch.Tensor,
        Bt: torch.Tensor,
        owner: CallOwner,
        dense: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
        has_lora: bool = True,
    ):
        """``dense``: the dense experts' ``(D [E_d, d_out, d_in], Db [E_d, d_out] or None, dense_ids [E_d])``
        (`dense_delta`); ``has_lora=False`` when no expert has LoRA factors here (A and Bt are zeros)."""
        super().__init__()
        self.base = base
        self.module_name = name
        self.d_in, self.d_out = A.shape[2], Bt.shape[2]
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("Bt", Bt, persistent=False)
        D, Db, ids = dense if dense is not None else (None, None, None)
        self.register_buffer("D", D, persistent=False)
        self.register_buffer("Db", Db, persistent=False)
        self.register_buffer("dense_ids", ids, persistent=False)
        self.has_lora = has_lora
        self.owner = owner

    @property
    def num_dense(self) -> int:
        """How many of the experts update this module with a dense ΔW."""
        return 0 if self.D is None else self.D.shape[0]

    def delta(self, x: torch.Tensor, sel: Selection, aggregation: Aggregation) -> torch.Tensor:
        """The selected experts' contribution for input ``x`` (LoRA factors and dense ΔW)."""
        if self.D is None:
            return expert_delta(x, self.A, self.Bt, sel, aggregation)
        if aggregation == "factor":
            raise RoutingError(
                f"module {self.module_name}: factor aggregation mixes LoRA factors, and a dense expert (a full "
                "fine-tune's ΔW) has none; route dense experts with aggregation 'output' or 'parameter'"
            )
        assert self.dense_ids is not None
        y = dense_delta(x, self.D, self.Db, self.dense_ids, self.num_experts, sel, aggregation)
        if self.has_lora:
            y = y + expert_delta(x, self.A, self.Bt, sel, aggregation)
        return y

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        call = active_call(self.owner)
        if call is None:
            return out
        if isinstance(call, BatchCall):  # several calls' rows in one forward (a server's decode step)
            for rows, part, agg in call.parts(self.module_name, x):
                delta = self.delta(x.index_select(0, rows), part, agg)
                out = out.index_add(0, rows, _as(delta, out.dtype))
            return out
        sel = call.select(self.module_name, x)
        if sel is None:
            return out
        return out + _as(self.delta(x, sel, call.aggregation), out.dtype)

    def extra_repr(self) -> str:
        dense = f", dense={self.num_dense}" if self.num_dense else ""
        return f"{self.module_name}: E={self.num_experts}, R={self.rank}{dense}, d_in={self.d_in}, d_out={self.d_out}"


class FactorPages:
    """An LRU of expert factors over memory-mapped stacked factors (`moerge.experts.stacked`): `gather` returns
    the factors of the experts a call selected, reading from the map only those not already cached.

    The cache is ``capacity`` slots of ``[R, d_in]`` / ``[R, d_out]`` on the layer's device, with a slot table
    ``[E]`` and a last-use stamp per slot; misses evict the least recently used slots not needed by the call,
    all with tensor ops (no Python loop over experts). A call needing more experts than the cache holds reads
    them straight from the map (nothing cached)."""

    def __init__(self, A: torch.Tensor, Bt: torch.Tensor, capacity: int):
        self.A_map, self.Bt_map = A, Bt  # [E, R, d_in], [E, R, d_out] (memory-mapped, CPU)
        self.capacity = max(1, min(int(capacity), A.shape[0]))
        self._A: torch.Tensor | None = None  # cache, made on first use on the input's device and dtype
        self._Bt: torch.Tensor | None = None
        self._slot = torch.full((A.shape[0],), -1, dtype=torch.long)  # expert -> slot (-1: not cached)
        self._owner = torch.full((self.capacity,), -1, dtype=torch.long)  # slot -> expert
        self._stamp = torch.zeros(self.capacity, dtype=torch.long)
        self._clock = 0
        self.reads = 0  # experts read from the map (misses), for diagnostics and tests

    def _read(
        self, ids: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += len(ids)
        return (
            self.A_map.index_select(0, ids).to(device=device, dtype=dtype),
            self.Bt_map.index_select(0, ids).to(device=device, dtype=dtype),
        )

    def gather(
        self, ids: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [U, R, d_in], Bt [U, R, d_out])`` of the experts ``ids`` (``[U]``, distinct, on the CPU)."""
        if len(ids) > self.capacity:
            return self._read(ids, device, dtype)
        if self._A is None or self._A.device != device or self._A.dtype != dtype:
            R = self.A_map.shape[1]
            self._A = torch.zeros(self.capacity, R, self.A_map.shape[2], device=device, dtype=dtype)
            self._Bt = torch.zeros(self.capacity, R, self.Bt_map.shape[2], device=device, dtype=dtype)
            self._slot.fill_(-1)
            self._owner.fill_(-1)
            self._stamp.zero_()
        assert self._Bt is not None
        self._clock += 1
        slots = self._slot.index_select(0, ids)
        miss = slots < 0
        if bool(miss.any()):
            new = ids[miss]
            stamp = self._stamp.clone()
            stamp[slots[~miss]] = torch.iinfo(torch.long).max  # the call's cached experts stay
            victims = torch.topk(stamp, len(new), largest=False).indices  # never-used slots (0) first
            evicted = self._owner.index_select(0, victims)
            self._slot[evicted[evicted >= 0]] = -1
            A_new, Bt_new = self._read(new, device, dtype)
            self._A[victims.to(device)] = A_new
            self._Bt[victims.to(device)] = Bt_new
            self._owner[victims] = new
            self._slot[new] = victims
            slots = self._slot.index_select(0, ids)
        self._stamp[slots] = self._clock
        on_dev = slots.to(device)
        return self._A.index_select(0, on_dev), self._Bt.index_select(0, on_dev)


def compact_selection(sel: Selection) -> tuple[torch.Tensor, Selection]:
    """``(ids [U], selection over them)``: the distinct experts a selection uses (ascending, on the CPU) and the
    same selection with its experts renumbered 0..U-1 (a dense one keeps the columns with a nonzero weight)."""
    if sel.indices is not None:
        ids, inverse = torch.unique(sel.indices, return_inverse=True)
        return ids.cpu(), Selection(sel.weights, inverse.view_as(sel.indices), sel.per)
    cols = (sel.weights != 0).any(0).nonzero().squeeze(1)
    return cols.cpu(), Selection(sel.weights.index_select(1, cols), None, sel.per)


class PagedExpertLayer(ExpertLayer):
    """An `ExpertLayer` whose factors stay on disk: memory-mapped stacked factors (one file per module, a
    library artifact), of which each call gathers the experts it selected (through a `FactorPages` LRU) and
    runs the same kernels as the pre-stacked layer over them. Memory: the cache and the call's experts, not
    all E. Linear modules only (an embedding's experts are pre-stacked)."""

    def __init__(
        self, base: nn.Module, name: str, A: torch.Tensor, Bt: torch.Tensor, owner: CallOwner, capacity: int
    ):
        nn.Module.__init__(self)
        self.base = base
        self.module_name = name
        self.d_in, self.d_out = A.shape[2], Bt.shape[2]
        self.owner = owner
        self.D = self.Db = self.dense_ids = None  # paged experts are LoRA factors only
        self.has_lora = True
        self.pages = FactorPages(A, Bt, capacity)  # not buffers: `.to(device)` must not copy every expert

    @property
    def num_experts(self) -> int:
        return self.pages.A_map.shape[0]

    def __getattr__(self, name: str) -> Any:
        if name in ("A", "Bt"):  # what learned routers train through: every expert's factors in memory
            raise RecipeNotApplicableError(
                f"module {self.module_name}: this recipe needs every expert's factors in memory, but they are "
                "paged from disk; attach with paging=PagingConfig(mode='off') (or fewer experts)"
            )
        return super().__getattr__(name)

    @property
    def rank(self) -> int:
        return self.pages.A_map.shape[1]

    def delta(self, x: torch.Tensor, sel: Selection, aggregation: Aggregation) -> torch.Tensor:
        ids, local = compact_selection(sel)
        if len(ids) == 0:
            return x.new_zeros(*x.shape[:-1], self.d_out)
        w = getattr(self.base, "weight", None)
        dtype = w.dtype if isinstance(w, torch.Tensor) else x.dtype
        A, Bt = self.pages.gather(ids, x.device, dtype)
        return expert_delta(x, A, Bt, local, aggregation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, paged (cache of {self.pages.capacity} experts)"


class EmbeddingExpertLayer(ExpertLayer):
    """An ``nn.Embedding`` plus E experts' embedding LoRAs (PEFT's ``lora_embedding_A [r, vocab]``,
    ``lora_embedding_B [dim, r]``), stacked as in `ExpertLayer` (``A [E, R, vocab]``, ``Bt [E, R, dim]``).

    An embedding is the linear map ``one_hot(id) ↦ Wᵀ one_hot(id)``, so ``A x`` is column ``id`` of A: each
    token's ``z = A[:, :, id]`` is a lookup, and the rest (weights, output / parameter / factor aggregation) is
    the linear layer's computation, over all E experts' ``B`` (unselected ones weighted 0): O(E·R·dim) per
    token, small beside the model. (Parameter and output aggregation coincide: the map is linear.)

    The router is asked for a selection with the base embedding rows ``[..., dim]`` as the layer's input (its
    true input, a one-hot over the vocabulary, carries nothing but the token id). Routers that decide per
    example or task, or from an explicit selection, route it like any layer; routers that score each module's
    input against per-module signatures (Arrow, PHATGOOSE, average activation) have none in that space, and the
    call is refused with the fix (docs/routing.md, "Embeddings")."""

    At: torch.Tensor

    def __init__(self, base: nn.Module, name: str, A: torch.Tensor, Bt: torch.Tensor, owner: CallOwner):
        super().__init__(base, name, A, Bt, owner)
        self.register_buffer("At", A.permute(2, 0, 1).contiguous(), persistent=False)  # [vocab, E, R]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        call = active_call(self.owner)
        if call is None:
            return out
        if isinstance(call, BatchCall):
            for rows, part, agg in call.parts(self.module_name, out):
                delta = embedding_delta(x.index_select(0, rows), self.At, self.Bt, part, agg)
                out = out.index_add(0, rows, _as(delta, out.dtype))
            return out
        try:
            sel = call.select(self.module_name, out)
        except (RecipeNotApplicableError, RuntimeError) as err:
            raise RoutingError(
                f"module {self.module_name} is an embedding (nn.Embedding): its input is a token id, which this "
                f"router cannot score against per-module signatures ({str(err).splitlines()[0][:120]}). Route these "
                "experts with an example- or task-level recipe, leave the embedding out (attach(..., "
                "target_modules=...) without it), or merge the embedding LoRA into the base."
            ) from None
        if sel is None:
            return out
        return out + _as(embedding_delta(x, self.At, self.Bt, sel, call.aggregation), out.dtype)


def embedding_delta(
    ids: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, sel: Selection, aggregation: Aggregation
) -> torch.Tensor:
    """The experts' contribution to an embedding's output for token ids ``[...]``: ``[..., dim]``
    (``At [vocab, E, R]`` with each expert's scaling folded in, ``Bt [E, R, dim]``)."""
    V, E, R = At.shape
    d_out = Bt.shape[-1]
    flat = ids.reshape(-1)
    N = flat.shape[0]
    w = sel.dense(E).to(Bt.dtype)  # [rows, E]; zeros for unselected experts
    if sel.per == "example":
        w = w.repeat_interleave(N // sel.rows, dim=0)
    elif sel.rows != N:
        raise ShapeMismatchError(f"a per-token selection has {sel.rows} rows for {N} tokens")
    z = At.index_select(0, flat)  # [N, E, R]: A x for a one-hot x
    w3 = w[..., None]
    z = w3 * (w3 * z).sum(1, keepdim=True) if aggregation == "factor" else w3 * z
    return (z.reshape(N, E * R) @ Bt.reshape(E * R, d_out)).reshape(*ids.shape, d_out)
