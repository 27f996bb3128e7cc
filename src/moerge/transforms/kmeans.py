"""k-means over embeddings (Lloyd's algorithm, k-means++ seeding from a seeded generator): the clustering of
AdapterSoup's expert selection and of Mo'LoRA's library building (``moerge train --cluster K``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moerge.errors import MoergeError


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [K, d]: the mean of each cluster's points
    labels: torch.Tensor  # [N]: each point's cluster
    iterations: int


def kmeans_plus_plus(points: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """k-means++ seeding (float64 ``[k, d]``): the first centre drawn uniformly, each next one with probability
    ∝ its squared distance to the nearest centre chosen so far; deterministic for a seed."""
    x = points.detach().to(torch.float64)
    n = len(x)
    if not 1 <= k <= n:
        raise MoergeError(f"k-means: cannot make {k} clusters of {n} points (choose 1 ≤ K ≤ {n})")
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(n, (1,), generator=gen)]
    while len(centroids) < k:
        d2 = torch.cdist(x, centroids).pow(2).min(1).values
        nxt = torch.multinomial(d2 / d2.sum(), 1, generator=gen) if d2.sum() > 0 else torch.tensor([0])
        centroids = torch.cat([centroids, x[nxt]])
    return centroids


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 100) -> KMeansResult:
    """Cluster ``points [N, d]`` into ``k`` clusters by squared L2 distance (Lloyd's algorithm from
    `kmeans_plus_plus`, in float64). Deterministic for a seed; an emptied cluster is re-seeded with the point
    farthest from its centroid."""
    x = points.detach().to(torch.float64)
    n = len(x)
    centroids = kmeans_plus_plus(x, k, seed=seed)
    labels = torch.full((n,), -1, dtype=torch.long)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        new = torch.cdist(x, centroids).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = x[labels == c]
            if len(members):
                centroids[c] = members.mean(0)
            else:
                far = torch.cdist(x, centroids).min(1).values.argmax()
                centroids[c] = x[far]
    return KMeansResult(centroids.to(points.dtype), labels, iterations)
