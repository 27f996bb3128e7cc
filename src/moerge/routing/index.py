"""`VectorIndex`: nearest neighbours of query embeddings in a bank of vectors (expert embeddings, sample banks).

Exact search is one matmul (``backend="exact"``, the default for small banks); faiss (``pip install
'moerge[index]'``, ``faiss-cpu``) runs the same exact search (``IndexFlatIP`` / ``IndexFlatL2``) faster on a
large bank. ``backend="auto"`` takes faiss when it is installed and the bank holds at least ``FAISS_FROM``
vectors. Both return the same neighbours: scores are inner products (``metric="ip"``, descending) or squared
L2 distances (``metric="l2"``, ascending, as faiss reports them); ties go to the lower index."""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from moerge.errors import MoergeError

Metric = Literal["ip", "l2"]
Backend = Literal["auto", "exact", "faiss"]
FAISS_FROM = 50_000  # bank size from which "auto" uses faiss (when installed)


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


class VectorIndex:
    """A bank of vectors ``[N, d]`` searched by ``metric``; `search` returns ``(scores [Q, k], ids [Q, k])``."""

    def __init__(self, vectors: torch.Tensor, metric: Metric = "ip", backend: Backend = "auto"):
        if vectors.ndim != 2:
            raise MoergeError(f"an index needs a [N, d] bank of vectors; got shape {tuple(vectors.shape)}")
        self.vectors = vectors.detach().to("cpu", torch.float32).contiguous()
        self.metric: Metric = metric
        if backend == "auto":
            backend = "faiss" if faiss_available() and len(self.vectors) >= FAISS_FROM else "exact"
        if backend == "faiss" and not faiss_available():
            raise MoergeError("backend 'faiss' needs faiss: pip install 'moerge[index]' (faiss-cpu)")
        self.backend: Backend = backend
        self._faiss = None
        if backend == "faiss":
            import faiss

            d = self.vectors.shape[1]
            self._faiss = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
            self._faiss.add(self.vectors.numpy())

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest bank vectors of each query (k is capped at the bank's size)."""
        k = min(k, len(self.vectors))
        q = queries.detach().to("cpu", torch.float32).contiguous()
        if self._faiss is not None:
            scores, ids = self._faiss.search(q.numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(ids).long()
        if self.metric == "ip":
            sims = q @ self.vectors.T
            return _topk_stable(sims, k, largest=True)
        dists = (q * q).sum(-1, keepdim=True) - 2 * q @ self.vectors.T + (self.vectors**2).sum(-1)[None]
        return _topk_stable(dists.clamp(min=0), k, largest=False)


def _topk_stable(values: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k with ties broken by the lower index, as faiss's flat indexes do: ``torch.topk`` of k+1 (linear in
    the bank), the k kept put in (value, index) order; rows where the (k+1)-th value equals the k-th (a tie
    straddling the cut) take a stable full sort instead."""
    if k >= values.shape[-1] or k == 0:
        order = torch.sort(values, dim=-1, descending=largest, stable=True).indices[:, :k]
        return values.gather(1, order), order
    top, idx = torch.topk(values, k + 1, dim=-1, largest=largest, sorted=True)
    straddles = top[:, k] == top[:, k - 1]
    top, idx = top[:, :k], idx[:, :k]
    idx, perm = idx.sort(dim=-1)  # by index; the stable sort by value below keeps equal values in that order
    top = top.gather(1, perm)
    order = torch.sort(top, dim=-1, descending=largest, stable=True).indices
    top, idx = top.gather(1, order), idx.gather(1, order)
    if bool(straddles.any()):
        rows = straddles.nonzero().squeeze(1)
        full = torch.sort(values[rows], dim=-1, descending=largest, stable=True).indices[:, :k]
        idx[rows] = full
        top[rows] = values[rows].gather(1, full)
    return top, idx


__all__ = ["FAISS_FROM", "VectorIndex", "faiss_available"]
